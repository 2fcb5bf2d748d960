"""Embeddings: latents (or code indices) -> L2-normalised vectors, in the
full space or a reduced one (PCA, average pooling)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from rissole_jax import blocks
from rissole_jax.errors import ConfigError, check_choice


EMBEDDINGS = ("full", "first_block")
_CHUNK = 65536  # rows per step when embedding or scoring, to bound memory


# ---------------------------------------------------------------------------
# Embeddings.

def embed(latents: np.ndarray, config, reduction: "Reduction | None" = None) -> np.ndarray:
  """(N, h, w, c) latents -> (N, d) float32 unit vectors.

  config.retrieval.embedding: 'full' (the flattened latent) or 'first_block'
  (block 0 of config.blocks.grid, what the authors' code retrieves with).
  reduction: the reduced embedding searched with (see `Reduction`); None: the full space.
  """
  mode, grid = config.retrieval.embedding, tuple(config.blocks.grid)
  check_choice("retrieval.embedding", mode, EMBEDDINGS)
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
  from rissole_jax.store import codes as codes_lib
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
  check_choice("retrieval.reduce", kind, REDUCTIONS)
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
