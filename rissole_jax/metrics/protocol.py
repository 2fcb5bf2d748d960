"""The evaluation protocol as one object: the measuring classifier, the fixed
real reference and the pool the real-data floor is drawn from, built from a
config as the evaluate stage builds them (docs/metrics.md).

  p = Protocol(config)
  m = p.score(images, seed=0)     # {fd, fd_lo, fd_hi, ..., fd_gap, ..., floor}

The evaluate stage scores its samples with it; benchmarks that score other
image sets (reconstructions, samples drawn another way) use it too, so that
every number sits on the same reference, the same floor and the same n rules.
"""
from __future__ import annotations

import numpy as np

from rissole_jax.data import HELDOUT, TRAIN, load_all, load_source
from rissole_jax.errors import DataError, check_choice
from rissole_jax.metrics import classifier as clf_lib
from rissole_jax.metrics import floor as floor_lib
from rissole_jax.metrics import frechet
from rissole_jax.metrics import scores as scores_lib

CLASSIFIER_SEED = 0  # the classifier is a measuring instrument: one per dataset, not per run
REFERENCES = ("split", "heldout")


def load_capped(source, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The whole source, or a fixed random subset of `cap` rows if it is larger."""
  if cap <= 0 or len(source) <= cap:
    return load_all(source)
  rows = np.sort(np.random.default_rng(seed).choice(len(source), cap, replace=False))
  parts = [source.get(rows[s:s + 512]) for s in range(0, cap, 512)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def reference_and_pool(held: np.ndarray, train: np.ndarray, ev) -> tuple[np.ndarray, np.ndarray]:
  """(reference images, floor pool images), see docs/metrics.md.

  'split': every image of both splits (held-out first, then training) in an
  order fixed by evaluate.reference_seed; the first evaluate.reference_size
  (at most half; 0: half) are the reference, the rest the pool the floor is
  drawn from. On the embedded MNIST: 2,500 and 2,500 of the 5,000 digits,
  for every run.
  'heldout': the held-out split is the reference, the training images the pool."""
  check_choice("evaluate.reference", ev.reference, REFERENCES)
  if ev.reference == "heldout":
    return held, train
  images = np.concatenate([held, train])
  order = np.random.default_rng(ev.reference_seed).permutation(len(images))
  # At most half: the pool must hold as many real images as there are samples.
  size = min(ev.reference_size, len(images) // 2) if ev.reference_size > 0 else len(images) // 2
  if size < 3:
    raise DataError(f"{len(images)} real images in all: too few for a reference and a floor "
                    "pool (evaluate.reference='split' needs at least 6).")
  return images[np.sort(order[:size])], images[np.sort(order[size:])]


def with_floor(out: dict, point: dict, floor: dict) -> dict:
  """`out` (summarised metrics) with the gaps to `floor` and the floor itself."""
  out.update(floor_lib.gaps(point, out, floor))
  out["floor"] = {m: {k: v for k, v in f.items() if k != "draws" and np.isfinite(v)}
                  for m, f in floor.items()}  # (se is NaN without bootstrap replicates)
  return out


class Protocol:
  """The classifier, reference and floor pool of `config` (see the module
  docstring). Loads both splits (capped by evaluate.max_*_images with
  evaluate.reference_seed) and trains the classifier once per dataset (cached
  under evaluate.cache_dir)."""

  def __init__(self, config, log=None):
    ev = self.ev = config.evaluate
    self.log = log
    check_choice("evaluate.reference", ev.reference, REFERENCES)
    train_src, held_src = load_source(config.data, TRAIN), load_source(config.data, HELDOUT)
    # Caps by a fixed seed, not config.seed: runs with other seeds share the reference.
    self.train, self.train_labels = load_capped(train_src, ev.max_train_images, ev.reference_seed)
    self.held, self.held_labels = load_capped(held_src, ev.max_heldout_images, ev.reference_seed)
    self.reference_images, self.pool = reference_and_pool(self.held, self.train, ev)
    # The same split of the labels (-1 where unknown).
    self.pool_labels = reference_and_pool(self.held_labels[:, None], self.train_labels[:, None],
                                          ev)[1][:, 0]
    self.cache = frechet.cache_dir(ev.get("cache_dir"))
    self.data_key = {"dataset": held_src.name, "reference": ev.reference,
                     "reference_images": frechet.content_hash(self.reference_images),
                     "pool_images": frechet.content_hash(self.pool)}
    self.seeds = [ev.floor_seed + i for i in range(ev.floor_draws)]
    self._clf = self._reference = None

  @property
  def clf(self) -> clf_lib.Classifier:
    if self._clf is None:
      labelled = (self.train_labels >= 0).all()
      self._clf = clf_lib.load_or_train(
          self.train, self.train_labels if labelled else None, self.cache,
          self.ev.classifier_steps, self.ev.classifier_batch, CLASSIFIER_SEED,
          heldout=(self.held, self.held_labels), log=self.log)
    return self._clf

  @property
  def reference(self) -> scores_lib.Reference:
    if self._reference is None:
      self._reference = scores_lib.Reference(self.clf.features(self.reference_images),
                                             self.ev.pr_k, self.ev.dc_k)
    return self._reference

  def scored_n(self, num: int) -> int:
    """How many of `num` images are scored: all unless the floor pool is smaller
    (every metric is scored at the floor's n)."""
    return min(num, len(self.pool))

  def floor(self, n: int) -> dict:
    """The real-data floor at n (cached): {metric: {mean, std, min, max, se, draws}}."""
    return floor_lib.real_floor(
        self.reference, len(self.pool), lambda rows: self.clf.features(self.pool[rows]), n,
        self.seeds, self.cache,
        {**self.data_key, "features": "classifier", "classifier": self.clf.tag,
         **clf_lib.numerics()}, log=self.log, replicates=self.ev.bootstrap)

  def score(self, images: np.ndarray, seed: int = 0) -> tuple[dict, dict]:
    """(metrics with intervals, gaps and floor; bootstrap replicates) of the
    first `scored_n(len(images))` images (uint8 (n, H, W, C))."""
    n = self.scored_n(len(images))
    point, reps = self.reference.score(self.clf.features(images[:n]), self.ev.bootstrap, seed)
    out = scores_lib.summarise(point, reps)
    return with_floor(out, point, self.floor(n)), reps
