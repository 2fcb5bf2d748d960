"""The real-data floor: what each metric gives for REAL images (docs/metrics.md).

Every metric here is biased by the set sizes (FD most: a finite set of real
images is not at distance 0 from another one) and noisy. The floor answers
"what would a perfect model score?": the same metric, against the same
reference, for `n` real images that are not in the reference (a draw from the
floor pool), over several draws with fixed seeds. A model's number means
something only next to it: its gap to the floor mean is what the model lacks.

Floors are cached as JSON in the cache folder under a key made of everything
that decides them: the reference and pool images (content hashes), n, the
draw seeds, the feature network (and the numerics that compute its features)
and the metrics' settings (k). A benchmark's rows share one floor.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rissole_jax import files
from rissole_jax.metrics.scores import METRICS, Reference

VERSION = 1  # bump when the floor's protocol or a metric's formula changes


def draw_rows(pool_size: int, n: int, seed: int) -> np.ndarray:
  """The sorted pool rows of one floor draw (without replacement)."""
  if n > pool_size:
    raise ValueError(f"a floor of n={n} needs a pool of at least {n} images, got {pool_size}")
  return np.sort(np.random.default_rng(seed).choice(pool_size, n, replace=False))


def summarise(values: dict[str, list[float]], se: dict[str, float] | None = None) -> dict:
  """{metric: {mean, std, min, max, se, draws}}; std over draws (ddof=1), se
  the bootstrap standard error of one draw (NaN when not computed)."""
  out = {}
  for m, v in values.items():
    a = np.asarray(v, np.float64)
    out[m] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
              "min": float(a.min()), "max": float(a.max()),
              "se": float((se or {}).get(m, np.nan)), "draws": [float(x) for x in a]}
  return out


def _se(replicates: np.ndarray) -> float:
  r = np.asarray(replicates, np.float64)
  r = r[np.isfinite(r)]
  return float(r.std(ddof=1)) if len(r) > 1 else float("nan")


def cache_path(cache: Path, key: dict) -> Path:
  full = {"version": VERSION, **key}
  tag = hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return Path(cache) / f"floor_{tag}.json"


def real_floor(reference: Reference, pool_size: int, features_of: Callable[[np.ndarray], np.ndarray],
               n: int, seeds: Sequence[int], cache: Path | None = None, key: dict | None = None,
               log=None, replicates: int = 0) -> dict:
  """The floor of every metric in METRICS: {metric: {mean, std, min, max, se, draws}}.

  features_of(rows) gives the features of the pool images at `rows` (sorted);
  it is called once, for the union of every draw's rows, and not at all when
  the floor is cached under `key` in `cache`. With `replicates`, the first
  draw is also bootstrapped: `se` is the noise of one set of n real images.
  The spread over draws understates it, because draws from a small pool share
  most of their images (docs/metrics.md)."""
  seeds = [int(s) for s in seeds]
  path = None
  if cache is not None and key is not None:
    path = cache_path(cache, {**key, "n": int(n), "seeds": seeds, "pool_size": int(pool_size),
                              "reference_n": reference.n, "pr_k": reference.pr_k,
                              "dc_k": reference.dc_k, "replicates": int(replicates)})
    got = files.read_json(path, missing_ok=True) if path.exists() else None
    if got is not None and "floor" in got:
      if log:
        log("real-data floor: cached %s", path)
      return got["floor"]
  draws = [draw_rows(pool_size, n, s) for s in seeds]
  union = np.unique(np.concatenate(draws))
  feats = np.asarray(features_of(union))
  values: dict[str, list[float]] = {m: [] for m in METRICS}
  se = {}
  for i, rows in enumerate(draws):
    point, reps = reference.score(feats[np.searchsorted(union, rows)],
                                  replicates if i == 0 else 0, seeds[0])
    for m in METRICS:
      values[m].append(point[m])
      if i == 0 and replicates:
        se[m] = _se(reps[m])
  floor = summarise(values, se)
  if path is not None:
    files.atomic_write_json(path, {"key": {**key, "n": n, "seeds": seeds}, "floor": floor})
    if log:
      log("real-data floor: %d draws of %d real images, saved to %s", len(seeds), n, path)
  return floor


def gaps(point: dict, intervals: dict, floor: dict, level: float = 0.95) -> dict:
  """{metric_gap, metric_gap_lo, metric_gap_hi}: the model's distance from the
  floor mean. The interval combines the model's noise (its interval, as a
  standard error: width / 3.92 at 95%) with the floor's (the bootstrap
  standard error of one floor draw, when known): gap -+ z sqrt(se_m^2 + se_f^2)."""
  from statistics import NormalDist
  z = NormalDist().inv_cdf((1 + level) / 2)
  out = {}
  for m, f in floor.items():
    if m not in point:
      continue
    gap = point[m] - f["mean"]
    out[f"{m}_gap"] = gap
    if f"{m}_lo" in intervals:
      se_m = (intervals[f"{m}_hi"] - intervals[f"{m}_lo"]) / (2 * z)
      se_f = f.get("se", float("nan"))
      se_f = 0.0 if not np.isfinite(se_f) else se_f
      half = z * float(np.hypot(se_m, se_f))
      out[f"{m}_gap_lo"], out[f"{m}_gap_hi"] = gap - half, gap + half
  return out
