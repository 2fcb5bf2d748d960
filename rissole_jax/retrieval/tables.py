"""The index stage's output: the index built once, each process's share of
the neighbour tables, their assembly, and recall against exact search."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rissole_jax.errors import IndexMismatch
from rissole_jax.retrieval.embedding import (Reduction, embed_rows, embedding_dim,
                                             fit_reduction, reduction_kind)
from rissole_jax.retrieval.index import Index, exact_search, recall_at_k, check_k
from rissole_jax.files import write_manifest, rerun_fix, remove
from rissole_jax import files

log = logging.getLogger(__name__)


_RECALL_QUERIES = 2000  # held-out queries checked against exact search (plenty for recall)


def index_database(directory: Path, config, encode_dir: Path,
                   say: Callable[..., None] = log.info,
                   progress: Callable[..., object] | None = None,
                   process_index: int = 0, process_count: int = 1) -> dict:
  """The index over the encode folder's train split and its neighbour tables
  (train: an item never finds itself; heldout), under `directory`.

  Process 0 fits the reduced embedding, builds the index and saves it (ScaNN's
  build is not a collective); every process loads it and searches the
  neighbours of an even, contiguous share of the rows of each split
  (`search_share`), writing one table part per split; process 0 assembles
  the tables (the same bytes for any number of processes: each row is
  searched in the same batch), checks recall against exact search on up to 2,000
  held-out queries and returns the metrics ({} on the other processes).
  progress(total=, desc=) -> a tqdm-like bar, e.g. ctx.progress."""
  from rissole_jax.runtime import parallel
  metrics = build_index(directory, config, encode_dir, say) if process_index == 0 else {}
  if process_count > 1:
    parallel.sync(f"index-built:{directory}")
  metrics.update(search_share(directory, config, encode_dir, process_index, process_count,
                              progress=progress))
  if process_count > 1:
    parallel.sync(f"index-searched:{directory}")
  if process_index != 0:
    return {}
  metrics.update(assemble_tables(directory, config, encode_dir, say))
  return {**metrics, "processes": process_count}


def _encoded(encode_dir: Path, config):
  """(meta, codebook, n, latent shape, reduction kind, provenance) of an encode folder."""
  from rissole_jax.store import shards
  rcfg = config.retrieval
  meta = shards.read_meta(encode_dir)
  n, shape = meta["rows"]["train"], tuple(meta["latent_shape"])
  check_k(int(rcfg.k), n, 1)
  kind = reduction_kind(n, shape, config)
  info = {"fingerprint": meta["fingerprint"], "embedding": rcfg.embedding,
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None,
          "latent_shape": list(shape), "reduce": kind}
  return meta, shards.codebook(encode_dir, meta), n, shape, kind, info


def build_index(directory: Path, config, encode_dir: Path,
                say: Callable[..., None] = log.info) -> dict:
  """Fits the reduced embedding, embeds the train split a chunk at a time,
  builds the index and saves it under `directory` (one process)."""
  from rissole_jax.store import shards
  directory, encode_dir = Path(directory), Path(encode_dir)
  meta, cb, n, shape, kind, info = _encoded(encode_dir, config)
  directory.mkdir(parents=True, exist_ok=True)
  remove(directory / "neighbours.json")
  shutil.rmtree(directory / "parts", ignore_errors=True)
  t0 = time.perf_counter()
  # A shard at a time: the codes of the whole database are never in memory.
  reduction = fit_reduction(lambda ids: shards.rows_at(encode_dir, meta, "train", ids), cb,
                            shape, config, n=n)
  emb = np.empty((n, embedding_dim(shape, config, reduction)), np.float32)
  for start, rows in shards.iter_shards(encode_dir, meta, "train"):
    emb[start:start + len(rows)] = embed_rows(rows, cb, config, reduction)
  embed_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  index = Index.build(emb, config, meta=info, reduction=reduction)
  build_s = time.perf_counter() - t0
  say("index: %s %s over %d x %d (embedding %s, reduced: %s)", index.backend, index.params,
      *emb.shape, config.retrieval.embedding, kind)
  index.save(directory)
  (directory / "parts").mkdir(exist_ok=True)
  return {"build_seconds": build_s, "embed_seconds": embed_s}


def search_share(directory: Path, config, encode_dir: Path, process_index: int = 0,
                 process_count: int = 1, limit: int | None = None,
                 progress: Callable[..., object] | None = None) -> dict:
  """This process's share of the neighbour tables: the saved index searched
  with an even, contiguous share of the rows of each split (`shards.share`,
  across shard boundaries), read from the shards a batch at a time: the
  process holds the index, one batch and its part of the table. One part file
  per split, named for its first row. limit: at most this many rows per split
  (benchmarks)."""
  from rissole_jax.store import shards
  directory, encode_dir = Path(directory), Path(encode_dir)
  meta, cb, n, _, _, _ = _encoded(encode_dir, config)
  k, qb = int(config.retrieval.k), int(config.retrieval.query_batch)
  # Every process searches with the index as saved (process 0 too), so the
  # tables cannot depend on which process built it.
  index = Index.load(directory, {"fingerprint": meta["fingerprint"], "n": n}, qb)
  t0, searched = time.perf_counter(), 0
  for split, n_split in meta["rows"].items():
    start, stop = shards.share(n_split, process_index, process_count, qb)
    stop = stop if limit is None else min(stop, start + limit)
    if stop <= start:
      continue
    ids = np.empty((stop - start, k), np.int32)
    bar = progress(total=stop - start, desc=f"neighbours ({split})") if progress else None
    # Batches on a grid of query_batch rows from row 0: every row is embedded
    # and searched in the same batch for any number of processes, so the
    # tables are the same bytes (a matrix product may round by batch size).
    for a in range(start, stop, qb):
      b = min(a + qb, stop)
      q = embed_rows(shards.read_rows(encode_dir, meta, split, a, b), cb, config,
                     index.reduction)
      ids[a - start:b - start] = index.search(q, k, np.arange(a, b) if split == "train"
                                              else None)[0]
      if bar is not None:
        bar.update(b - a)
    if bar is not None:
      bar.close()
    files.atomic_save_npy(directory / "parts" / f"{split}-{start:010d}.npy", ids)
    searched += stop - start
  seconds = time.perf_counter() - t0
  return {"neighbours_seconds": seconds, "queries_searched": searched,
          "queries_per_second": searched / max(seconds, 1e-9)}


def table_from_parts(directory: Path, split: str, rows: int, k: int) -> np.ndarray:
  """A split's (rows, k) neighbour table from the parts under directory/parts
  (each named for its first row), in row order; refuses parts that leave
  rows out or cover a row twice, naming the fix."""
  directory = Path(directory)
  fix = rerun_fix(directory, "index")
  parts = sorted((int(p.stem.rsplit("-", 1)[1]), p)
                 for p in (directory / "parts").glob(f"{split}-*.npy"))
  pieces, pos = [], 0
  for start, path in parts + [(rows, None)]:
    if start > pos:
      raise IndexMismatch(f"{directory / 'parts'} has no part for rows {pos}..{start} of the "
                          f"{split} split: a process did not search its share (or failed). "
                          + fix)
    if path is None:
      break
    part = np.load(path)
    if start < pos or start + len(part) > rows:
      raise IndexMismatch(
          f"{path} holds rows {start}..{start + len(part)} of the {split} split ({rows} rows), "
          f"but rows up to {pos} are in other parts: parts of two searches (e.g. with different "
          "numbers of processes) are mixed. " + fix)
    if part.shape[1:] != (k,):
      raise IndexMismatch(f"{path} has {part.shape[1:]} neighbours a row, not ({k},): a part "
                          "of another search. " + fix)
    pieces.append(part)
    pos += len(part)
  return np.concatenate(pieces) if pieces else np.zeros((0, k), np.int32)


def assemble_tables(directory: Path, config, encode_dir: Path,
                    say: Callable[..., None] = log.info) -> dict:
  """The neighbour tables from every process's parts, their manifest, and
  recall against exact search (one process, once every part is written)."""
  from rissole_jax.store import shards
  directory, encode_dir = Path(directory), Path(encode_dir)
  meta, cb, n, _, kind, info = _encoded(encode_dir, config)
  rcfg, k = config.retrieval, int(config.retrieval.k)
  index = Index.load(directory, {"fingerprint": meta["fingerprint"], "n": n}, rcfg.query_batch)
  tables = {split: table_from_parts(directory, split, meta["rows"].get(split, 0), k)
            for split in ("train", "heldout")}
  for split, table in tables.items():
    files.atomic_save_npy(directory / f"neighbours_{split}.npy", table)
  shutil.rmtree(directory / "parts", ignore_errors=True)
  write_manifest(directory / "neighbours.json",
                 ["neighbours_train.npy", "neighbours_heldout.npy"],
                 {**info, "k": k, "n_train": n, "n_heldout": len(tables["heldout"]),
                  "backend": index.backend, "params": index.params})

  held = shards.read_split(encode_dir, meta, "heldout")[0]
  m = 0 if held is None else min(len(held), _RECALL_QUERIES)
  exact_qps, recall = 0.0, 1.0
  dim = index.dim
  if m:  # exact search streamed over the shards, in the index's space
    q = embed_rows(held[:m], cb, config, index.reduction)
    t0 = time.perf_counter()
    _, exact_scores = exact_search_rows(encode_dir, meta, cb, config, q, k, index.reduction)
    exact_qps = m / (time.perf_counter() - t0)
    found = embed_rows(shards.rows_at(encode_dir, meta, "train", tables["heldout"][:m].ravel()),
                       cb, config, index.reduction)
    recall = recall_at_k(found, q, np.arange(m * k).reshape(m, k), exact_scores)
  out = {"recall_at_k": recall, "exact_queries_per_second": exact_qps, "n_database": n,
         "dim": dim, "k": k, "scann": float(index.backend == "scann")}
  say("recall@%d %.4f vs exact on %d held-out queries (exact %.0f qps)", k, recall, m, exact_qps)
  if index.reduction is not None and m:
    mf = min(m, _RECALL_QUERIES_FULL)
    out["recall_at_k_full_space"] = recall_in_full_space(
        encode_dir, meta, cb, config, held[:mf], tables["heldout"][:mf], k)
    say("recall@%d of the %s embedding vs exact search in the full space: %.4f (%d queries)",
        k, kind, out["recall_at_k_full_space"], mf)
  return out


_RECALL_QUERIES_FULL = 200  # the full space is large: fewer queries (streamed over the database)


def exact_search_rows(encode_dir: Path, meta: dict, codebook: np.ndarray | None, config,
                      queries: np.ndarray, k: int, reduction: Reduction | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """exact_search over the embeddings of the train split, streamed shard by
  shard (and chunk by chunk): for recall where the database cannot be held."""
  from rissole_jax.store import shards
  best_i = np.zeros((len(queries), 0), np.int64)
  best_s = np.zeros((len(queries), 0), np.float32)
  step = 16384
  for start, rows in shards.iter_shards(encode_dir, meta, "train"):
    for s in range(0, len(rows), step):
      emb = embed_rows(rows[s:s + step], codebook, config, reduction)
      i, sc = exact_search(emb, queries, min(k, len(emb)))
      ci, cs = np.concatenate([best_i, i + start + s], 1), np.concatenate([best_s, sc], 1)
      order = np.lexsort((ci, -cs), axis=1)[:, :k]
      best_i, best_s = np.take_along_axis(ci, order, 1), np.take_along_axis(cs, order, 1)
  return best_i.astype(np.int32), best_s


def recall_in_full_space(encode_dir: Path, meta: dict, codebook, config, query_rows, ids,
                         k: int) -> float:
  """recall@k of neighbour ids (found in a reduced space) against exact
  search in the full embedding space (streamed over the train shards)."""
  from rissole_jax.store import shards
  q = embed_rows(query_rows, codebook, config)
  _, exact_scores = exact_search_rows(encode_dir, meta, codebook, config, q, k)
  found = embed_rows(shards.rows_at(encode_dir, meta, "train", np.asarray(ids).ravel()),
                     codebook, config).reshape(*ids.shape, -1)
  true = np.einsum("qd,qkd->qk", q, found)
  return float((true >= exact_scores[:, -1:] - 1e-5).mean())
