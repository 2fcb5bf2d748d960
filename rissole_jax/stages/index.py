"""Stage 'index': a nearest-neighbour index over the database latents and the
neighbour tables that training and evaluation read (no index calls in the
training loop):

  DIR/index/scann/ + index.json      the index (embeddings.npy for exact search)
  DIR/index/neighbours_train.npy     int32 (N, k): each item's k nearest, never itself
  DIR/index/neighbours_heldout.npy   int32 (M, k): each held-out item's k nearest
  DIR/index/neighbours.json          fingerprint, embedding, k, checksums
  DIR/index/metrics.json             recall_at_k vs exact, build_seconds, qps

Process 0 builds and writes; the others wait at the runner's barrier and read
the files afterwards (ScaNN's build is not a collective, and one copy on disk
keeps every process's neighbours identical by construction).
"""
from __future__ import annotations

from rissole_jax import retrieval


def run(ctx) -> dict:
  if not ctx.is_main:
    return {}
  meta, splits = retrieval.read_latents(ctx.dir("encode"))
  train, heldout = splits["train"][0], splits["heldout"][0]
  ctx.log("database: %d latents %s of %s; %d held-out queries; k=%d, embedding=%s",
          len(train), tuple(train.shape[1:]), meta["dataset"], len(heldout),
          ctx.config.retrieval.k, ctx.config.retrieval.embedding)
  metrics = retrieval.index_database(ctx.stage_dir, ctx.config, train, heldout,
                                     meta["fingerprint"], say=ctx.log, progress=ctx.progress)
  metrics.update(_label_agreement(splits, ctx.stage_dir))
  return metrics


def _label_agreement(splits, index_dir) -> dict:
  """Share of neighbours with the query's label: a cheap check that retrieval
  finds similar images (labelled datasets only)."""
  import numpy as np
  labels = splits["train"][1]
  out = {}
  for split in ("train", "heldout"):
    y = splits[split][1]
    nb = np.load(index_dir / f"neighbours_{split}.npy")
    if len(y) and (y >= 0).all():
      out[f"{split}_label_agreement"] = float((labels[nb] == y[:, None]).mean())
  return out
