"""Every feature-space metric of a set of images against one fixed real
reference, with bootstrap replicates for its uncertainty (docs/metrics.md).

  fd         Fréchet distance of Gaussians fitted to the features (lower: better)
  kid        unbiased MMD^2 with the kernel (x.y/d + 1)^3 over the whole sets
             (KID, Bińkowski et al. 2018; lower: better)
  precision, recall    k-NN manifolds (Kynkäänniemi et al. 2019)
  density, coverage    k-NN balls of the real points only (Naeem et al. 2020)

A `Reference` holds what does not change between the sets scored against it
(the reference's mean, covariance, k-NN radii, kernel mean), so the model,
each draw of the real-data floor and each benchmark row pay only for their
own features.

Uncertainty: a bootstrap over the scored set. Replicate b draws n of the n
feature vectors with replacement; every metric is written as a function of the
draw counts w (n,), so one set of distance and kernel matrices serves all
replicates, and w = 1 is the plain estimate:
  fd        mean and covariance weighted by w
  kid       w'Kw less the pairs of one vector with itself, over their number
  precision, density   weighted means of per-sample quantities
  coverage  a real ball is hit when any drawn sample falls in it
  recall    is the exception: its manifold is the samples' own balls, whose
            radii a resample with duplicates would shrink to 0, and with the
            full set's radii kept the intervals came out 35% too narrow
            (docs/metrics.md, "How good are the intervals"). Its replicates
            are random halves of the samples (without replacement) with their
            radii recomputed: for a mean, a half-sample's spread equals the
            full set's (sigma^2/(n/2) * (1 - 1/2)).
The reference is fixed (it is part of the instrument), not resampled.
A resample holds about 63% distinct samples, which moves some metrics (FD up,
coverage down; recall's halves lower); `interval` centres the replicates on the
plain estimate before taking percentiles, so the interval is the estimate's
spread, not that shift. Differences between two sets scored at the same n
(benchmark rows) shift alike.
"""
from __future__ import annotations

import numpy as np

from rissole_jax.metrics.prdc import pairwise_sq_distances, radii_from_distances

METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
LOWER_IS_BETTER = ("fd", "kid")
# Where a metric can lie: centred intervals are clipped to it (KID, unbiased, can be < 0).
BOUNDS = {"fd": (0.0, np.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
          "density": (0.0, np.inf), "coverage": (0.0, 1.0)}


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a @ b.T / a.shape[1] + 1) ** 3


class Reference:
  """A fixed set of real feature vectors (n_ref, d) and what scoring against
  it needs. pr_k: k of precision/recall (3, Kynkäänniemi et al.); dc_k: k of
  density/coverage (5, Naeem et al.)."""

  def __init__(self, features: np.ndarray, pr_k: int = 3, dc_k: int = 5):
    r = np.asarray(features, np.float64)
    if r.ndim != 2 or len(r) < 3:
      raise ValueError(f"need at least 3 reference feature vectors (N, D), got {r.shape}")
    self.features, (self.n, self.d) = r, r.shape
    self.pr_k, self.dc_k = min(pr_k, self.n - 1), min(dc_k, self.n - 1)
    self.mu = r.mean(0)
    self.centred = (r - self.mu) / np.sqrt(self.n - 1)  # sigma = centred' centred
    self.sigma = self.centred.T @ self.centred
    d_rr = pairwise_sq_distances(r, r)
    self.radii_pr = radii_from_distances(d_rr, self.pr_k)
    self.radii_dc = radii_from_distances(d_rr, self.dc_k)
    del d_rr
    k_rr = _kernel(r, r)
    self.kernel_mean = float((k_rr.sum() - np.trace(k_rr)) / (self.n * (self.n - 1)))
    del k_rr
    self._sqrt_sigma = None

  @property
  def sqrt_sigma(self) -> np.ndarray:
    if self._sqrt_sigma is None:
      w, v = np.linalg.eigh(self.sigma)
      self._sqrt_sigma = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return self._sqrt_sigma

  def score(self, fake: np.ndarray, replicates: int = 0, seed: int = 0
            ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """({metric: value}, {metric: (replicates,) bootstrap values}) of `fake`."""
    f = np.asarray(fake, np.float64)
    n = len(f)
    if f.ndim != 2 or f.shape[1] != self.d or n < 2:
      raise ValueError(f"need (n >= 2, {self.d}) features, got {f.shape}")
    counts = np.ones((1, n))
    if replicates > 0:
      rng = np.random.default_rng(seed)
      counts = np.concatenate([counts, rng.multinomial(n, np.full(n, 1.0 / n), replicates)])
    with _one_blas_thread():
      out = {"fd": self._fd(f, counts), "kid": self._kid(f, counts)}
      out.update(self._knn(f, counts, seed))
    point = {m: float(out[m][0]) for m in METRICS}
    return point, {m: out[m][1:] for m in METRICS}

  # -- the metrics as functions of draw counts (rows of `counts`) ------------------

  def _fd(self, f, counts) -> np.ndarray:
    n = len(f)
    mus = counts @ f / n                                   # (B, d)
    diff = ((mus - self.mu) ** 2).sum(1)
    tr_ref = np.trace(self.sigma)
    out = np.empty(len(counts))
    gram = self.d > min(n, self.n)  # few vectors in many dimensions: n-space route
    if gram:
      g = f @ self.centred.T                               # (n, n_ref)
    else:  # centred first: no cancellation in f' diag(w) f - n mu mu'
      m0 = f.mean(0)
      fc = f - m0
      fc32 = fc.astype(np.float32)
    for b, (w, mu) in enumerate(zip(counts, mus)):
      if gram:
        a = np.sqrt(w / (n - 1))[:, None]
        # sigma_w = A'A with A = sqrt(w/(n-1)) (f - mu): the nonzero eigenvalues
        # of sigma_w sigma_ref are the squared singular values of A centred'.
        m = a * (g - mu @ self.centred.T)
        tr_w = float(((a * (f - mu)) ** 2).sum())
        small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
      else:
        # sigma_w = (f' diag(w) f - n mu mu') / (n - 1); float32 for the replicates.
        x = fc if b == 0 else fc32
        s = (x.T * (w / (n - 1)).astype(x.dtype)) @ x - (n / (n - 1)) * np.outer(mu - m0, mu - m0)
        tr_w = float(np.trace(s))
        inner = self.sqrt_sigma @ s @ self.sqrt_sigma
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
      out[b] = diff[b] + tr_w + tr_ref - 2 * tr_covmean
    return out

  def _kid(self, f, counts) -> np.ndarray:
    n = len(f)
    k_ff = _kernel(f, f)
    diag = np.diag(k_ff)
    cross = _kernel(self.features, f).sum(0) / self.n      # (n,) mean over the reference
    pairs = n * n - (counts ** 2).sum(1)                   # ordered pairs of distinct vectors
    within = (np.einsum("bi,bi->b", counts @ k_ff, counts) - (counts ** 2) @ diag) / pairs
    return self.kernel_mean + within - 2 * (counts @ cross) / n

  def _knn(self, f, counts, seed: int) -> dict[str, np.ndarray]:
    n = len(f)
    d_rf = pairwise_sq_distances(self.features, f)         # (n_ref, n)
    d_ff = pairwise_sq_distances(f, f)
    k_f = min(self.pr_k, n - 1)
    radii_f = radii_from_distances(d_ff, k_f)
    in_real = (d_rf <= self.radii_pr[:, None]).any(0)      # (n,) sample inside the real manifold
    in_balls = d_rf < self.radii_dc[:, None]               # (n_ref, n) Naeem's strict <
    recall = [float((d_rf <= radii_f[None]).any(1).mean())]  # real inside a sample's ball
    # Recall's replicates: random halves, their k-NN radii recomputed (see the
    # module docstring: resampling with fixed radii gave intervals 35% too narrow).
    half = n // 2
    if len(counts) > 1 and half > k_f:
      rng = np.random.default_rng([seed, 1])
      d_fr, d_ff32 = d_rf.T.astype(np.float32), d_ff.astype(np.float32)  # rows: samples
      for _ in range(len(counts) - 1):
        u = np.sort(rng.choice(n, half, replace=False))
        r = radii_from_distances(d_ff32[u][:, u], k_f)
        recall.append(float((d_fr[u] <= r[:, None]).any(0).mean()))
    else:
      recall += [np.nan] * (len(counts) - 1)
    return {
        "precision": counts @ in_real / n,
        "density": counts @ in_balls.sum(0) / (self.dc_k * n),
        "coverage": _hit_fraction(in_balls, counts),
        "recall": np.asarray(recall),
    }


def _one_blas_thread():
  """BLAS on one thread: the replicates are many small matrix products, and
  on a busy 2-core machine OpenBLAS's threads made them 15x slower."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    import contextlib
    return contextlib.nullcontext()
  return threadpool_limits(1, user_api="blas")


def _hit_fraction(inside: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """For each row of counts, the fraction of rows of `inside` (n_ref, n) with
  at least one drawn sample: sparse, since a ball holds a few samples."""
  import scipy.sparse
  hits = scipy.sparse.csr_matrix(inside.astype(np.float32)) @ counts.T.astype(np.float32)
  return (np.asarray(hits) > 0).mean(0)


# ---- intervals ---------------------------------------------------------------------


def interval(point: float, replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The bootstrap percentile interval, the replicates centred on `point`
  first (see the module docstring); (point, point) without replicates."""
  r = np.asarray(replicates, np.float64)
  r = r[np.isfinite(r)]
  if r.size == 0:
    return float(point), float(point)
  r = r - (r.mean() - point)
  lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def difference_interval(a: np.ndarray, b: np.ndarray, point: float,
                        level: float = 0.95) -> tuple[float, float]:
  """Interval on (metric of A) - (metric of B), `point` the observed
  difference, from the two sets' bootstrap replicates paired by index: normal,
  from the standard error of the replicate differences (stable with a few
  hundred replicates even at the 99.6% a family-wise test of 6 metrics asks
  for, where percentiles are not). Independent resamples when A and B had
  different seeds; the same resamples of paired samples when they shared one
  (see docs/metrics.md, "The benchmark table")."""
  from statistics import NormalDist
  m = min(len(a), len(b))
  d = np.asarray(a[:m], np.float64) - np.asarray(b[:m], np.float64)
  d = d[np.isfinite(d)]
  if len(d) < 2:
    return float("nan"), float("nan")
  half = NormalDist().inv_cdf((1 + level) / 2) * float(np.std(d, ddof=1))
  return float(point - half), float(point + half)


def summarise(point: dict, reps: dict, level: float = 0.95) -> dict:
  """{metric: value, metric_lo, metric_hi} for metrics.json (clipped to BOUNDS)."""
  out = {}
  for m, v in point.items():
    out[m] = v
    if m in reps and np.isfinite(reps[m]).sum() > 1:  # recall has none below 2(k+1) samples
      lo, hi = interval(v, reps[m], level)
      bottom, top = BOUNDS.get(m, (-np.inf, np.inf))
      out[f"{m}_lo"], out[f"{m}_hi"] = float(np.clip(lo, bottom, top)), float(np.clip(hi, bottom, top))
  return out
