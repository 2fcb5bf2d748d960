"""Recall@k and queries per second of the configured index against exact search.

  python -m rissole_jax.benchmarks.retrieval --config configs/mnist.py \
      --sizes 5000,100000,1000000 [--queries 1000] [--config.retrieval.X=...]

Vectors are synthetic, with the dimension of the config's embedding (MNIST:
8x8x4 = 256): clustered points on a low-dimensional subspace plus isotropic
noise, L2-normalised (see `synthetic`). Queries come from the same
distribution and are not in the database. Timings are medians of --repeats
runs after a warm-up, both sides on all cores; on a shared machine compare the
ratio, which both sides' slowdown mostly cancels.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rissole_jax import retrieval

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file [:variant].")
  flags.DEFINE_list("sizes", ["5000", "100000", "1000000"], "Database sizes.")
  flags.DEFINE_integer("queries", 1000, "Held-out queries per size.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
  flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
  flags.DEFINE_list("data", ["10", "32", "1.5", "0.5"],
                    "Synthetic data: clusters, rank, spread, noise (see `synthetic`).")
  flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


FLAGS = flags.FLAGS


def latent_shape(config) -> tuple[int, int, int]:
  """The VQ-GAN latent the config implies: image size / f, z_channels."""
  f = 2 ** (len(config.vqgan.ch_mult) - 1)
  h = config.data.image_size // f
  return h, h, int(config.vqgan.z_channels)


def synthetic(n: int, dim: int, seed: int, clusters: int = 10, rank: int = 32,
              spread: float = 1.5, noise: float = 0.5, chunk: int = 100_000) -> np.ndarray:
  """n unit vectors: `clusters` random centres (like digit classes), each point
  its centre plus a Gaussian on a shared `rank`-dim subspace (scales decaying
  like 1/sqrt(i), total norm `spread`) plus isotropic noise of norm `noise`
  (both relative to a centre's norm). Like image latents: a few classes with
  wide, low-dimensional variation inside each, never exactly repeated."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim), np.float32) / np.sqrt(dim)
  basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)
  scales = (spread / np.sqrt(np.arange(1, rank + 1)) / np.sqrt(np.sum(1 / np.arange(1, rank + 1)))
            ).astype(np.float32)
  out = np.empty((n, dim), np.float32)
  for s in range(0, n, chunk):  # chunks: temporaries stay small at 1M rows
    m = min(chunk, n - s)
    x = centres[rng.integers(0, clusters, m)]
    x += (rng.standard_normal((m, rank), np.float32) * scales) @ basis
    x += rng.standard_normal((m, dim), np.float32) * (noise / np.sqrt(dim))
    out[s:s + m] = retrieval.normalize(x)
  return out


def _timed(fn, repeats: int):
  """(median seconds over `repeats` calls, the last call's result)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def bench(config, n: int, queries: int, repeats: int, seed: int, data_spec=()) -> dict:
  k, qb = int(config.retrieval.k), config.retrieval.query_batch
  dim = retrieval.embedding_dim(latent_shape(config), config)
  clusters, rank, spread, noise = (t(v) for t, v in zip((int, int, float, float), data_spec))
  data = synthetic(n + queries, dim, seed, clusters, rank, spread, noise)
  db, q = data[:n], data[n:]
  t0 = time.perf_counter()
  index = retrieval.Index.build(db, config)
  build_s = time.perf_counter() - t0
  index.search(q[:64], k)  # warm-up
  index_s, (ids, _) = _timed(lambda: index.search(q, k), repeats)
  retrieval.exact_search(db, q[:64], k, qb)  # compile
  # Exact search at 1M takes a minute and its speed is steady: one run there.
  exact_s, (_, exact_scores) = _timed(lambda: retrieval.exact_search(db, q, k, qb),
                                      repeats if n <= 200_000 else 1)
  return {"n": n, "dim": dim, "k": k, "backend": index.backend, **index.params,
          "build_s": round(build_s, 2),
          f"recall@{k}": round(retrieval.recall_at_k(db, q, ids, exact_scores), 4),
          "qps": round(queries / index_s), "exact_qps": round(queries / exact_s),
          "speedup": round(exact_s / index_s, 1)}


def main(argv):
  del argv
  config = FLAGS.config
  print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"embedding={config.retrieval.embedding}, k={config.retrieval.k}", flush=True)
  rows = []
  for n in (int(s) for s in FLAGS.sizes):
    row = bench(config, n, FLAGS.queries, FLAGS.repeats, FLAGS.seed, FLAGS.data)
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(markdown(rows, config.retrieval.k))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=2)


def markdown(rows, k) -> str:
  head = (f"| vectors | structure | build s | recall@{k} | index qps | exact qps | speed-up |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
  lines = []
  for r in rows:
    st = r["structure"]
    if st == "tree":
      st += f" {r['num_leaves']} leaves, search {r['num_leaves_to_search']}, reorder {r['reorder']}"
    elif st == "ah":
      st += f", reorder {r['reorder']}"
    lines.append(f"| {r['n']:,} | {st} | {r['build_s']} | {r[f'recall@{k}']} | {r['qps']:,} | "
                 f"{r['exact_qps']:,} | {r['speedup']}x |")
  return "\n".join([head] + lines)


if __name__ == "__main__":
  define_flags()
  app.run(main)
