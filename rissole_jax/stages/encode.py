"""Stage 'encode': the training split (the retrieval database) and the held-out
split through the trained VQ-GAN encoder, as plain NumPy files:

  DIR/encode/train.npy, heldout.npy                float32 (N, h, w, c)
  DIR/encode/train_labels.npy, heldout_labels.npy  int32 (N,), -1 where unknown
  DIR/encode/meta.json   autoencoder fingerprint, dataset, shapes, checksums

Every process encodes everything, in source order: the encoder may be a jitted
function over a mesh that spans all processes, which every process must call
anyway, and the result is then identical everywhere. Only process 0 writes.
"""
from __future__ import annotations

import time

import numpy as np

from rissole_jax import retrieval
from rissole_jax.data import HELDOUT, TRAIN, load_source


def load_autoencoder(config, vqgan_dir):
  """The trained VQ-GAN (imported here so this module imports without it)."""
  from rissole_jax.train.vqgan import load_autoencoder as load
  return load(config, vqgan_dir)


def run(ctx) -> dict:
  cfg = ctx.config
  ae = load_autoencoder(cfg, ctx.dir("vqgan"))
  ctx.log("autoencoder %s: latent %s, f=%s", ae.fingerprint, tuple(ae.latent_shape), ae.f)
  splits, metrics = {}, {}
  for split in (TRAIN, HELDOUT):
    source = load_source(cfg.data, split)
    t0 = time.perf_counter()
    with ctx.progress(total=len(source), desc=f"encode {split}") as bar:
      z, labels = retrieval.encode_source(ae, source, cfg.encode.batch_size, bar)
    seconds = time.perf_counter() - t0
    ctx.log("%s: %d images of %s -> latents %s in %.1fs", split, len(z), source.name,
            z.shape[1:], seconds)
    splits[split] = (z, labels, source.name)
    metrics[f"n_{split}"] = len(z)
    if split == TRAIN:  # data.bad_images=skip: the files left out (both splits)
      metrics["bad_images"] = len(getattr(source, "bad_files", ()))
    metrics[f"{split}_images_per_second"] = len(z) / max(seconds, 1e-9)
  if ctx.is_main:
    retrieval.save_latents(ctx.stage_dir, ae.fingerprint, cfg.data.name, splits)
  train = splits[TRAIN][0]
  metrics.update(latent_dim=int(np.prod(train.shape[1:])), latent_std=float(train.std()),
                 train_duplicate_fraction=_duplicate_fraction(train))
  return metrics


def _duplicate_fraction(z: np.ndarray) -> float:
  """Share of rows with an exact twin: quantized latents can repeat, and the
  neighbour tables must then still exclude the query by id."""
  if len(z) == 0:
    return 0.0
  rows = np.ascontiguousarray(z.reshape(len(z), -1)).view(np.dtype((np.void, z[0].nbytes)))
  _, inverse, counts = np.unique(rows.ravel(), return_inverse=True, return_counts=True)
  return float((counts[inverse] > 1).mean())
