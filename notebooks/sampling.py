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
# # RISSOLE: digits in seconds, and editing by blocks
#
# RISSOLE generates a latent one *block* at a time with one small shared
# denoiser, and keeps the blocks coherent by conditioning each block on the
# same block of the k nearest neighbours of a query, retrieved from a
# database of training latents. This notebook loads the model shipped inside
# the package (the default main job's, trained on 5,000 MNIST digits; 1.8 MB
# with int8 weights), samples a grid, shows the neighbours that guided each
# sample, makes variations of an image of yours, completes it from some of
# its blocks (inpainting), extends it past its border (outpainting), and
# swaps the database.
#
# It runs on Colab (CPU, GPU or TPU runtime) and locally; on a 2-core CPU the
# whole notebook takes under a minute. `notebooks/sampling.py` is its
# jupytext twin (`jupytext --sync notebooks/sampling.py`).

# %%
# Install. Where rissole_jax is not installed yet (a fresh Colab runtime), set
# RISSOLE_INSTALL to a wheel you uploaded or the repository's URL, e.g.
#   RISSOLE_INSTALL = "/content/rissole_jax-0.1.0-py3-none-any.whl"
#   RISSOLE_INSTALL = "git+https://github.com/<org>/rissole_jax"
RISSOLE_INSTALL = ""

import importlib.util

if importlib.util.find_spec("rissole_jax") is None:
  if not RISSOLE_INSTALL:
    raise RuntimeError("rissole_jax is not installed and RISSOLE_INSTALL is empty: set it in this "
                       "cell to a wheel file or the repository URL, then run the cell again.")
  get_ipython().run_line_magic("pip", f"install -q {RISSOLE_INSTALL}")
elif RISSOLE_INSTALL:
  print("rissole_jax is already installed; RISSOLE_INSTALL was not used "
        "(pip uninstall rissole_jax first to install from it).")
else:
  print("rissole_jax is installed (RISSOLE_INSTALL is unset, so nothing was installed).")

# %%
import os
import sys
from pathlib import Path

import jax
import numpy as np

from rissole_jax import Sampler, pretrained
from rissole_jax.data.images import to_model_images
from rissole_jax.inference import editing

IN_COLAB = "google.colab" in sys.modules
print(f"JAX {jax.__version__}: backend {jax.default_backend()!r}, "
      f"{jax.device_count()} device(s): {jax.devices()}")

# %% [markdown]
# ## The model
#
# `MODEL`: a shipped model's name (`"mnist"`), a model file
# (`python -m rissole_jax.export --workdir DIR --out FILE`) or a finished
# workdir (`python -m rissole_jax.main --config ... --workdir DIR`). Its
# manifest says where it came from: the commit and command that made it, and
# how the int8 file compares with the float model it was made from.

# %%
MODEL = os.environ.get("RISSOLE_MODEL", "mnist")
WORK = Path(os.environ.get("RISSOLE_NOTEBOOK_DIR", "rissole_notebook"))
WORK.mkdir(parents=True, exist_ok=True)

if MODEL in pretrained.MODELS and not Path(MODEL).exists():
  sampler = Sampler.pretrained(MODEL)
elif Path(MODEL).is_dir():
  sampler = Sampler.from_workdir(MODEL)
else:
  sampler = Sampler.load(MODEL)
provenance = (sampler.manifest or {}).get("provenance") or {}
print(sampler)
print("made by:", provenance.get("command"), "at commit", provenance.get("commit"))
print("int8 file:", provenance.get("verdict"))

# %% [markdown]
# ## Samples
#
# Each image starts from a pseudo-query drawn from the database; the same
# seed gives the same images, whatever the batch size or device count.

# %%
images = sampler.sample(16, seed=0)
sampler.grid(images)

# %% [markdown]
# ## What guided them
#
# Each row: the pseudo-query, its k neighbours (the query itself is never
# among them), and the sample made from those neighbours.

# %%
sampler.figure(4, seed=0)

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
if not IMAGE:  # a stand-in: a digit of the database, saved as a file
  IMAGE = str(WORK / "my_image.png")
  Sampler.grid(sampler.decode([123])).save(IMAGE)
sampler.grid(sampler.variations(IMAGE, num_per_image=8, seed=0))

# %% [markdown]
# ## Keep part of it, complete the rest (inpainting)
#
# `keep` names the blocks of the latent grid to keep: "top", "bottom",
# "left", "right", a boolean block mask, or a pixel mask (a block is kept
# when at least half its pixels are). The kept blocks choose the neighbours
# (a distance over the kept blocks only), and each missing block is generated
# from those neighbours' blocks at its place. Each row: your image, the kept
# blocks (white), completions.

# %%
keep = "top"
completions = sampler.inpaint(IMAGE, keep, num_per_image=8, seed=0)
size, channels = sampler.image_shape[0], sampler.image_shape[2]
mask = editing.latent_mask(editing.block_mask(keep, sampler.config.blocks.grid, size), (size, size))
mask_image = np.broadcast_to((mask * 255).astype(np.uint8)[..., None], (size, size, channels))
sampler.grid(np.concatenate([to_model_images([IMAGE], size, channels), mask_image[None],
                             completions[0]]), cols=10)

# %% [markdown]
# ## Past the border (outpainting)
#
# The image is placed on a larger canvas (in blocks) and the rest generated,
# one training-size window at a time, each an inpainting of the blocks
# already there: the denoiser only ever sees the canvas size it was trained
# on. Here a canvas one block column wider on each side.

# %%
gh, gw = sampler.config.blocks.grid
wide = sampler.outpaint(IMAGE, canvas=(gh, gw + 2), at=(0, 1), num_per_image=8, seed=0)
sampler.grid(wide, cols=4)

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
# ## Next
#
# - Train your own: `python -m rissole_jax.main --config configs/mnist.py --workdir runs/mnist`
#   (about 10 minutes on a 2-core CPU), then `MODEL = "runs/mnist"` above.
# - The same from a shell: `python -m rissole_jax.sample --model mnist --num 64 --out samples`
#   (also `--variations`, `--inpaint IMG --keep top`, `--outpaint IMG --canvas 2,3`).
# - Sampling speed against steps, int8 and exported samplers: docs/performance.md, docs/deploy.md.
