"""Retrieval: the one place that knows embeddings, indexes, search and
neighbour tables.

  embed(latents, config)            -> (N, d) float32, L2-normalised
  Index.build(emb, config) / .search(queries, k, exclude_ids) / .save / Index.load
  exact_search(database, queries, k) -> the reference (matrix product + top-k)
  index_database(dir, config, ...)  -> index + neighbour tables on disk (index stage)
  load_database(config, root)       -> Database (what training and sampling read)
  build_database(ae, source, config, out_dir) -> Database (database swap)

Similarity is the dot product of L2-normalised embeddings (cosine). Every file
is written atomically and listed, with its size and sha256, in a small JSON
manifest written last; readers verify the manifest, so an interrupted or
damaged build is refused with a message naming the file and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks
from rissole_jax import workdir as wd
from rissole_jax.errors import ConfigError, IndexMismatch

log = logging.getLogger(__name__)

EMBEDDINGS = ("full", "first_block")
BACKENDS = ("auto", "scann", "exact")
STRUCTURES = ("auto", "brute", "ah", "tree")
_CHUNK = 65536  # rows per step when embedding or scoring, to bound memory
_RECALL_QUERIES = 2000  # held-out queries checked against exact search (plenty for recall)


# ---------------------------------------------------------------------------
# Embeddings.

def embed(latents: np.ndarray, config) -> np.ndarray:
  """(N, h, w, c) latents -> (N, d) float32 unit vectors.

  config.retrieval.embedding: 'full' (the flattened latent) or 'first_block'
  (block 0 of config.blocks.grid, what the authors' code retrieves with).
  """
  mode, grid = config.retrieval.embedding, tuple(config.blocks.grid)
  if mode not in EMBEDDINGS:
    raise ConfigError(f"retrieval.embedding={mode!r} is unknown; use one of {EMBEDDINGS}.")
  latents = np.asarray(latents)
  if latents.ndim != 4:
    raise ValueError(f"embed expects latents (N, h, w, c), got shape {latents.shape}.")
  if mode == "first_block":
    blocks.check_grid(latents.shape[1:], grid)
  out = np.empty((len(latents), embedding_dim(latents.shape[1:], config)), np.float32)
  for s in range(0, len(latents), _CHUNK):  # chunks: no full-size temporaries
    z = np.asarray(latents[s:s + _CHUNK], np.float32)
    if mode == "first_block":
      z = blocks.split(z, grid)[:, 0]
    out[s:s + len(z)] = normalize(z.reshape(len(z), -1))
  return out


def embedding_dim(latent_shape, config) -> int:
  h, w, c = (int(x) for x in latent_shape)
  if config.retrieval.embedding == "first_block":
    bh, bw = blocks.check_grid((h, w, c), config.blocks.grid)
    return bh * bw * c
  return h * w * c


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (an all-zero row stays zero)."""
  x = np.asarray(x, np.float32)
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(n, 1e-12)


# ---------------------------------------------------------------------------
# Exact search: the reference, and the fallback where ScaNN is missing.

def exact_search(database: np.ndarray, queries: np.ndarray, k: int,
                 query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Top-k database rows by dot product: ids int32 (Q, k), scores float32 (Q, k).

  A matrix product and top-k in JAX (about 2x faster than NumPy's argpartition
  on CPU), over database chunks so a score matrix stays under ~256 MiB; shapes
  are padded to stay fixed, so it compiles once per (query_batch, chunk, k).
  Rows are sorted by score, ties by id among the candidates.
  """
  n = len(database)
  _check_k(k, n)
  queries = np.asarray(queries, np.float32)
  nq = len(queries)
  ids = np.empty((nq, k), np.int32)
  scores = np.empty((nq, k), np.float32)
  qb = max(1, min(query_batch, nq))
  chunk = max(k, min(n, (64 << 20) // qb))
  for qs in range(0, nq, qb):
    q = _pad_rows(queries[qs:qs + qb], qb)
    cand_i, cand_s = [], []
    for ds in range(0, n, chunk):
      rows = np.asarray(database[ds:ds + chunk], np.float32)
      s, i = _chunk_top_k(q, _pad_rows(rows, chunk), len(rows), k)
      cand_i.append(np.asarray(i) + ds)
      cand_s.append(np.asarray(s))
    ci, cs = np.concatenate(cand_i, 1), np.concatenate(cand_s, 1)
    order = np.lexsort((ci, -cs), axis=1)[:, :k]
    m = min(qb, nq - qs)
    ids[qs:qs + m] = np.take_along_axis(ci, order, 1)[:m]
    scores[qs:qs + m] = np.take_along_axis(cs, order, 1)[:m]
  return ids, scores


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


@functools.partial(jax.jit, static_argnames="k")
def _chunk_top_k(q, chunk, valid, k):
  s = q @ chunk.T
  s = jnp.where(jnp.arange(chunk.shape[0]) < valid, s, -jnp.inf)  # padded rows never win
  return jax.lax.top_k(s, k)


def recall_at_k(database: np.ndarray, queries: np.ndarray, approx_ids: np.ndarray,
                exact_scores: np.ndarray) -> float:
  """Fraction of the true top-k found, counting ties as found: an approximate
  result counts if it scores at least the k-th exact score (so exact
  duplicates in the database cannot make a correct answer look wrong)."""
  if len(queries) == 0:
    return 1.0
  true = np.einsum("qd,qkd->qk", queries, database[approx_ids])
  hits = true >= exact_scores[:, -1:] - 1e-5
  return float(hits.mean())


def _check_k(k: int, n: int, excluded: int = 0) -> None:
  """k results must exist: k + excluded ids per query <= n database rows."""
  if k < 1:
    raise ConfigError(f"retrieval.k must be at least 1, got {k}.")
  if k + excluded > n:
    why = (" must be smaller than the database size ({n} items); an item is never "
           "its own neighbour" if excluded == 1 else
           f" plus {excluded} excluded ids must not exceed the database size ({n} items)"
           if excluded else " must not exceed the database size ({n} items)")
    raise ConfigError(
        f"retrieval.k={k}{why.format(n=n)}. Fix: set --config.retrieval.k to at most "
        f"{max(n - excluded, 0)}, or use a larger database.")


# ---------------------------------------------------------------------------
# The index.

def resolve_backend(name: str) -> str:
  """'auto' -> 'scann' where it imports, else 'exact' (with a one-line warning)."""
  if name not in BACKENDS:
    raise ConfigError(f"retrieval.backend={name!r} is unknown; use one of {BACKENDS}.")
  if name == "exact":
    return "exact"
  try:
    import scann  # noqa: F401
    return "scann"
  except ImportError as e:
    if name == "scann":
      raise ConfigError(
          f"retrieval.backend='scann' but ScaNN cannot be imported ({e}). Fix: "
          "pip install scann (Linux x86_64 wheels), or set --config.retrieval.backend=auto "
          "(exact search where ScaNN is missing) or =exact.") from e
    log.warning("ScaNN is not importable (%s); using exact search (slower, same results).", e)
    return "exact"


def plan(n: int, k: int, rcfg) -> dict:
  """ScaNN structure and parameters for a database of n rows; config values
  win, zeros mean 'choose by size' (RDM's rule: brute force for small
  databases, asymmetric hashing (AH) for medium, a tree of ~sqrt(n) leaves
  with AH inside it for large)."""
  structure = rcfg.structure
  if structure not in STRUCTURES:
    raise ConfigError(f"retrieval.structure={structure!r} is unknown; use one of {STRUCTURES}.")
  if structure == "auto":
    structure = ("brute" if n < rcfg.brute_max else "ah" if n < rcfg.ah_max else "tree")
  p = {"structure": structure}
  if structure in ("ah", "tree"):
    p.update(dims_per_block=int(rcfg.dims_per_block),
             anisotropic_threshold=float(rcfg.anisotropic_threshold),
             reorder=int(rcfg.reorder or 10 * k),
             training_sample_size=int(rcfg.training_sample_size or min(n, 250_000)))
  if structure == "tree":
    leaves = int(rcfg.num_leaves or max(1, round(math.sqrt(n))))
    if leaves > n:
      raise ConfigError(f"retrieval.num_leaves={leaves} exceeds the database size {n}.")
    p.update(num_leaves=leaves,
             num_leaves_to_search=int(min(leaves, rcfg.num_leaves_to_search
                                          or max(1, round(leaves / 20)))))
  return p


class Index:
  """k-nearest-neighbour search by dot product over unit vectors.

  Built by ScaNN (structure from `plan`) or, for backend 'exact', a plain
  matrix product; both answer `search` the same way.
  """

  def __init__(self, backend: str, n: int, dim: int, params: dict, searcher=None,
               embeddings: np.ndarray | None = None, query_batch: int = 1024,
               meta: dict | None = None):
    self.backend, self.n, self.dim, self.params = backend, n, dim, params
    self.query_batch = int(query_batch)
    self.meta = dict(meta or {})  # provenance, saved with the index
    self._searcher, self._emb = searcher, embeddings

  @classmethod
  def build(cls, embeddings: np.ndarray, config, meta: dict | None = None) -> "Index":
    rcfg = config.retrieval
    emb = np.ascontiguousarray(embeddings, np.float32)
    n, dim = emb.shape
    _check_k(rcfg.k, n, 1)  # the neighbour tables exclude the query itself
    backend = resolve_backend(rcfg.backend)
    if backend == "exact":
      return cls("exact", n, dim, {"structure": "exact"}, embeddings=emb,
                 query_batch=rcfg.query_batch, meta=meta)
    params = plan(n, rcfg.k, rcfg)
    return cls("scann", n, dim, params, searcher=_build_scann(emb, rcfg.k, params),
               query_batch=rcfg.query_batch, meta=meta)

  def search(self, queries: np.ndarray, k: int,
             exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 (Q, k) and scores float32 (Q, k), best first.

    exclude_ids: (Q,) or (Q, m) database ids never to return for each query
    (-1: none), e.g. np.arange(N) so that database items do not find
    themselves. Exclusion is by id, not position: with exact duplicates the
    query's twin may rank above the query itself, and it stays a neighbour.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be (Q, {self.dim}), got {queries.shape}.")
    excl = None
    if exclude_ids is not None:
      excl = np.asarray(exclude_ids).reshape(len(queries), -1)
    m = 0 if excl is None else excl.shape[1]
    _check_k(k, self.n, m)
    ids = np.empty((len(queries), k), np.int32)
    scores = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), self.query_batch):
      e = None if excl is None else excl[s:s + self.query_batch]
      ids[s:s + self.query_batch], scores[s:s + self.query_batch] = self._search_batch(
          queries[s:s + self.query_batch], k, e)
    return ids, scores

  def _search_batch(self, q, k, excl):
    m = 0 if excl is None else excl.shape[1]
    i, s = self._raw(q, k + m)
    keep = np.isfinite(s)  # ScaNN pads with NaN when it finds too few
    if excl is not None:
      keep &= ~(i[:, :, None] == excl[:, None, :]).any(-1)
    short = keep.sum(1) < k
    if short.any() and self.backend == "scann":
      # A tree search can see too few candidates; search those rows everywhere.
      i2, s2 = self._raw(q[short], k + m, everywhere=True)
      k2 = np.isfinite(s2)
      if excl is not None:
        k2 &= ~(i2[:, :, None] == excl[short][:, None, :]).any(-1)
      i[short], s[short], keep[short] = i2, s2, k2
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # first k kept, in order
    return (np.take_along_axis(i, first, 1).astype(np.int32),
            np.take_along_axis(s, first, 1).astype(np.float32))

  def _raw(self, q, kk, everywhere=False):
    if self.backend == "exact":
      return exact_search(self._emb, q, kk, self.query_batch)
    p = self.params
    kw = {"final_num_neighbors": kk}
    if p["structure"] in ("ah", "tree"):
      kw["pre_reorder_num_neighbors"] = max(p["reorder"], kk)
    if p["structure"] == "tree":
      kw["leaves_to_search"] = p["num_leaves"] if everywhere else p["num_leaves_to_search"]
    i, s = self._searcher.search_batched_parallel(q, **kw)
    return np.asarray(i).astype(np.int64), np.asarray(s, np.float32)

  # -- persistence ---------------------------------------------------------

  def save(self, directory: Path) -> None:
    """Writes the index under `directory` (scann/ or embeddings.npy, then index.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove(directory / "index.json")  # stale manifest first: a crash leaves "missing"
    if self.backend == "scann":
      # ScaNN writes a folder; relative paths so it loads after the rename.
      _atomic_dir(directory / "scann",
                  lambda d: self._searcher.serialize(str(d), relative_path=True))
      files = sorted(f"scann/{p.name}" for p in (directory / "scann").iterdir())
    else:
      wd.atomic_save_npy(directory / "embeddings.npy", self._emb)
      files = ["embeddings.npy"]
    write_manifest(directory / "index.json", files, {
        **self.meta, "backend": self.backend, "n": self.n, "dim": self.dim,
        "params": self.params})

  @classmethod
  def load(cls, directory: Path, expect: dict | None = None,
           query_batch: int = 1024) -> "Index":
    """The index saved under `directory`; `expect` ({key: value} of its
    metadata, e.g. fingerprint, embedding, n) must match or IndexMismatch."""
    directory = Path(directory)
    meta = read_manifest(directory / "index.json", "index")
    _expect(meta, expect or {}, directory / "index.json", "index")
    own = {k: meta[k] for k in ("backend", "n", "dim", "params")}
    extra = {k: v for k, v in meta.items() if k not in own and k != "files"}
    if own["backend"] == "exact":
      emb = np.load(directory / "embeddings.npy")
      return cls("exact", own["n"], own["dim"], own["params"], embeddings=emb,
                 query_batch=query_batch, meta=extra)
    resolve_backend("scann")  # a clear error if ScaNN is missing here
    from scann.scann_ops.py import scann_ops_pybind
    searcher = scann_ops_pybind.load_searcher(str(directory / "scann"))
    return cls("scann", own["n"], own["dim"], own["params"], searcher=searcher,
               query_batch=query_batch, meta=extra)


def _build_scann(emb: np.ndarray, k: int, p: dict):
  from scann.scann_ops.py import scann_ops_pybind
  b = scann_ops_pybind.builder(emb, k, "dot_product")
  if p["structure"] == "tree":
    # Spherical k-means: embeddings are unit vectors, and plain k-means leaves
    # favour large-norm centroids under dot product (recall@10 0.81 -> 0.998
    # on 100k synthetic vectors at the same leaves searched; docs/retrieval.md).
    b = b.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
               training_sample_size=p["training_sample_size"], spherical=True)
  if p["structure"] == "brute":
    b = b.score_brute_force()
  else:
    b = b.score_ah(p["dims_per_block"],
                   anisotropic_quantization_threshold=p["anisotropic_threshold"],
                   training_sample_size=p["training_sample_size"]).reorder(p["reorder"])
  return b.build()


# ---------------------------------------------------------------------------
# Manifests: a JSON file listing files with size and sha256, written last.

def write_manifest(path: Path, files, meta: dict) -> None:
  path = Path(path)
  listed = {f: {"bytes": (path.parent / f).stat().st_size, "sha256": _sha256(path.parent / f)}
            for f in files}
  wd.atomic_write_json(path, {**meta, "files": listed})


def read_manifest(path: Path, what: str) -> dict:
  """The manifest's metadata, after checking every file it lists."""
  path = Path(path)
  fix = _fix(path.parent, what)
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise IndexMismatch(f"{path} is missing: the {what} was never finished (or was "
                        f"interrupted). {fix}") from None
  except json.JSONDecodeError as e:
    raise IndexMismatch(f"{path} is damaged ({e}). {fix}") from None
  for name, info in meta.get("files", {}).items():
    f = path.parent / name
    if not f.is_file():
      raise IndexMismatch(f"{f} is missing (listed in {path.name}). {fix}")
    size = f.stat().st_size
    if size != info["bytes"]:
      raise IndexMismatch(f"{f} is truncated or changed: {size} bytes, {info['bytes']} "
                          f"expected. {fix}")
    if _sha256(f) != info["sha256"]:
      raise IndexMismatch(f"{f} is damaged: its checksum differs from {path.name}. {fix}")
  return meta


def _fix(directory: Path, what: str) -> str:
  stage = {"latents": "encode", "index": "index", "neighbour tables": "index"}.get(what, what)
  return (f"Fix: delete {directory} and run the {stage} stage again "
          f"(python -m rissole_jax.main ... --only {stage}), or rebuild the database.")


def _expect(meta: dict, expect: dict, path: Path, what: str) -> None:
  diffs = [f"{k}: {_show(meta.get(k))} in the {what}, {_show(v)} expected"
           for k, v in expect.items() if _norm(meta.get(k)) != _norm(v)]
  if diffs:
    cause = ("made by a different autoencoder" if any(d.startswith("fingerprint") for d in diffs)
             else "made with a different config")
    raise IndexMismatch(f"{path} was {cause}:\n  " + "\n  ".join(diffs) + "\n"
                        + _fix(path.parent, what))


def _norm(v):
  return json.loads(json.dumps(v, default=wd._json_default))  # tuples == lists


def _show(v):
  return repr(_norm(v))


def _sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _remove(path: Path) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
  """Fills a temporary folder beside `target`, then renames it into place."""
  target = Path(target)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an index is for everyone
  try:
    fill(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if target.exists():
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "x")
  os.replace(tmp, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Latent files (the encode stage's output).

def encode_source(autoencoder, source, batch_size: int,
                  progress=None) -> tuple[np.ndarray, np.ndarray]:
  """Every row of `source` through the autoencoder: latents (N, h, w, c) float32
  and labels (N,) int32, in source order. Reads a few batches at a time so big
  datasets never sit in memory as float images."""
  from rissole_jax.data import to_float
  n = len(source)
  latents = np.empty((n, *autoencoder.latent_shape), np.float32)
  labels = np.empty((n,), np.int32)
  step = batch_size * 8
  for s in range(0, n, step):
    images, lab = source.get(np.arange(s, min(s + step, n)))
    latents[s:s + len(images)] = autoencoder.encode(to_float(images), batch_size=batch_size)
    labels[s:s + len(images)] = lab
    if progress is not None:
      progress.update(len(images))
  return latents, labels


def save_latents(directory: Path, fingerprint: str, dataset: str,
                 splits: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> None:
  """Writes {split}.npy and {split}_labels.npy for each split ('train',
  'heldout'), then meta.json. splits: {name: (latents, labels, source name)}."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _remove(directory / "meta.json")
  files, shapes, sources = [], {}, {}
  for split, (z, labels, source_name) in splits.items():
    wd.atomic_save_npy(directory / f"{split}.npy", np.asarray(z, np.float32))
    wd.atomic_save_npy(directory / f"{split}_labels.npy", np.asarray(labels, np.int32))
    files += [f"{split}.npy", f"{split}_labels.npy"]
    shapes[split], sources[split] = list(z.shape), source_name
  latent_shape = list(next(iter(splits.values()))[0].shape[1:])
  write_manifest(directory / "meta.json", files, {
      "fingerprint": fingerprint, "dataset": dataset, "latent_shape": latent_shape,
      "shapes": shapes, "sources": sources})


def read_latents(directory: Path, mmap: bool = False) -> tuple[dict, dict]:
  """(meta, {split: (latents, labels)}) from an encode folder, verified."""
  directory = Path(directory)
  meta = read_manifest(directory / "meta.json", "latents")
  mode = "r" if mmap else None
  out = {split: (np.load(directory / f"{split}.npy", mmap_mode=mode),
                 np.load(directory / f"{split}_labels.npy"))
         for split in meta["shapes"]}
  return meta, out


# ---------------------------------------------------------------------------
# Index + neighbour tables (the index stage's output).

def index_database(directory: Path, config, train: np.ndarray, heldout: np.ndarray,
                   fingerprint: str, say: Callable[..., None] = log.info,
                   progress: Callable[..., object] | None = None) -> dict:
  """Builds the index over `train`, the neighbour tables for `train` (self
  excluded) and `heldout`, compares with exact search on (up to 2,000)
  held-out queries, and writes everything under `directory`. Returns the
  metrics. progress(total=, desc=) -> a tqdm-like bar, e.g. ctx.progress."""
  directory = Path(directory)
  rcfg, k = config.retrieval, int(config.retrieval.k)
  _check_k(k, len(train), 1)
  emb, q = embed(train, config), embed(heldout, config)
  meta = {"fingerprint": fingerprint, "embedding": rcfg.embedding,
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None,
          "latent_shape": list(train.shape[1:])}
  t0 = time.perf_counter()
  index = Index.build(emb, config, meta=meta)
  build_s = time.perf_counter() - t0
  say("index: %s %s over %d x %d", index.backend, index.params, *emb.shape)

  t0 = time.perf_counter()
  nb_train = _search_rows(index, emb, k, np.arange(len(emb)), progress, "neighbours (train)")
  train_s = time.perf_counter() - t0
  nb_heldout, qps = _timed_search(index, q, k)
  m = min(len(q), _RECALL_QUERIES)
  exact_qps, recall = _compare_with_exact(emb, q[:m], nb_heldout[:m], k, rcfg.query_batch)
  say("recall@%d %.4f vs exact on %d held-out queries; %.0f qps (exact %.0f qps)",
      k, recall, m, qps, exact_qps)

  directory.mkdir(parents=True, exist_ok=True)
  _remove(directory / "neighbours.json")
  index.save(directory)
  wd.atomic_save_npy(directory / "neighbours_train.npy", nb_train)
  wd.atomic_save_npy(directory / "neighbours_heldout.npy", nb_heldout)
  write_manifest(directory / "neighbours.json",
                 ["neighbours_train.npy", "neighbours_heldout.npy"],
                 {**meta, "k": k, "n_train": len(train), "n_heldout": len(heldout),
                  "backend": index.backend, "params": index.params})
  return {"recall_at_k": recall, "build_seconds": build_s, "queries_per_second": qps,
          "exact_queries_per_second": exact_qps, "neighbours_train_seconds": train_s,
          "n_database": len(train), "dim": emb.shape[1], "k": k,
          "scann": float(index.backend == "scann")}


def _search_rows(index, emb, k, exclude, progress, desc):
  """Neighbour table for database rows, in pieces so a progress bar can move."""
  out = np.empty((len(emb), k), np.int32)
  step = max(index.query_batch, 8192)
  bar = progress(total=len(emb), desc=desc) if progress else None
  for s in range(0, len(emb), step):
    out[s:s + step], _ = index.search(emb[s:s + step], k, exclude[s:s + step])
    if bar is not None:
      bar.update(len(out[s:s + step]))
  if bar is not None:
    bar.close()
  return out


def _timed_search(index, q, k):
  """(neighbours of the queries q, queries per second)."""
  if len(q) == 0:
    return np.zeros((0, k), np.int32), 0.0
  index.search(q[:64], k)  # warm up (first-call costs)
  t0 = time.perf_counter()
  ids, _ = index.search(q, k)
  return ids, len(q) / (time.perf_counter() - t0)


def _compare_with_exact(emb, q, ids, k, query_batch):
  """(exact qps, recall@k of `ids` against exact search) on queries q."""
  if len(q) == 0:
    return 0.0, 1.0
  exact_search(emb, q[:query_batch], k, query_batch)  # compile outside the clock
  t0 = time.perf_counter()
  _, exact_scores = exact_search(emb, q, k, query_batch)
  exact_qps = len(q) / (time.perf_counter() - t0)
  return exact_qps, recall_at_k(emb, q, ids, exact_scores)


# ---------------------------------------------------------------------------
# The database as downstream code sees it.

@dataclasses.dataclass
class Database:
  """Latents, labels and neighbour tables; what training and sampling read.

  neighbours[i] are the k ids (into `latents`) nearest to item i, never i
  itself; heldout_neighbours[j] are the k ids nearest to held-out item j.
  Held-out arrays have 0 rows for a swapped-in database.
  """
  latents: np.ndarray             # (N, h, w, c) float32
  labels: np.ndarray              # (N,) int32, -1 where unknown
  neighbours: np.ndarray          # (N, k) int32
  heldout_latents: np.ndarray     # (M, h, w, c) float32
  heldout_labels: np.ndarray      # (M,) int32
  heldout_neighbours: np.ndarray  # (M, k) int32
  fingerprint: str                # of the autoencoder that made the latents
  embedding: str                  # full | first_block
  k: int
  dataset: str
  index_dir: Path

  def __len__(self) -> int:
    return len(self.latents)

  def load_index(self, config=None) -> Index:
    """The saved index (for new queries: `index.search(embed(z, config), k)`).
    Where ScaNN made it but is missing here, exact search over the latents."""
    qb = config.retrieval.query_batch if config is not None else 1024
    if _read_json(self.index_dir / "index.json").get("backend") == "scann":
      try:
        import scann  # noqa: F401
      except ImportError as e:
        log.warning("ScaNN is not importable (%s); using exact search (slower, same results).", e)
        if config is None:
          raise ConfigError("load_index(config) needs the config to embed the latents for "
                            "exact search where ScaNN is missing.") from e
        emb = embed(self.latents, config)
        return Index("exact", *emb.shape, {"structure": "exact"}, embeddings=emb,
                     query_batch=qb)
    return Index.load(self.index_dir, {"fingerprint": self.fingerprint, "n": len(self)}, qb)


def open_database(encode_dir: Path, index_dir: Path, config,
                  fingerprint: str | None = None, mmap: bool = False) -> Database:
  """A Database from an encode folder and an index folder, after checking that
  both are complete, come from the same autoencoder (and `fingerprint`, if
  given), and match config.retrieval (k, embedding, grid)."""
  enc, splits = read_latents(encode_dir, mmap)
  nmeta = read_manifest(Path(index_dir) / "neighbours.json", "neighbour tables")
  rcfg = config.retrieval
  want = {"fingerprint": enc["fingerprint"], "k": int(rcfg.k), "embedding": rcfg.embedding,
          "n_train": enc["shapes"]["train"][0],
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None}
  _expect(nmeta, want, Path(index_dir) / "neighbours.json", "neighbour tables")
  if fingerprint is not None and enc["fingerprint"] != fingerprint:
    raise IndexMismatch(
        f"{encode_dir} holds latents made by another autoencoder ({enc['fingerprint']}, "
        f"this one is {fingerprint}). " + _fix(Path(encode_dir), "latents"))
  train_z, train_y = splits["train"]
  shape = train_z.shape[1:]
  held_z, held_y = splits.get("heldout", (np.zeros((0, *shape), np.float32),
                                          np.zeros((0,), np.int32)))
  return Database(
      latents=train_z, labels=train_y,
      neighbours=np.load(Path(index_dir) / "neighbours_train.npy"),
      heldout_latents=held_z, heldout_labels=held_y,
      heldout_neighbours=np.load(Path(index_dir) / "neighbours_heldout.npy"),
      fingerprint=enc["fingerprint"], embedding=rcfg.embedding, k=int(rcfg.k),
      dataset=enc["dataset"], index_dir=Path(index_dir))


def load_database(config, root: Path, fingerprint: str | None = None,
                  mmap: bool = False) -> Database:
  """The database made by the encode and index stages under workdir `root`."""
  root = Path(root)
  return open_database(root / "encode", root / "index", config, fingerprint, mmap)


def build_database(autoencoder, source, config, out_dir: Path, say: Callable[..., None] = log.info,
                   progress=None) -> Database:
  """Encodes `source` (e.g. another dataset's train split) with `autoencoder`,
  indexes it and writes its neighbour table under out_dir/{encode,index}:
  RDM's database swap, no retraining. A complete database already there,
  made from the same source, autoencoder and retrieval config, is reused.

  With several processes every one must call this (the encoder may be a
  collective); process 0 writes, the others wait for it and then read.
  """
  from rissole_jax import parallel
  out_dir = Path(out_dir)
  try:
    db = open_database(out_dir / "encode", out_dir / "index", config, autoencoder.fingerprint)
    if _source_name(out_dir / "encode") == source.name:
      say("database: reusing %s (%d items of %s)", out_dir, len(db), source.name)
      return db
  except IndexMismatch:
    pass
  say("database: encoding %d items of %s", len(source), source.name)
  bar = progress(total=len(source), desc="encode") if progress else None
  z, y = encode_source(autoencoder, source, config.encode.batch_size, bar)
  if bar is not None:
    bar.close()
  if parallel.process_info()[0] == 0:
    empty = (np.zeros((0, *z.shape[1:]), np.float32), np.zeros((0,), np.int32), "")
    save_latents(out_dir / "encode", autoencoder.fingerprint, source.name,
                 {"train": (z, y, source.name), "heldout": empty})
    index_database(out_dir / "index", config, z, empty[0], autoencoder.fingerprint, say, progress)
  parallel.sync(f"build_database:{out_dir}")
  return open_database(out_dir / "encode", out_dir / "index", config, autoencoder.fingerprint)


def _source_name(encode_dir: Path) -> str | None:
  return _read_json(Path(encode_dir) / "meta.json").get("sources", {}).get("train")


def _read_json(path: Path) -> dict:
  """A JSON file's contents, {} if absent or unreadable (callers verify later)."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return {}
