"""A deterministic, per-process input pipeline over any random-access source.

Training reads an endless stream made of one seeded permutation per epoch laid
end to end; global batch s is rows [s*B, (s+1)*B) of that stream, so nothing is
dropped, batches are a pure function of (seed, step) and resuming at step s
needs no iterator state. Each process takes its own contiguous slice of every
global batch, so processes read disjoint rows and together form the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from rissole_jax.data.sources import Source


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f"Global batch size {global_batch} is not divisible by the "
                     f"{process_count} processes: choose a multiple of {process_count}.")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


class RowCount:
  """A source known only by its length (named `name`): a TrainStream over it
  gives the (seed, step)-pure ids of each batch, and the caller gathers the
  rows itself (the diffusion trainer, from its latent database)."""

  def __init__(self, n: int, name: str = "latents"):
    self.name, self.n = name, int(n)

  def __len__(self):
    return self.n


@dataclasses.dataclass
class TrainStream:
  """Batch `step` of an endless shuffled stream, as this process's part."""
  source: Source
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  cache: bool = True  # keep decoded images in memory (small datasets)

  def __post_init__(self):
    self._n = len(self.source)
    if self._n == 0:
      raise ValueError(f"Source {self.source.name} is empty.")
    self._slice = local_slice(self.global_batch, self.process_index, self.process_count)
    self._perms: dict[int, np.ndarray] = {}
    self._images = self._labels = None
    if self.cache:
      self._images, self._labels = self.source.get(np.arange(self._n))

  @property
  def cached(self) -> bool:
    return self._images is not None

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self._n)
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Source rows of this process's part of global batch `step`."""
    pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)[self._slice]
    epochs, offs = np.divmod(pos, self._n)
    return np.asarray([self._perm(int(e))[o] for e, o in zip(epochs, offs)], np.int64)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    if self._images is not None:
      images, labels = self._images[idx], self._labels[idx]
    else:
      images, labels = self.source.get(idx)
    return {"image": to_float(images), "label": labels, "index": idx}


def eval_batches(source: Source, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every row exactly once, in order. The last batch is padded (repeating
  rows) to keep shapes static; `mask` marks the real rows."""
  n = len(source)
  sl = local_slice(batch_size, process_index, process_count)
  for start in range(0, n, batch_size):
    pos = np.arange(start, start + batch_size)
    mask = pos < n
    idx = np.where(mask, pos, n - 1)[sl]
    images, labels = source.get(idx)
    yield {"image": to_float(images), "label": labels, "index": idx, "mask": mask[sl]}


def load_all(source: Source, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """The whole source as uint8 images and labels (small datasets only)."""
  imgs, labels = [], []
  for s in range(0, len(source), batch_size):
    i, l = source.get(np.arange(s, min(s + batch_size, len(source))))
    imgs.append(i)
    labels.append(l)
  return np.concatenate(imgs), np.concatenate(labels)
