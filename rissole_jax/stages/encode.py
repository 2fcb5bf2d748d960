"""Stage 'encode': the training split (the retrieval database) and the held-out
split through the trained VQ-GAN encoder, stored as code indices in shards
(layout in rissole_jax/store/shards.py):

  DIR/encode/codebook.npy                    (K, c) float32
  DIR/encode/{split}-{i:05d}.npy             (rows, h, w) uint8/uint16 codes
  DIR/encode/{split}-{i:05d}_labels.npy      int32 (rows,), -1 where unknown
  DIR/encode/{split}-{i:05d}.json            the shard's manifest
  DIR/encode/meta.json   fingerprint, dataset, shapes, every file's checksum

Each process encodes its own shards (every P-th, encode.shard_rows rows each)
on its own devices, so N images cost N / P per process and no process holds
more than a shard of latents; process 0 writes meta.json once every shard is
there. A rerun skips the shards already written (resumes).
"""
from __future__ import annotations

import time

import numpy as np

from rissole_jax.store import codes as codes_lib
from rissole_jax.runtime import parallel
from rissole_jax.store import shards
from rissole_jax.data import HELDOUT, TRAIN, load_source
from rissole_jax.data import loader


def load_autoencoder(config, vqgan_dir):
  """The trained VQ-GAN (imported here so this module imports without it)."""
  from rissole_jax.models.autoencoder import load_autoencoder as load
  return load(config, vqgan_dir)


def local_autoencoder(ae):
  """The autoencoder on this process's devices only: with several processes
  each encodes different images, so the encoder must not be a collective
  over a mesh that spans them."""
  import jax
  if jax.process_count() == 1 or not hasattr(ae, "mesh"):
    return ae
  from rissole_jax.models.autoencoder import Autoencoder
  mesh = parallel.local_mesh(ae.config.mesh)
  return Autoencoder(ae.config, jax.tree.map(parallel.to_host, ae.params), mesh)


def chunks_of(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
  """Rows [start, stop) as the reads the encoder takes (a few batches each)."""
  step = batch_size * 8
  return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def encode_rows(ae, chunks, n: int, batch_size: int, codebook: np.ndarray | None,
                bar=None) -> tuple[np.ndarray, np.ndarray]:
  """The next `n` rows of `chunks` (an iterator of {"image": float, "label"}
  reads) as code indices (float latents without a codebook), converted a few
  batches at a time: the shard never exists as float32."""
  shape = tuple(ae.latent_shape) if codebook is None else tuple(ae.latent_shape[:-1])
  dtype = np.float32 if codebook is None else codes_lib.code_dtype(len(codebook))
  rows, labels = np.empty((n, *shape), dtype), np.empty((n,), np.int32)
  direct = codebook is not None and hasattr(ae, "encode_codes")
  done = 0
  while done < n:
    chunk = next(chunks)
    e = done + len(chunk["image"])
    labels[done:e] = chunk["label"]
    if direct:  # the quantizer's indices: exact, and no nearest-code search
      rows[done:e] = ae.encode_codes(chunk["image"], batch_size=batch_size)
    else:
      z = ae.encode(chunk["image"], batch_size=batch_size)
      rows[done:e] = z if codebook is None else codes_lib.to_codes(z, codebook)
    if bar is not None:
      bar.update(e - done)
    done = e
  return rows, labels


def run(ctx) -> dict:
  cfg = ctx.config
  ae = load_autoencoder(cfg, ctx.dir("vqgan"))
  ctx.log("autoencoder %s: latent %s, f=%s", ae.fingerprint, tuple(ae.latent_shape), ae.f)
  codebook = codes_lib.codebook_of(getattr(ae, "params", None))
  local = local_autoencoder(ae)
  shard_rows = int(cfg.encode.shard_rows)
  info, metrics = {}, {}
  for split in (TRAIN, HELDOUT):
    source = load_source(cfg.data, split)
    ranges = shards.ranges(len(source), shard_rows)
    mine = shards.mine(len(ranges), ctx.process_index, ctx.process_count)
    t0, done = time.perf_counter(), 0
    todo = [i for i in mine
            if not shards.shard_done(ctx.stage_dir, split, i, *ranges[i], ae.fingerprint)]
    # One loader over every read of this process's remaining shards, in order:
    # its workers start once per split and decode ahead across shard ends.
    reads = [c for i in todo for c in chunks_of(*ranges[i], cfg.encode.batch_size)]
    # Data small enough to keep in memory (data.cache) needs no worker processes.
    chunks = loader.Loader.for_config(cfg.data, loader.SourceChunks(source, reads), len(reads),
                                      loader.cache_for(cfg.data.cache, source))
    with chunks, ctx.progress(total=sum(ranges[i][1] - ranges[i][0] for i in mine),
                              desc=f"encode {split}") as bar:
      bar.update(sum(ranges[i][1] - ranges[i][0] for i in mine if i not in todo))
      for i in todo:
        start, stop = ranges[i]
        rows, labels = encode_rows(local, chunks, stop - start, cfg.encode.batch_size,
                                   codebook, bar)
        shards.write_shard(ctx.stage_dir, split, i, start, rows, labels, ae.fingerprint)
        done += stop - start
    seconds = time.perf_counter() - t0
    ctx.log("%s: %d images of %s in %d shards (%d here, %d encoded now) in %.1fs", split,
            len(source), source.name, len(ranges), len(mine), done, seconds)
    info[split] = (len(source), shard_rows, source.name)
    metrics[f"n_{split}"] = len(source)
    if split == TRAIN:  # data.bad_images=skip: the files left out (both splits)
      metrics["bad_images"] = len(getattr(source, "bad_files", ()))
    metrics[f"{split}_images_per_second"] = done / max(seconds, 1e-9)
    metrics.update({f"{split}_{k}": v for k, v in chunks.stats().items()})
  parallel.sync(f"encoded:{ctx.stage_dir}")
  if not ctx.is_main:
    return metrics
  meta = shards.finish(ctx.stage_dir, ae.fingerprint, cfg.data.name, codebook, info,
                       ae.latent_shape)
  # Shard by shard: process 0 never holds the whole database here either.
  hashes, s1, s2, count, nbytes = [], 0.0, 0.0, 0, 0
  for _, rows in shards.iter_shards(ctx.stage_dir, meta, TRAIN):
    hashes.append(_row_hashes(rows))
    z = np.asarray(rows) if codebook is None else None
    if codebook is not None:  # the sums of the latents, from the code counts
      c = np.bincount(np.asarray(rows).ravel(), minlength=len(codebook)).astype(np.float64)
      cb = codebook.astype(np.float64)
      s1, s2 = s1 + (c @ cb).sum(), s2 + (c @ (cb * cb)).sum()
      count += int(c.sum()) * cb.shape[1]
    else:
      s1, s2, count = s1 + float(z.sum(dtype=np.float64)), s2 + float(np.square(z, dtype=np.float64).sum()), count + z.size
    nbytes += rows.nbytes
  mean = s1 / max(count, 1)
  metrics.update(latent_dim=int(np.prod(ae.latent_shape)), processes=ctx.process_count,
                 train_duplicate_fraction=_duplicate_fraction(np.concatenate(hashes)),
                 database_bytes=int(nbytes),
                 database_bytes_as_float32=int(info[TRAIN][0] * np.prod(ae.latent_shape) * 4),
                 latent_std=float(np.sqrt(max(s2 / max(count, 1) - mean * mean, 0.0))))
  return metrics


def _row_hashes(rows: np.ndarray) -> np.ndarray:
  """A 64-bit hash of each row's bytes (for counting exact twins in 8 bytes a row)."""
  b = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
  pad = (-b.shape[1]) % 8
  if pad:
    b = np.concatenate([b, np.zeros((len(b), pad), np.uint8)], 1)
  words = b.view(np.uint64)
  mult = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
  h = np.zeros(len(rows), np.uint64)
  for j in range(words.shape[1]):  # multiply-add over the words, wrapping mod 2**64
    h = (h ^ (words[:, j] * mult[j])) * np.uint64(0x9E3779B97F4A7C15)
  return h


def _duplicate_fraction(hashes: np.ndarray) -> float:
  """Share of rows with an exact twin (equal hashes): quantized latents can
  repeat, and the neighbour tables must then still exclude the query by id."""
  if len(hashes) == 0:
    return 0.0
  _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
  return float((counts[inverse] > 1).mean())
