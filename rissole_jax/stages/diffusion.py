"""The diffusion stage: trains the (block) denoiser on the latent database of
the encode and index stages (resuming from its latest checkpoint), writes the
latent normalisation (latent_stats.json) and reports the loss of the EMA
weights on the held-out latents. The train step, the train call, the
database placement are train/diffusion.py's; reading the trained denoiser
back (`load_denoiser`) is inference/loading.py's.
"""
from __future__ import annotations

import jax
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax.runtime import parallel
from rissole_jax.data.pipeline import RowCount, TrainStream
from rissole_jax.models.common import count_params
from rissole_jax.train import checkpoints, guard, loop
from rissole_jax import files
from rissole_jax.train.diffusion import (abstract_state, build, check_config,
                                         check_database, database_stats,
                                         training_rows,
                                         expected_latent_shape, load_database,
                                         lookup, make_train_call, normalise, parts)


def run(ctx) -> dict:
  config, t = ctx.config, ctx.config.diffusion.train
  check_config(config, expected_latent_shape(config))  # config errors before reading anything
  db = load_database(config, ctx.root)
  latent_shape = tuple(db.latent_shape)
  k = db.neighbours.shape[1]
  check_config(config, latent_shape, k)   # the grid et al., before any work
  check_database(db)
  stats = database_stats(db.rows, db.codebook)
  rows, codebook = training_rows(db, stats)
  ctx.log("database: %d %s of %s, k=%d; grid %s -> blocks %s; latent std %s",
          len(rows), "latents" if codebook is None else f"code rows ({rows.dtype})",
          latent_shape, k, tuple(config.blocks.grid),
          blk.block_shape(latent_shape, config.blocks.grid), np.round(stats["std"], 3))

  mesh = parallel.make_mesh(config.mesh)
  rules = config.mesh.logical_axis_rules
  ckpt_dir = ctx.stage_dir / "checkpoints"
  mngr = checkpoints.manager(ckpt_dir, t.keep_checkpoints, t.ckpt_every)
  fns = parts(config, latent_shape)
  model = fns.model
  start = 0
  if mngr.latest_step() is not None:  # resuming: restore straight into the sharded layout
    like, state_sh = abstract_state(config, model, latent_shape, k, mesh)
    state, start = checkpoints.restore_latest(mngr, like, ctx.log)
    if start:
      ctx.log("resumed from step %d", start)
  if not start:  # nothing (intact) to resume from
    _, _, _, state, state_sh = build(config, latent_shape, k, mesh, config.seed)
  n_params = count_params(state["params"])
  ctx.log("denoiser (%s): %s parameters", config.model.variant, f"{n_params:,}")
  print(f"denoiser ({config.model.variant}): {n_params:,} parameters")

  stats_out = {"mean": stats["mean"].tolist(), "std": stats["std"].tolist(),
               "latent_shape": list(latent_shape), "k": int(k)}
  if ctx.is_main:
    files.atomic_write_json(ctx.stage_dir / "latent_stats.json", stats_out)

  key = parallel.put_replicated(jax.random.PRNGKey(config.seed + 1), mesh)
  stream = TrainStream(RowCount(len(rows)), t.batch_size, config.seed,
                       ctx.process_index, ctx.process_count, cache=False)
  train_call, placed = make_train_call(fns, t.gather, rows, codebook, db.neighbours, stream,
                                       key, state_sh, mesh, rules)
  ctx.log("database placement %s: %.1f MiB per device, %.1f MiB in host memory", t.gather,
          placed["database_bytes_per_device"] / 2**20, placed["database_bytes_host"] / 2**20)

  writer = ctx.writer()
  bar = ctx.progress(t.steps, start, "diffusion")
  hints = {f"diffusion.train.{n}": t[n] for n in ("lr", "warmup_steps", "grad_clip", "batch_size")}
  hints["diffusion.prediction"] = config.diffusion.prediction
  nan_guard = guard.Guard("diffusion", t, hints, ckpt_dir)
  ran = loop.run_steps(train_call, state, start, t, mngr, nan_guard, bar, writer, ctx.log,
                       "diffusion")
  state, last, rate = ran.state, ran.last, ran.steps_per_sec
  first_step_seconds = ran.first_call_seconds
  heldout = heldout_loss(fns.eval_loss, state["ema"], db, stats, rows, codebook)
  if heldout is not None:
    ctx.log("held-out loss (EMA weights): %.4f", heldout)
  return {"loss": last["loss"], "heldout_loss": heldout, "denoiser_params": n_params,
          "skipped_steps": nan_guard.skipped,
          "steps_per_sec": rate, "train_images_per_sec": rate * t.batch_size,
          # The first step: compiling the jitted step, plus one step.
          "compile_seconds": first_step_seconds,
          "latent_std": float(np.mean(stats["std"])), "latent_mean": float(np.mean(stats["mean"])),
          "devices": jax.device_count(), **placed}


def heldout_loss(eval_loss, params, db, stats, rows, codebook=None, batch: int = 64,
                 seed: int = 1234):
  """The training loss of `params` on the held-out latents (their neighbours
  from the database), with fixed noise and timesteps: comparable across
  variants and runs with the same prediction target. None without held-out items.
  rows, codebook: the database as training reads it (normalised)."""
  held = getattr(db, "heldout_latents", None)
  if held is None or len(held) == 0:
    return None
  held = normalise(np.asarray(held, np.float32), stats).astype(np.float32)
  nbr = np.asarray(db.heldout_neighbours)
  loss = jax.jit(eval_loss)
  key, values = jax.random.PRNGKey(seed), []
  for b, start in enumerate(range(0, len(held), batch)):
    idx = np.arange(start, start + batch) % len(held)   # static shape; the tail wraps
    nb = lookup(rows[nbr[idx]], codebook)
    v = loss(params, held[idx], nb, jax.random.fold_in(key, b))
    values.append(np.asarray(v)[:min(batch, len(held) - start)])
  return float(np.mean(np.concatenate(values)))
