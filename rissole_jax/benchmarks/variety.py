"""Where does the samples' variety go? Diagnoses a trained workdir, read only,
with the evaluate stage's protocol (metrics/protocol.py: the same classifier,
reference, n and real-data floor):

  python -m rissole_jax.benchmarks.variety --workdir W [--num 2000] [--seed 0] \
      [--out docs/variety/NAME.json] [--parts ceiling,samples,oracle]

Parts (each a row with FD, precision, recall, density, coverage, their 95%
intervals and the floor):
  ceiling   the VQ-GAN's reconstructions of `num` real images of the floor
            pool: the best any sampler on these latents can score;
  samples   the workdir's own sampling (pseudo-queries drawn from the
            database); also how many distinct database items became queries,
            the class balance of the queries (their dataset labels) and of
            the samples (the classifier's labels) against the real images'
            (total variation distance of the histograms);
  oracle    one sample per real pool image, conditioned on that image's own k
            nearest database neighbours (never itself): what better queries
            could give at most.
For `samples` and `oracle`, where each sample sits relative to its k
retrieved neighbours, in classifier features: the distance to the nearest
neighbour and to the neighbours' mean, each divided by the median distance
between real images and their nearest reference image (so 1.0 is "as far as
real images are from each other"); the same for the real pool images and
their own neighbours. Samples near the mean and far from every neighbour are
prototypes (an average of the neighbours); samples near one neighbour copy it.

Writes --out (JSON, rewritten after each part: a rerun skips parts done) and
prints a table.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

PARTS = ("ceiling", "samples", "oracle")
METRICS = ("fd", "precision", "recall", "density", "coverage")


def class_balance(labels: np.ndarray, real_labels: np.ndarray, classes: int) -> dict:
  """Histogram of `labels` and its total variation distance from the real one."""
  h = np.bincount(labels, minlength=classes) / max(len(labels), 1)
  r = np.bincount(real_labels, minlength=classes) / max(len(real_labels), 1)
  return {"histogram": [round(float(x), 4) for x in h], "tv_distance": float(0.5 * np.abs(h - r).sum())}


def neighbour_distances(f_x: np.ndarray, f_nb: np.ndarray, scale: float) -> dict:
  """Median distance (features, divided by `scale`) of each x (n, d) to its
  nearest neighbour and to its neighbours' mean (f_nb: (n, k, d))."""
  d_each = np.linalg.norm(f_nb - f_x[:, None], axis=-1)
  d_mean = np.linalg.norm(f_nb.mean(1) - f_x, axis=-1)
  return {"to_nearest_neighbour": float(np.median(d_each.min(1)) / scale),
          "to_neighbour_mean": float(np.median(d_mean) / scale),
          "neighbour_spread": float(np.median(np.linalg.norm(
              f_nb - f_nb.mean(1, keepdims=True), axis=-1).mean(1)) / scale)}


def _summary(m: dict) -> dict:
  out = {}
  for k in METRICS:
    out.update({k + s: m[k + s] for s in ("", "_lo", "_hi", "_gap") if k + s in m})
    out[f"floor_{k}"] = m["floor"][k]["mean"]
  return out


def run(workdir: Path, num: int, seed: int, parts, out: Path | None, log=print) -> dict:
  from rissole_jax.data import to_float, to_uint8
  from rissole_jax.inference.sampler import Sampler
  from rissole_jax.metrics.protocol import Protocol
  from rissole_jax.metrics.prdc import pairwise_sq_distances

  result = json.loads(out.read_text()) if out and out.exists() else {}
  s = Sampler.from_workdir(workdir)
  proto = Protocol(s.config, log=lambda *a: log(a[0] % a[1:]))
  n = proto.scored_n(num)
  result.setdefault("meta", {}).update(
      workdir=str(workdir), num=n, seed=seed, cpu=platform.processor() or platform.machine(),
      k=int(s.stats["k"]), database=len(s.db), sampler=s.config.sample.sampler,
      steps=int(s.config.sample.steps))
  clf = proto.clf
  real = proto.pool[:n]
  f_real = clf.features(real)
  # The scale: real images' median distance to their nearest reference image.
  f_ref = proto.reference.features
  scale = float(np.median(np.sqrt(pairwise_sq_distances(f_real, f_ref).min(1))))
  labelled = clf.task == "labels"
  real_y = clf.probs(real).argmax(-1) if labelled else None

  def save():
    if out:
      from rissole_jax.files import atomic_write_json
      atomic_write_json(out, result)

  def nb_features(ids: np.ndarray) -> np.ndarray:
    """Classifier features of the decoded neighbour latents, (n, k, d)."""
    imgs = to_uint8(s.ae.decode(s.db.latents[ids.ravel()]))
    return clf.features(imgs).reshape(*ids.shape, -1)

  if "ceiling" in parts and "ceiling" not in result:
    t = time.time()
    recon = to_uint8(s.ae.decode(s.ae.encode(to_float(real))))
    m, _ = proto.score(recon, seed)
    result["ceiling"] = {**_summary(m), "seconds": time.time() - t}
    save()
  if "samples" in parts and "samples" not in result:
    t = time.time()
    images, queries = s.sample(n, seed=seed, return_queries=True, progress=False)
    m, _ = proto.score(images, seed)
    row = {**_summary(m), "distinct_queries": int(len(np.unique(queries))),
           "seconds": time.time() - t}
    nb = s.db.neighbours[queries]
    row.update({f"samples_{k}": v for k, v in neighbour_distances(
        clf.features(images), nb_features(nb), scale).items()})
    if labelled:
      classes = clf.num_classes
      row["sample_classes"] = class_balance(clf.probs(images).argmax(-1), real_y, classes)
      # The queries' own labels against the real images' (both true labels).
      q, pool_y = s.db.labels[queries], proto.pool_labels[:n]
      if (q >= 0).all() and (pool_y >= 0).all():
        row["query_classes"] = class_balance(q, pool_y, int(max(q.max(), pool_y.max())) + 1)
    result["samples"] = row
    save()
  if "oracle" in parts and "oracle" not in result:
    t = time.time()
    ids = s.retrieve(s.encode_images(real))
    images = s.generate(ids, seed=seed, progress=False)
    m, _ = proto.score(images, seed)
    f_nb = nb_features(ids)
    row = {**_summary(m), "seconds": time.time() - t}
    row.update({f"samples_{k}": v for k, v in neighbour_distances(
        clf.features(images), f_nb, scale).items()})
    row.update({f"real_{k}": v for k, v in neighbour_distances(f_real, f_nb, scale).items()})
    if labelled:
      row["sample_classes"] = class_balance(clf.probs(images).argmax(-1), real_y, clf.num_classes)
    result["oracle"] = row
    save()
  return result


def table(result: dict) -> str:
  rows = [p for p in PARTS if p in result]
  head = "| part | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
  lines = [head]
  for p in rows:
    r = result[p]
    cells = [f"{r[k]:.3f} [{r.get(k + '_lo', r[k]):.3f}, {r.get(k + '_hi', r[k]):.3f}]"
             for k in METRICS]
    lines.append(f"| {p} | " + " | ".join(cells) + " |")
  any_row = result[rows[0]] if rows else {}
  lines.append("| real-data floor | " + " | ".join(f"{any_row.get('floor_' + k, float('nan')):.3f}"
                                                  for k in METRICS) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num", type=int, default=2000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--parts", default=",".join(PARTS))
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  parts = [p.strip() for p in a.parts.split(",") if p.strip()]
  from rissole_jax.errors import check_choice
  for p in parts:
    check_choice("--parts", p, PARTS)
  result = run(Path(a.workdir), a.num, a.seed, parts, Path(a.out) if a.out else None)
  print(table(result))
  for p in PARTS:
    if p in result:
      r = result[p]
      extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
               if k.startswith(("samples_", "real_", "distinct"))}
      extra.update({k: round(v["tv_distance"], 3) for k, v in r.items() if k.endswith("_classes")})
      print(p, json.dumps(extra))


if __name__ == "__main__":
  main()
