"""Memorisation: are samples closer to the training images than new real images are?

For each sample, the distance to its nearest training image is divided by the
median nearest-training distance of held-out real images, which are new
draws from the same distribution. A model that generalises gives ratios
around 1; copies of database images give ratios near 0. Reported: the
median ratio, and the fraction of samples below `threshold` (near copies).

The distance is Euclidean in pixel space (images in [-1, 1]). Copying is a
pixel-level event, and RISSOLE's failure mode is pasting the blocks of
retrieved training images, which stays aligned, so pixels see it directly;
classifier features would call any two clean "7"s near, and Inception
features are too slow on CPU to search the whole training set.
"""
from __future__ import annotations

import numpy as np

from rissole_jax.metrics.prdc import pairwise_sq_distances


def _flat(images) -> np.ndarray:
  x = np.asarray(images)
  x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
  return x.reshape(len(x), -1)


def nearest_distances(queries, database, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """(distance, index) of each query's nearest database row (images or vectors)."""
  q, db = _flat(queries), _flat(database)
  dist, idx = np.empty(len(q)), np.empty(len(q), np.int64)
  for s in range(0, len(q), chunk):
    # float32: pixel vectors are long and the training set can be large.
    d = pairwise_sq_distances(q[s:s + chunk], db, dtype=np.float32)
    idx[s:s + chunk] = d.argmin(1)
    dist[s:s + chunk] = np.sqrt(d[np.arange(len(d)), idx[s:s + chunk]])
  return dist, idx


def memorization_metrics(samples, train, heldout, threshold: float = 0.5) -> dict:
  """{'median_ratio', 'near_copy_fraction', 'heldout_median_distance'}."""
  d_held, _ = nearest_distances(heldout, train)
  scale = float(np.median(d_held))
  d_samp, _ = nearest_distances(samples, train)
  ratio = d_samp / max(scale, 1e-12)
  return {"median_ratio": float(np.median(ratio)),
          "near_copy_fraction": float((ratio < threshold).mean()),
          "heldout_median_distance": scale}
