"""Precision and recall with k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019).

Each set's manifold is the union of balls around its points, each ball's radius
the distance to that point's k-th nearest neighbour within the set. Precision:
the fraction of generated points inside the real manifold (samples look real).
Recall: the fraction of real points inside the generated manifold (samples
cover the data).
"""
from __future__ import annotations

import numpy as np


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray, chunk: int = 2048,
                          dtype=np.float64) -> np.ndarray:
  """Squared Euclidean distances (len(a), len(b)), computed in row chunks."""
  a, b = np.asarray(a, dtype), np.asarray(b, dtype)
  bb = (b * b).sum(1)
  out = np.empty((len(a), len(b)), dtype)
  for s in range(0, len(a), chunk):
    x = a[s:s + chunk]
    out[s:s + chunk] = np.maximum((x * x).sum(1)[:, None] + bb[None] - 2 * x @ b.T, 0)
  return out


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point of the set."""
  if len(features) <= k:
    raise ValueError(f"k={k} needs more than {k} points, got {len(features)}")
  d = pairwise_sq_distances(features, features)
  # Column 0 after sorting is the point itself (distance 0), so the k-th
  # neighbour is column k.
  return np.partition(d, k, axis=1)[:, k]


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  d = pairwise_sq_distances(points, centres)
  return float((d <= radii[None]).any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """(precision, recall) of `fake` against `real` features; k=3 as in the paper."""
  precision = _coverage(fake, real, knn_radii(real, k))
  recall = _coverage(real, fake, knn_radii(fake, k))
  return precision, recall
