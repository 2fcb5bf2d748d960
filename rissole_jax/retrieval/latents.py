"""Latent files: the encode stage's output written and read as a whole
(shards.py knows their layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def encode_source(autoencoder, source, batch_size: int, progress=None, start: int = 0,
                  stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows [start, stop) of `source` through the autoencoder: latents (n, h, w, c)
  float32 and labels (n,) int32, in source order. Reads a few batches at a
  time so big datasets never sit in memory as float images."""
  from rissole_jax.data import to_float
  stop = len(source) if stop is None else stop
  latents = np.empty((stop - start, *autoencoder.latent_shape), np.float32)
  labels = np.empty((stop - start,), np.int32)
  step = batch_size * 8
  for s in range(start, stop, step):
    images, lab = source.get(np.arange(s, min(s + step, stop)))
    latents[s - start:s - start + len(images)] = autoencoder.encode(to_float(images),
                                                                    batch_size=batch_size)
    labels[s - start:s - start + len(images)] = lab
    if progress is not None:
      progress.update(len(images))
  return latents, labels


def save_latents(directory: Path, fingerprint: str, dataset: str,
                 splits: dict[str, tuple[np.ndarray, np.ndarray, str]],
                 codebook: np.ndarray | None = None, shard_rows: int = 1 << 30) -> None:
  """A whole database written by one process, as the encode stage writes it:
  splits {name: (latents, labels, source name)}; stored as code indices of
  `codebook` (refusing latents that are not its vectors), else as float32."""
  from rissole_jax.store import codes as codes_lib
  from rissole_jax.store import shards
  info = {}
  for split, (z, labels, name) in splits.items():
    for i, (a, b) in enumerate(shards.ranges(len(z), shard_rows)):
      rows = np.asarray(z[a:b], np.float32)
      if codebook is not None:
        rows = codes_lib.to_codes(rows, codebook)
      shards.write_shard(directory, split, i, a, rows, np.asarray(labels[a:b]), fingerprint)
    info[split] = (len(z), shard_rows, name)
  latent_shape = next(iter(splits.values()))[0].shape[1:]
  shards.finish(directory, fingerprint, dataset, codebook, info, latent_shape)


def read_latents(directory: Path) -> tuple[dict, dict]:
  """(meta, {split: (float latents, labels)}) of an encode folder, verified
  (codes looked up in the codebook: for small databases and tests)."""
  from rissole_jax.store import codes as codes_lib
  from rissole_jax.store import shards
  meta = shards.read_meta(directory)
  cb = shards.codebook(directory, meta)
  out = {}
  for split in meta["rows"]:
    rows, labels = shards.read_split(directory, meta, split)
    out[split] = (rows if cb is None else codes_lib.from_codes(rows, cb), labels)
  return meta, out
