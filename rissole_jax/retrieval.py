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

def embed(latents: np.ndarray, config, reduction: "Reduction | None" = None) -> np.ndarray:
  """(N, h, w, c) latents -> (N, d) float32 unit vectors.

  config.retrieval.embedding: 'full' (the flattened latent) or 'first_block'
  (block 0 of config.blocks.grid, what the authors' code retrieves with).
  reduction: the reduced embedding searched with (see `Reduction`); None: the full space.
  """
  mode, grid = config.retrieval.embedding, tuple(config.blocks.grid)
  if mode not in EMBEDDINGS:
    raise ConfigError(f"retrieval.embedding={mode!r} is unknown; use one of {EMBEDDINGS}.")
  latents = np.asarray(latents) if not hasattr(latents, "shape") else latents
  if latents.ndim != 4:
    raise ValueError(f"embed expects latents (N, h, w, c), got shape {latents.shape}.")
  if mode == "first_block":
    blocks.check_grid(latents.shape[1:], grid)
  out = np.empty((len(latents), embedding_dim(latents.shape[1:], config, reduction)), np.float32)
  for s in range(0, len(latents), _CHUNK):  # chunks: no full-size temporaries
    out[s:s + _CHUNK] = _embed_chunk(np.asarray(latents[s:s + _CHUNK], np.float32), config,
                                     reduction)
  return out


def _embed_chunk(z, config, reduction):
  if config.retrieval.embedding == "first_block":
    z = blocks.split(z, tuple(config.blocks.grid))[:, 0]
  if reduction is not None and reduction.pool > 1:
    p = reduction.pool
    n, h, w, c = z.shape
    z = z.reshape(n, h // p, p, w // p, p, c).mean((2, 4))
  v = normalize(z.reshape(len(z), -1))
  if reduction is not None and reduction.matrix is not None:
    v = normalize(v @ reduction.matrix)
  return v


def embed_rows(rows: np.ndarray, codebook: np.ndarray | None, config,
               reduction: "Reduction | None" = None) -> np.ndarray:
  """embed() of database rows: code indices (N, h, w) with their codebook, or
  float latents (codebook None); decoded a chunk at a time, so a database of
  codes never exists as float latents."""
  if codebook is None:
    return embed(rows, config, reduction)
  from rissole_jax import codes as codes_lib
  shape = (*rows.shape[1:], codebook.shape[1])
  out = np.empty((len(rows), embedding_dim(shape, config, reduction)), np.float32)
  step = max(1, (64 << 20) // (4 * int(np.prod(shape))))  # ~64 MiB of float latents a chunk
  for s in range(0, len(rows), step):
    out[s:s + step] = embed(codes_lib.from_codes(rows[s:s + step], codebook), config, reduction)
  return out


def embedding_dim(latent_shape, config, reduction: "Reduction | None" = None) -> int:
  h, w, c = (int(x) for x in latent_shape)
  if config.retrieval.embedding == "first_block":
    h, w = blocks.check_grid((h, w, c), config.blocks.grid)[:2]
  if reduction is not None:
    if reduction.matrix is not None:
      return reduction.matrix.shape[1]
    return (h // reduction.pool) * (w // reduction.pool) * c
  return h * w * c


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (an all-zero row stays zero)."""
  x = np.asarray(x, np.float32)
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(n, 1e-12)


# ---------------------------------------------------------------------------
# Reduced embeddings: large latents (ImageNet at f=8: 28x28x32 = 25,088
# dimensions) are searched in a smaller space; docs/retrieval.md has recall@k
# of each against exact search in the full space.

REDUCTIONS = ("auto", "none", "pca", "pool")
_PCA_SAMPLE = 8192  # rows the PCA is fitted on: a fixed, evenly spread sample


@dataclasses.dataclass
class Reduction:
  """Full embedding -> the one searched. kind 'none'; 'pool' (the latent
  averaged over pool x pool cells before embedding); 'pca' (the unit vectors
  projected on their top `dim` principal directions, uncentred, so dot
  products are kept as well as they can be, then normalised again)."""
  kind: str
  pool: int = 1
  matrix: np.ndarray | None = None  # (d_full, dim) for pca

  def describe(self) -> dict:
    return {"kind": self.kind, "pool": self.pool,
            "dim": None if self.matrix is None else int(self.matrix.shape[1])}


def reduction_kind(n: int, latent_shape, config) -> str:
  """config.retrieval.reduce, with 'auto' resolved by size as `plan` resolves
  the index: the full space where it has at most reduce_dim dimensions, or
  where brute force searches it (n < brute_max) and the n full embeddings fit
  in reduce_above_mb; PCA to reduce_dim otherwise (ScaNN's hashing and trees
  are built for a few hundred dimensions: on 25,088 its AH training alone
  takes minutes for 20k rows)."""
  rcfg = config.retrieval
  kind = rcfg.reduce
  if kind not in REDUCTIONS:
    raise ConfigError(f"retrieval.reduce={kind!r} is unknown; use one of {REDUCTIONS}.")
  if kind != "auto":
    return kind
  d = embedding_dim(latent_shape, config)
  brute = n < rcfg.brute_max and n * d * 4 <= rcfg.reduce_above_mb * 2**20
  return "none" if d <= rcfg.reduce_dim or brute else "pca"


def fit_reduction(rows, codebook: np.ndarray | None, latent_shape, config,
                  n: int | None = None) -> Reduction | None:
  """The reduction for a database of `rows` (codes or float latents; or a
  function ids -> rows, with n the number of rows); None for 'none'."""
  n = len(rows) if n is None else n
  kind, r = reduction_kind(n, latent_shape, config), int(config.retrieval.reduce_dim)
  if kind == "none":
    return None
  if r < 1:
    raise ConfigError(f"retrieval.reduce_dim={r} must be positive.")
  if kind == "pool":
    h, w, c = (int(x) for x in latent_shape)
    if config.retrieval.embedding == "first_block":
      h, w = blocks.check_grid((h, w, c), config.blocks.grid)[:2]
    g = math.gcd(h, w)
    # The finest pooling that fits reduce_dim (all cells pooled: c dimensions).
    pool = next((p for p in range(1, g + 1) if g % p == 0 and (h // p) * (w // p) * c <= r), g)
    return Reduction("pool", pool=pool)
  ids = np.linspace(0, n - 1, min(n, _PCA_SAMPLE)).astype(np.int64)
  x = embed_rows(np.asarray(rows(ids) if callable(rows) else rows[ids]), codebook, config)
  if r >= x.shape[1]:
    raise ConfigError(f"retrieval.reduce_dim={r} is not below the embedding's "
                      f"{x.shape[1]} dimensions. Fix: lower it, or set --config.retrieval.reduce=none.")
  return Reduction("pca", matrix=_top_directions(x, r))


def _top_directions(x: np.ndarray, r: int, seed: int = 0) -> np.ndarray:
  """(d, r): the top r right singular vectors of x (s, d), signs fixed.
  Randomized SVD (Halko et al. 2011, two power iterations) where d is large."""
  x = np.asarray(x, np.float32)
  if min(x.shape) <= 4 * r:
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
  else:
    rng = np.random.default_rng(seed)
    y = x @ rng.standard_normal((x.shape[1], r + 32)).astype(np.float32)
    for _ in range(2):
      y, _ = np.linalg.qr(y)
      y = x @ (x.T @ y)
    q, _ = np.linalg.qr(y)
    _, _, vt = np.linalg.svd((q.T @ x).astype(np.float64), full_matrices=False)
  v = vt[:r].T
  v *= np.sign(v[np.abs(v).argmax(0), np.arange(r)])  # a fixed sign per direction
  return np.ascontiguousarray(v, np.float32)


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
               meta: dict | None = None, reduction: Reduction | None = None):
    self.backend, self.n, self.dim, self.params = backend, n, dim, params
    self.query_batch = int(query_batch)
    self.meta = dict(meta or {})  # provenance, saved with the index
    self.reduction = reduction    # what queries go through (embed); saved with the index
    self._searcher, self._emb = searcher, embeddings

  def embed(self, latents: np.ndarray, config) -> np.ndarray:
    """Queries for this index: `embed` with the index's reduction."""
    return embed(latents, config, self.reduction)

  @classmethod
  def build(cls, embeddings: np.ndarray, config, meta: dict | None = None,
            reduction: Reduction | None = None) -> "Index":
    rcfg = config.retrieval
    emb = np.ascontiguousarray(embeddings, np.float32)
    n, dim = emb.shape
    _check_k(rcfg.k, n, 1)  # the neighbour tables exclude the query itself
    backend = resolve_backend(rcfg.backend)
    if backend == "exact":
      return cls("exact", n, dim, {"structure": "exact"}, embeddings=emb,
                 query_batch=rcfg.query_batch, meta=meta, reduction=reduction)
    params = plan(n, rcfg.k, rcfg)
    return cls("scann", n, dim, params, searcher=_build_scann(emb, rcfg.k, params),
               query_batch=rcfg.query_batch, meta=meta, reduction=reduction)

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
    reduction = {"kind": "none"}
    if self.reduction is not None:
      reduction = self.reduction.describe()
      if self.reduction.matrix is not None:
        wd.atomic_save_npy(directory / "projection.npy", self.reduction.matrix)
        files.append("projection.npy")
    write_manifest(directory / "index.json", files, {
        **self.meta, "backend": self.backend, "n": self.n, "dim": self.dim,
        "params": self.params, "reduction": reduction})

  @classmethod
  def load(cls, directory: Path, expect: dict | None = None,
           query_batch: int = 1024) -> "Index":
    """The index saved under `directory`; `expect` ({key: value} of its
    metadata, e.g. fingerprint, embedding, n) must match or IndexMismatch."""
    directory = Path(directory)
    meta = read_manifest(directory / "index.json", "index")
    _expect(meta, expect or {}, directory / "index.json", "index")
    own = {k: meta[k] for k in ("backend", "n", "dim", "params")}
    extra = {k: v for k, v in meta.items() if k not in own and k not in ("files", "reduction")}
    reduction = load_reduction(directory, meta)
    if own["backend"] == "exact":
      emb = np.load(directory / "embeddings.npy")
      return cls("exact", own["n"], own["dim"], own["params"], embeddings=emb,
                 query_batch=query_batch, meta=extra, reduction=reduction)
    resolve_backend("scann")  # a clear error if ScaNN is missing here
    from scann.scann_ops.py import scann_ops_pybind
    searcher = scann_ops_pybind.load_searcher(str(directory / "scann"))
    return cls("scann", own["n"], own["dim"], own["params"], searcher=searcher,
               query_batch=query_batch, meta=extra, reduction=reduction)


def load_reduction(directory: Path, meta: dict) -> Reduction | None:
  """The reduction recorded in an index's manifest (index.json, already verified)."""
  r = meta.get("reduction") or {"kind": "none"}
  if r["kind"] == "none":
    return None
  matrix = np.load(Path(directory) / "projection.npy") if r["kind"] == "pca" else None
  return Reduction(r["kind"], pool=int(r.get("pool") or 1), matrix=matrix)


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
# Latent files (the encode stage's output; shards.py knows their layout).

def encode_source(autoencoder, source, batch_size: int, progress=None, start: int = 0,
                  stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows [start, stop) of `source` through the autoencoder: latents (n, h, w, c)
  float32 and labels (n,) int32, in source order. Reads a few batches at a
  time so big datasets never sit in memory as float images."""
  from rissole_jax.data import to_float
  stop = len(source) if stop is None else stop
  latents = np.empty((stop - start, *autoencoder.latent_shape), np.float32)
  labels = np.empty((stop - start,), np.int32)
  step = batch_size * 8
  for s in range(start, stop, step):
    images, lab = source.get(np.arange(s, min(s + step, stop)))
    latents[s - start:s - start + len(images)] = autoencoder.encode(to_float(images),
                                                                    batch_size=batch_size)
    labels[s - start:s - start + len(images)] = lab
    if progress is not None:
      progress.update(len(images))
  return latents, labels


def save_latents(directory: Path, fingerprint: str, dataset: str,
                 splits: dict[str, tuple[np.ndarray, np.ndarray, str]],
                 codebook: np.ndarray | None = None, shard_rows: int = 1 << 30) -> None:
  """A whole database written by one process, as the encode stage writes it:
  splits {name: (latents, labels, source name)}; stored as code indices of
  `codebook` (refusing latents that are not its vectors), else as float32."""
  from rissole_jax import codes as codes_lib
  from rissole_jax import shards
  info = {}
  for split, (z, labels, name) in splits.items():
    for i, (a, b) in enumerate(shards.ranges(len(z), shard_rows)):
      rows = np.asarray(z[a:b], np.float32)
      if codebook is not None:
        rows = codes_lib.to_codes(rows, codebook)
      shards.write_shard(directory, split, i, a, rows, np.asarray(labels[a:b]), fingerprint)
    info[split] = (len(z), shard_rows, name)
  latent_shape = next(iter(splits.values()))[0].shape[1:]
  shards.finish(directory, fingerprint, dataset, codebook, info, latent_shape)


def read_latents(directory: Path) -> tuple[dict, dict]:
  """(meta, {split: (float latents, labels)}) of an encode folder, verified
  (codes looked up in the codebook: for small databases and tests)."""
  from rissole_jax import codes as codes_lib
  from rissole_jax import shards
  meta = shards.read_meta(directory)
  cb = shards.codebook(directory, meta)
  out = {}
  for split in meta["rows"]:
    rows, labels = shards.read_split(directory, meta, split)
    out[split] = (rows if cb is None else codes_lib.from_codes(rows, cb), labels)
  return meta, out


# ---------------------------------------------------------------------------
# Index + neighbour tables (the index stage's output).

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
  from rissole_jax import parallel
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
  from rissole_jax import shards
  rcfg = config.retrieval
  meta = shards.read_meta(encode_dir)
  n, shape = meta["rows"]["train"], tuple(meta["latent_shape"])
  _check_k(int(rcfg.k), n, 1)
  kind = reduction_kind(n, shape, config)
  info = {"fingerprint": meta["fingerprint"], "embedding": rcfg.embedding,
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None,
          "latent_shape": list(shape), "reduce": kind}
  return meta, shards.codebook(encode_dir, meta), n, shape, kind, info


def build_index(directory: Path, config, encode_dir: Path,
                say: Callable[..., None] = log.info) -> dict:
  """Fits the reduced embedding, embeds the train split a chunk at a time,
  builds the index and saves it under `directory` (one process)."""
  from rissole_jax import shards
  directory, encode_dir = Path(directory), Path(encode_dir)
  meta, cb, n, shape, kind, info = _encoded(encode_dir, config)
  directory.mkdir(parents=True, exist_ok=True)
  _remove(directory / "neighbours.json")
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
  from rissole_jax import shards
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
    wd.atomic_save_npy(directory / "parts" / f"{split}-{start:010d}.npy", ids)
    searched += stop - start
  seconds = time.perf_counter() - t0
  return {"neighbours_seconds": seconds, "queries_searched": searched,
          "queries_per_second": searched / max(seconds, 1e-9)}


def table_from_parts(directory: Path, split: str, rows: int, k: int) -> np.ndarray:
  """A split's (rows, k) neighbour table from the parts under directory/parts
  (each named for its first row), in row order; refuses parts that leave
  rows out or cover a row twice, naming the fix."""
  directory = Path(directory)
  fix = _fix(directory, "index")
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
  from rissole_jax import shards
  directory, encode_dir = Path(directory), Path(encode_dir)
  meta, cb, n, _, kind, info = _encoded(encode_dir, config)
  rcfg, k = config.retrieval, int(config.retrieval.k)
  index = Index.load(directory, {"fingerprint": meta["fingerprint"], "n": n}, rcfg.query_batch)
  tables = {split: table_from_parts(directory, split, meta["rows"].get(split, 0), k)
            for split in ("train", "heldout")}
  for split, table in tables.items():
    wd.atomic_save_npy(directory / f"neighbours_{split}.npy", table)
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
  from rissole_jax import shards
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
  from rissole_jax import shards
  q = embed_rows(query_rows, codebook, config)
  _, exact_scores = exact_search_rows(encode_dir, meta, codebook, config, q, k)
  found = embed_rows(shards.rows_at(encode_dir, meta, "train", np.asarray(ids).ravel()),
                     codebook, config).reshape(*ids.shape, -1)
  true = np.einsum("qd,qkd->qk", q, found)
  return float((true >= exact_scores[:, -1:] - 1e-5).mean())


# ---------------------------------------------------------------------------
# The database as downstream code sees it.

@dataclasses.dataclass
class Database:
  """Code indices (or float latents), labels and neighbour tables; what
  training and sampling read.

  neighbours[i] are the k ids (into the rows) nearest to item i, never i
  itself; heldout_neighbours[j] are the k ids nearest to held-out item j.
  Held-out arrays have 0 rows for a swapped-in database. `latents` looks the
  codes up in the codebook (the whole database as float32: for small ones).
  """
  rows: np.ndarray                # (N, h, w) uint8/uint16 codes, or (N, h, w, c) float32
  codebook: np.ndarray | None     # (K, c) float32; None: rows are float latents
  labels: np.ndarray              # (N,) int32, -1 where unknown
  neighbours: np.ndarray          # (N, k) int32
  heldout_rows: np.ndarray        # (M, ...) as rows
  heldout_labels: np.ndarray      # (M,) int32
  heldout_neighbours: np.ndarray  # (M, k) int32
  fingerprint: str                # of the autoencoder that made the latents
  embedding: str                  # full | first_block
  k: int
  dataset: str
  index_dir: Path

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def codes(self) -> np.ndarray | None:
    return self.rows if self.codebook is not None else None

  @property
  def latent_shape(self) -> tuple:
    if self.codebook is None:
      return tuple(self.rows.shape[1:])
    return (*self.rows.shape[1:], self.codebook.shape[1])

  @functools.cached_property
  def latents(self) -> np.ndarray:
    return self._float(self.rows)

  @functools.cached_property
  def heldout_latents(self) -> np.ndarray:
    return self._float(self.heldout_rows)

  def _float(self, rows):
    from rissole_jax import codes as codes_lib
    if self.codebook is None:
      return rows
    return codes_lib.from_codes(rows, self.codebook)

  def load_index(self, config=None) -> Index:
    """The saved index (for new queries: `index.search(index.embed(z, config), k)`).
    Where ScaNN made it but is missing here, exact search over the database."""
    qb = config.retrieval.query_batch if config is not None else 1024
    if _read_json(self.index_dir / "index.json").get("backend") == "scann":
      try:
        import scann  # noqa: F401
      except ImportError as e:
        log.warning("ScaNN is not importable (%s); using exact search (slower, same results).", e)
        if config is None:
          raise ConfigError("load_index(config) needs the config to embed the latents for "
                            "exact search where ScaNN is missing.") from e
        meta = read_manifest(self.index_dir / "index.json", "index")
        reduction = load_reduction(self.index_dir, meta)
        emb = embed_rows(self.rows, self.codebook, config, reduction)
        return Index("exact", *emb.shape, {"structure": "exact"}, embeddings=emb,
                     query_batch=qb, reduction=reduction)
    return Index.load(self.index_dir, {"fingerprint": self.fingerprint, "n": len(self)}, qb)


def open_database(encode_dir: Path, index_dir: Path, config,
                  fingerprint: str | None = None, mmap: bool = False) -> Database:
  """A Database from an encode folder and an index folder, after checking that
  both are complete, come from the same autoencoder (and `fingerprint`, if
  given), and match config.retrieval (k, embedding, grid, reduction)."""
  from rissole_jax import shards
  enc = shards.read_meta(encode_dir)
  nmeta = read_manifest(Path(index_dir) / "neighbours.json", "neighbour tables")
  nmeta.setdefault("reduce", "none")  # tables from before the reduced embeddings
  rcfg = config.retrieval
  n = enc["rows"]["train"]
  want = {"fingerprint": enc["fingerprint"], "k": int(rcfg.k), "embedding": rcfg.embedding,
          "n_train": n,
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None,
          "reduce": reduction_kind(n, enc["latent_shape"], config)}
  _expect(nmeta, want, Path(index_dir) / "neighbours.json", "neighbour tables")
  if fingerprint is not None and enc["fingerprint"] != fingerprint:
    raise IndexMismatch(
        f"{encode_dir} holds latents made by another autoencoder ({enc['fingerprint']}, "
        f"this one is {fingerprint}). " + _fix(Path(encode_dir), "latents"))
  cb = shards.codebook(encode_dir, enc)
  train_rows, train_y = shards.read_split(encode_dir, enc, "train", mmap=mmap)
  held_rows, held_y = shards.read_split(encode_dir, enc, "heldout", mmap=mmap)
  if held_rows is None:
    held_rows = np.zeros((0, *train_rows.shape[1:]), train_rows.dtype)
    held_y = np.zeros((0,), np.int32)
  return Database(
      rows=train_rows, codebook=cb, labels=train_y,
      neighbours=np.load(Path(index_dir) / "neighbours_train.npy"),
      heldout_rows=held_rows, heldout_labels=held_y,
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
  from rissole_jax import codes as codes_lib
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
                 {"train": (z, y, source.name), "heldout": empty},
                 codebook=codes_lib.codebook_of(getattr(autoencoder, "params", None)),
                 shard_rows=config.encode.shard_rows)
    index_database(out_dir / "index", config, out_dir / "encode", say, progress)
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
