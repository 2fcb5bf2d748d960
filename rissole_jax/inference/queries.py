"""Pseudo-queries (the database items a sample starts from) and their
neighbours: numpy only, deterministic in the seed."""
from __future__ import annotations

import numpy as np

from rissole_jax.errors import DataError, check_choice

PSEUDO_QUERIES = ("uniform", "frequent")


def retrieval_counts(neighbours: np.ndarray) -> np.ndarray:
  """How often each database item is among the training queries' neighbours."""
  return np.bincount(np.asarray(neighbours).ravel(), minlength=len(neighbours))


def pseudo_queries(neighbours: np.ndarray, num: int, mode: str, seed: int) -> np.ndarray:
  """`num` database ids: uniform, or 'frequent' (RDM): in proportion to how
  often an item is retrieved, so never-retrieved outliers are never queries.
  Without replacement while there are enough candidates (a fixed random
  ranking, Gumbel top-k, so the first m of `num` queries are the `m` queries);
  beyond that uniform goes round again and 'frequent' draws with replacement."""
  check_choice("sample.pseudo_query", mode, PSEUDO_QUERIES)
  n = len(neighbours)
  rng = np.random.default_rng([seed, 0x5A3])
  if mode == "uniform":
    return np.concatenate([rng.permutation(n) for _ in range(-(-num // n))])[:num].astype(np.int64)
  counts = retrieval_counts(neighbours).astype(np.float64)
  if num > np.count_nonzero(counts):
    return rng.choice(n, size=num, p=counts / counts.sum()).astype(np.int64)
  with np.errstate(divide="ignore"):
    keys = np.log(counts) + rng.gumbel(size=n)
  return np.argsort(-keys, kind="stable")[:num].astype(np.int64)


def query_neighbours(neighbours: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """(num, k) neighbour ids of each query, refusing any query among its own."""
  ids = np.asarray(neighbours)[queries]
  bad = np.flatnonzero(np.any(ids == np.asarray(queries)[:, None], axis=1))
  if len(bad):
    raise DataError(f"{len(bad)} pseudo-queries (e.g. id {int(queries[bad[0]])}) are among "
                    "their own neighbours: a sample could copy its query. The neighbour "
                    "table must exclude each item itself; rebuild the index.")
  return ids
