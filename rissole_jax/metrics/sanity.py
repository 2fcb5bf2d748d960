"""Checks the quality instrument on image sets whose answer is known.

  python -m rissole_jax.metrics.sanity --config configs/mnist.py --out /tmp/sanity
  python -m rissole_jax.metrics.sanity --synthetic   # interval calibration

Runs the evaluate stage (the config's reference, floor, classifier and
bootstrap) on sets made from real images of the floor pool, never the
reference: real images (must sit on the floor), real images with Gaussian
pixel noise (worse FD; precision kept, recall and coverage down), real images
of half the classes only (mode dropping: precision at the floor, recall and
coverage about half), and uniform noise (every metric far from the floor).
Prints a markdown table of value [95% interval] and floor; docs/metrics.md
shows one. Minutes on a CPU: the classifier is trained once (cached).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")


def sample_sets(pool: np.ndarray, pool_labels: np.ndarray, n: int, seed: int = 123) -> dict:
  """{name: uint8 images (n, H, W, C)} made from floor-pool images."""
  rng = np.random.default_rng(seed)
  pick = lambda: pool[rng.choice(len(pool), n, replace=len(pool) < n)]  # noqa: E731
  classes = np.unique(pool_labels)
  half = classes[:max(1, len(classes) // 2)]
  sets = {"real (floor pool)": pick(),
          "real + noise (sigma 40)": np.clip(pick() + rng.normal(0, 40, (n, *pool.shape[1:])),
                                             0, 255).astype(np.uint8)}
  if (pool_labels >= 0).all() and len(classes) > 1:
    keep = np.flatnonzero(np.isin(pool_labels, half))
    sets[f"half the classes ({', '.join(map(str, half))})"] = pool[rng.choice(keep, n)]
  sets["uniform noise"] = rng.integers(0, 256, (n, *pool.shape[1:])).astype(np.uint8)
  return sets


def _gaussian(n, d, seed, scale=1.0):
  mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
  return np.random.default_rng(seed).normal(size=(n, d)) @ mix * scale


def synthetic(seeds: int = 40, pairs: int = 30) -> None:
  """The interval calibration and the benchmark's false-mark rate on synthetic
  features (docs/metrics.md, "How good are the intervals"): a 16-d Gaussian,
  a model 0.9x too narrow, 400 samples against a reference of 800."""
  from rissole_jax import benchmark
  from rissole_jax.metrics import floor as floor_lib
  from rissole_jax.metrics import scores
  reference = scores.Reference(_gaussian(800, 16, 0))
  res = [scores.summarise(*reference.score(_gaussian(400, 16, 1000 + s, 0.9), 200, s))
         for s in range(seeds)]
  print(f"{seeds} sample seeds: share of 95% intervals holding the mean over seeds; "
        "bootstrap s.e. / spread over seeds\n\n| metric | contains | s.e. / spread |\n"
        "|---|---|---|")
  for m in METRICS:
    v = np.array([x[m] for x in res])
    contains = np.mean([x[f"{m}_lo"] <= v.mean() <= x[f"{m}_hi"] for x in res])
    se = np.mean([(x[f"{m}_hi"] - x[f"{m}_lo"]) / 3.92 for x in res])
    print(f"| {m} | {contains:.2f} | {se:.2g} / {v.std(ddof=1):.2g} |")
  pool = _gaussian(800, 16, 1)
  fl = floor_lib.real_floor(reference, len(pool), lambda rows: pool[rows], 400, [0, 1, 2])
  flagged = 0
  for t in range(pairs):
    rows, reps = [], {}
    for name, seed in (("a", 100 + 2 * t), ("b", 101 + 2 * t)):
      point, r = reference.score(_gaussian(400, 16, seed, 0.9), 200, seed)
      row = {"name": name, "floor": {}}
      for col, key, _ in benchmark.QUALITY:
        metric = key.split("/")[1]
        if key.startswith("classifier/"):
          row[col] = point[metric]
          row["floor"][col] = [fl[metric]["mean"], fl[metric]["std"]]
      reps[name] = {f"classifier/{m}": x for m, x in r.items()}
      rows.append(row)
    benchmark.compare(rows, reps)
    flagged += rows[1]["verdict"] != "within noise"
  print(f"\nIdentical models, two seeds: {flagged} of {pairs} rows marked beyond the noise.")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py", help="config file[:variants]")
  p.add_argument("--out", help="folder for the workdirs of the sets")
  p.add_argument("--data_dir", default=None, help="config.data.data_dir")
  p.add_argument("--cache_dir", default=None, help="config.evaluate.cache_dir")
  p.add_argument("--synthetic", action="store_true",
                 help="instead: interval calibration and false marks on synthetic features")
  a = p.parse_args(argv)
  if a.synthetic:
    synthetic()
    return 0
  if not a.out:
    p.error("--out is required (or --synthetic)")

  import importlib.util
  path, _, variant = a.config.partition(":")
  spec = importlib.util.spec_from_file_location("sanity_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(variant)
  c.stages = ("sample", "evaluate")  # no VQ-GAN: no reconstruction metrics
  c.evaluate.inception = "off"
  if a.data_dir:
    c.data.data_dir = a.data_dir
  if a.cache_dir:
    c.evaluate.cache_dir = a.cache_dir

  from rissole_jax.data import HELDOUT, TRAIN, load_source
  from rissole_jax.metrics import protocol
  from rissole_jax.stages import evaluate
  from rissole_jax.stages.context import Context
  from rissole_jax.stages.workdir import flat_numbers
  ev = c.evaluate
  train, train_y = protocol.load_capped(load_source(c.data, TRAIN), ev.max_train_images,
                                        ev.reference_seed)
  held, held_y = protocol.load_capped(load_source(c.data, HELDOUT), ev.max_heldout_images,
                                      ev.reference_seed)
  # The same split as the stage's, applied to row ids to carry the labels along.
  ids = np.arange(len(held) + len(train))
  _, pool_ids = protocol.reference_and_pool(ids[:len(held), None], ids[len(held):, None], ev)
  images, labels = np.concatenate([held, train]), np.concatenate([held_y, train_y])
  pool, pool_y = images[pool_ids[:, 0]], labels[pool_ids[:, 0]]
  n = min(c.sample.num, len(pool))

  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  rows = []
  for i, (name, x) in enumerate(sample_sets(pool, pool_y, n).items()):
    root = Path(a.out) / f"set{i}"
    (root / "sample").mkdir(parents=True, exist_ok=True)
    np.save(root / "sample" / "samples.npy", x)
    ctx = Context(config=c, root=root, stage="evaluate", logger=logging.getLogger("sanity"),
                  progress_bars=False)
    m = flat_numbers(evaluate.run(ctx))
    rows.append((name, m))
  print(f"{n} images per set; classifier features; value [95% interval]\n")
  print("| set | " + " | ".join(METRICS) + " |")
  print("|---|" + "---|" * len(METRICS))
  for name, m in rows:
    print(f"| {name} | " + " | ".join(
        f"{m[f'classifier/{k}']:.3g} [{m[f'classifier/{k}_lo']:.3g}, {m[f'classifier/{k}_hi']:.3g}]"
        for k in METRICS) + " |")
  m = rows[0][1]
  print("| real-data floor: mean ± s.e. of one real set (spread over draws) | " + " | ".join(
      f"{m[f'classifier/floor/{k}/mean']:.3g} ± {m[f'classifier/floor/{k}/se']:.2g} "
      f"({m[f'classifier/floor/{k}/std']:.2g})" for k in METRICS) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
