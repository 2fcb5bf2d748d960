"""Fréchet distance between Gaussians fitted to features, KID, and cached
reference statistics.

The Fréchet distance is pytorch-fid's formula,
  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)),
with the trace term taken from eigenvalues instead of scipy's sqrtm:
tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), a symmetric PSD matrix,
so two `eigh` calls replace sqrtm (faster, no complex parts, no eps retries).
With features at hand and fewer samples than dimensions, a smaller SVD gives
the same trace (see `frechet_distance_features`).
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from rissole_jax.files import atomic_write_bytes


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root = _psd_sqrt(sigma1)
  inner = root @ sigma2 @ root
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)  # symmetrise away round-off
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
  """The Fréchet distance of two feature sets (N, D).

  With fewer samples than dimensions (256 samples of 2048-d Inception
  features), the d x d route is wasteful: writing S1 = A^T A and S2 = B^T B
  with A, B the centred features over sqrt(n - 1), the nonzero eigenvalues
  of S1 S2 are the squared singular values of A B^T, so tr(sqrt(S1 S2)) is
  the nuclear norm of an (n1, n2) matrix. Same value, no d^3 decompositions."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if min(len(a), len(b)) > a.shape[1]:
    return frechet_distance(*statistics(a), *statistics(b))
  if min(len(a), len(b)) < 2:
    raise ValueError("need at least 2 feature vectors on each side")
  mu1, mu2 = a.mean(0), b.mean(0)
  ca, cb = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)
  tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * tr_covmean)


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 with
  the kernel (x.y / d + 1)^3, averaged over random subsets; (mean, std).
  The subset size is capped by the smaller set, as clean-fid does."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  d = real.shape[1]
  m = min(len(real), len(fake), subset_size)
  if m < 2:
    raise ValueError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  mmds = np.empty(subsets)
  for i in range(subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    # Off-diagonal means of kxx and kyy (unbiased), minus twice the mean of kxy.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    mmds[i] = within - 2 * kxy.mean()
  return float(mmds.mean()), float(mmds.std())


# ---- cached reference statistics -------------------------------------------------


def cache_dir(configured: str | None = None) -> Path:
  """Where reference statistics and classifiers live: the configured folder,
  $RISSOLE_CACHE, or ~/.cache/rissole_jax (rissole_jax.runtime.cache)."""
  from rissole_jax.runtime.cache import user_cache_dir
  return user_cache_dir(configured)


def content_hash(images: np.ndarray) -> str:
  """Identifies a set of images (shape and bytes): keys caches to the data itself."""
  h = hashlib.sha1(repr(images.shape).encode())
  h.update(np.ascontiguousarray(images).data)
  return h.hexdigest()[:12]


def cached_features(directory: Path, key: dict, compute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(features, mu, sigma) of a reference set, stored in `directory` under a
  name derived from `key` (dataset, split, size, feature network, weights
  hash, ...); computed with `compute()` and written atomically when absent.
  The features are kept too: KID and precision/recall need them, not only
  the Gaussian."""
  tag = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = Path(directory) / f"features_{tag}.npz"
  if path.exists():
    try:
      with np.load(path) as z:
        return z["features"], z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError):
      pass  # unreadable (e.g. another version): recompute and replace it
  features = np.asarray(compute(), np.float32)
  mu, sigma = statistics(features)
  buf = io.BytesIO()
  np.savez(buf, features=features, mu=mu, sigma=sigma,
           key=json.dumps(key, sort_keys=True, default=str))
  atomic_write_bytes(path, buf.getvalue())
  return features, mu, sigma
