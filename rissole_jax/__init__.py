"""rissole_jax: parameter-efficient latent diffusion by block-wise generation
with retrieval guidance (RISSOLE), in JAX/Flax.

  from rissole_jax import Sampler
  images = Sampler.from_workdir("runs/mnist").sample(64)
"""

from rissole_jax.runtime import xla_flags as _xla_flags
# Before JAX starts a backend (it reads XLA_FLAGS then): see xla_flags.py.
_xla_flags.apply()

from rissole_jax.version import __version__  # noqa: E402
__all__ = ["Sampler"]


def __getattr__(name):
  # Lazy, so that `import rissole_jax` (and its CLIs' --help) does not import JAX.
  if name == "Sampler":
    from rissole_jax.inference.sampler import Sampler
    return Sampler
  raise AttributeError(f"module 'rissole_jax' has no attribute {name!r}")
