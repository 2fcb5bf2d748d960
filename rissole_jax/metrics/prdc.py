"""k-nearest-neighbour manifold metrics: precision and recall (Kynkäänniemi et
al. 2019), density and coverage (Naeem et al. 2020).

Each set's manifold is the union of balls around its points, each ball's radius
the distance to that point's k-th nearest neighbour within the set.

  precision  the fraction of generated points inside the real manifold
             (samples look real)
  recall     the fraction of real points inside the generated manifold
             (samples cover the data)
  density    how many real balls contain a generated point, averaged over the
             generated points and divided by k: 1 for samples distributed like
             the real points, above 1 when samples crowd where real points are
             dense, below 1 when they fall outside. Unlike precision, one real
             outlier with a large ball does not make many samples count.
  coverage   the fraction of real points whose ball contains at least one
             generated point. Only the real set's balls are used, so outlying
             samples (whose own balls are large) cannot inflate it as they do
             recall.

Precision and recall count a point on a ball's boundary as inside (<=), as the
Kynkäänniemi et al. code does; density and coverage use a strict < as Naeem et
al.'s reference implementation (the `prdc` package) does.
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


def radii_from_distances(d: np.ndarray, k: int) -> np.ndarray:
  """Squared k-NN radii of a set from its own (n, n) squared distance matrix."""
  if len(d) <= k:
    raise ValueError(f"k={k} needs more than {k} points, got {len(d)}")
  # Column 0 after sorting is the point itself (distance 0), so the k-th
  # neighbour is column k.
  return np.partition(d, k, axis=1)[:, k]


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point of the set."""
  if len(features) <= k:
    raise ValueError(f"k={k} needs more than {k} points, got {len(features)}")
  return radii_from_distances(pairwise_sq_distances(features, features), k)


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  """The fraction of `points` inside at least one ball (centre, squared radius)."""
  d = pairwise_sq_distances(points, centres)
  return float((d <= radii[None]).any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """(precision, recall) of `fake` against `real` features; k=3 as in the paper."""
  precision = _fraction_inside(fake, real, knn_radii(real, k))
  recall = _fraction_inside(real, fake, knn_radii(fake, k))
  return precision, recall


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
  """(density, coverage) of `fake` against `real` features (Naeem et al. 2020;
  k=5 as they recommend)."""
  radii = knn_radii(real, k)                       # (n_real,) squared
  inside = pairwise_sq_distances(real, fake) < radii[:, None]  # (n_real, n_fake)
  density = float(inside.sum() / (k * inside.shape[1]))
  coverage = float(inside.any(axis=1).mean())
  return density, coverage
