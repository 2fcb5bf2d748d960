# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sampling a RISSOLE model
#
# RISSOLE generates a latent one *block* at a time with one small shared
# denoiser, and keeps the blocks coherent by conditioning each block on the
# same block of the k nearest neighbours of a query, retrieved from a
# database of training latents. This notebook loads a trained model (a
# workdir or a model file), samples a grid, shows the neighbours that guided
# each sample, swaps the database for a folder of images, makes variations
# of an image of yours, and times sampling against the number of steps.
#
# It runs on Colab (TPU, GPU or CPU runtime) and locally. `notebooks/sampling.py`
# is its jupytext twin (`jupytext --sync notebooks/sampling.py`).

# %%
# Install (Colab): rissole_jax from its repository or a wheel you uploaded.
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
  RISSOLE_SOURCE = "git+https://github.com/YOUR_ORG/rissole_jax"  # or "/content/rissole_jax-0.1.0-py3-none-any.whl"
  get_ipython().run_line_magic("pip", f"install -q {RISSOLE_SOURCE}")

# %%
import os
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from rissole_jax import Sampler

print(f"JAX {jax.__version__}: backend {jax.default_backend()!r}, "
      f"{jax.device_count()} device(s): {jax.devices()}")

# %% [markdown]
# ## Parameters
#
# `MODEL`: a finished workdir (`python -m rissole_jax.main ... --workdir DIR`)
# or a model file (`python -m rissole_jax.export --workdir DIR --out FILE`).
# Left empty, the notebook trains the tiny `smoke` config first (about a
# minute on a CPU; its samples are noise-like, it only shows the mechanics).

# %%
MODEL = os.environ.get("RISSOLE_MODEL", "")
STEPS = [int(s) for s in os.environ.get("RISSOLE_NOTEBOOK_STEPS", "5,10,20,50").split(",")]
NUM = 16              # images per grid
WORK = Path(os.environ.get("RISSOLE_NOTEBOOK_DIR", "rissole_notebook"))

# %%
if not MODEL:
  from rissole_jax import defaults, main
  config = defaults.apply_variants(defaults.base_config(), "smoke")  # = configs/mnist.py:smoke
  config.stages = ("vqgan", "encode", "index", "diffusion")
  MODEL = str(WORK / "smoke_run")
  main.run(config, Path(MODEL), progress=True)

sampler = Sampler.from_workdir(MODEL) if Path(MODEL).is_dir() else Sampler.load(MODEL)
sampler

# %% [markdown]
# ## Samples
#
# Each image starts from a pseudo-query drawn from the database; the same
# seed gives the same images, whatever the batch size or device count.

# %%
images = sampler.sample(NUM, seed=0)
sampler.grid(images)

# %% [markdown]
# ## What guided them
#
# Each row: the pseudo-query, its k neighbours (the query itself is never
# among them), and the sample made from those neighbours.

# %%
sampler.figure(4, seed=0)

# %% [markdown]
# ## Another database
#
# Retrieval is the model's memory: swap the database and the same denoiser
# generates from other neighbours, with no retraining. Here a folder of
# mirrored digits (any folder of PNG/JPEG images works); it is encoded and
# indexed once and cached on disk.

# %%
folder = WORK / "mirrored"
folder.mkdir(parents=True, exist_ok=True)
for i, img in enumerate(sampler.decode(np.arange(40))):
  Sampler.grid(img[None, :, ::-1]).save(folder / f"{i:03d}.png")
other = sampler.with_database(folder)
other.figure(4, seed=0)

# %% [markdown]
# ## More like this
#
# Variations of your own image: it is converted like the training data (any
# size or mode), encoded, its neighbours retrieved, and new images sampled
# from them. On Colab, upload a file; elsewhere, set `IMAGE` to a path.

# %%
IMAGE = os.environ.get("RISSOLE_IMAGE", "")
if IN_COLAB and not IMAGE:
  from google.colab import files
  IMAGE = next(iter(files.upload()))
if not IMAGE:  # a stand-in: one held-out-like image from the database, saved as a file
  IMAGE = str(WORK / "my_image.png")
  Sampler.grid(sampler.decode([123])).save(IMAGE)
variations = sampler.variations(IMAGE, num_per_image=8, seed=0)
sampler.grid(variations)

# %% [markdown]
# ## Time against steps
#
# Each setting compiles once (not timed); the timed call samples `NUM` images.

# %%
seconds = []
for steps in STEPS:
  sampler.sample(NUM, steps=steps, progress=False)            # compile
  t0 = time.perf_counter()
  sampler.sample(NUM, steps=steps, seed=1, progress=False)
  seconds.append(time.perf_counter() - t0)
plt.figure(figsize=(4, 3))
plt.plot(STEPS, [NUM / s for s in seconds], "o-")
plt.xlabel("sampling steps")
plt.ylabel("images / s")
plt.title(f"{jax.default_backend()}, {jax.device_count()} device(s)")
plt.grid(alpha=0.3)
plt.show()
