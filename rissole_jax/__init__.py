"""rissole_jax: parameter-efficient latent diffusion by block-wise generation
with retrieval guidance (RISSOLE), in JAX/Flax."""

__version__ = "0.1.0"
