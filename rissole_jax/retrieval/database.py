"""The database as downstream code sees it: code indices (or float
latents), labels and neighbour tables, opened from a workdir or built for a
database swap."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from rissole_jax.errors import ConfigError, IndexMismatch
from rissole_jax.retrieval.embedding import embed_rows, reduction_kind
from rissole_jax.retrieval.index import Index, load_reduction
from rissole_jax.retrieval.latents import encode_source, save_latents
from rissole_jax.files import read_manifest, expect_meta, rerun_fix
from rissole_jax.retrieval.tables import index_database

log = logging.getLogger(__name__)


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
    from rissole_jax.store import codes as codes_lib
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
  from rissole_jax.store import shards
  enc = shards.read_meta(encode_dir)
  nmeta = read_manifest(Path(index_dir) / "neighbours.json", "neighbour tables")
  nmeta.setdefault("reduce", "none")  # tables from before the reduced embeddings
  rcfg = config.retrieval
  n = enc["rows"]["train"]
  want = {"fingerprint": enc["fingerprint"], "k": int(rcfg.k), "embedding": rcfg.embedding,
          "n_train": n,
          "grid": list(config.blocks.grid) if rcfg.embedding == "first_block" else None,
          "reduce": reduction_kind(n, enc["latent_shape"], config)}
  expect_meta(nmeta, want, Path(index_dir) / "neighbours.json", "neighbour tables")
  if fingerprint is not None and enc["fingerprint"] != fingerprint:
    raise IndexMismatch(
        f"{encode_dir} holds latents made by another autoencoder ({enc['fingerprint']}, "
        f"this one is {fingerprint}). " + rerun_fix(Path(encode_dir), "latents"))
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
  from rissole_jax.store import codes as codes_lib
  from rissole_jax.runtime import parallel
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
