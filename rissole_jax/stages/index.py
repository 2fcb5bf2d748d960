"""Stage 'index': a nearest-neighbour index over the database and the
neighbour tables that training and evaluation read (no index calls in the
training loop):

  DIR/index/scann/ + index.json      the index (embeddings.npy for exact search;
                                     projection.npy for a PCA-reduced embedding)
  DIR/index/neighbours_train.npy     int32 (N, k): each item's k nearest, never itself
  DIR/index/neighbours_heldout.npy   int32 (M, k): each held-out item's k nearest
  DIR/index/neighbours.json          fingerprint, embedding, reduction, k, checksums
  DIR/index/metrics.json             recall_at_k vs exact, build_seconds, qps

Process 0 builds the index and saves it (ScaNN's build is not a collective);
every process loads it and searches the neighbours of an even, contiguous
share of the rows of each split; process 0 assembles the tables (see
retrieval.index_database).
"""
from __future__ import annotations

import numpy as np

from rissole_jax import retrieval

from rissole_jax.store import shards
def run(ctx) -> dict:
  enc = ctx.dir("encode")
  meta = shards.read_meta(enc)
  ctx.log("database: %d items %s of %s; %d held-out queries; k=%d, embedding=%s; %d processes",
          meta["rows"]["train"], tuple(meta["latent_shape"]), meta["dataset"],
          meta["rows"].get("heldout", 0), ctx.config.retrieval.k,
          ctx.config.retrieval.embedding, ctx.process_count)
  metrics = retrieval.index_database(ctx.stage_dir, ctx.config, enc, say=ctx.log,
                                     progress=ctx.progress if ctx.progress_bars else None,
                                     process_index=ctx.process_index,
                                     process_count=ctx.process_count)
  if ctx.is_main:
    metrics.update(_label_agreement(enc, meta, ctx.stage_dir))
  return metrics


def _label_agreement(enc, meta, index_dir) -> dict:
  """Share of neighbours with the query's label: a cheap check that retrieval
  finds similar images (labelled datasets only)."""
  labels = shards.read_split(enc, meta, "train")[1]
  out = {}
  for split in ("train", "heldout"):
    y = shards.read_split(enc, meta, split)[1]
    nb = np.load(index_dir / f"neighbours_{split}.npy")
    if y is not None and len(y) and (y >= 0).all():
      out[f"{split}_label_agreement"] = float((labels[nb] == y[:, None]).mean())
  return out
