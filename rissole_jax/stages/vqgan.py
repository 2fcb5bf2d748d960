"""The vqgan stage: trains the VQ-GAN autoencoder (resuming from its latest
checkpoint), evaluates it on the held-out split (PSNR, codebook usage and
perplexity, a PNG of reconstructions) and leaves its final checkpoint for the
later stages (`load_autoencoder` in models/autoencoder.py). The train step
and its builder are train/vqgan.py's.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.runtime import parallel
from rissole_jax.data import TrainStream, eval_batches, load_source, to_uint8
from rissole_jax.data import loader
from rissole_jax.models import vqgan as vq
from rissole_jax.train import checkpoints, guard, loop
from rissole_jax.models.autoencoder import Autoencoder
from rissole_jax.train.vqgan import Trainer, build, check_batch, keys
from rissole_jax.files import atomic_write_bytes


INPUT_METRICS = ("input_wait_share", "input_images_per_second", "input_workers")


def run(ctx) -> dict:
  config = ctx.config
  vq.check_config(config)
  guard.check_config(config.vqgan.train, "vqgan.train")
  mesh = parallel.make_mesh(config.mesh)
  check_batch(config, mesh)
  trainer = build(config, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state["g_params"]))
  n_disc = sum(x.size for x in jax.tree.leaves(trainer.abstract_state["d_params"]))
  ctx.log("VQ-GAN: f=%d, latent %s, %s generator / %s discriminator parameters, %d devices",
          vq.downsampling_factor(config.vqgan), vq.latent_shape(config.vqgan, config.data.image_size),
          f"{n_params:,}", f"{n_disc:,}", jax.device_count())
  init_key, step_key = keys(config.seed)
  state, last = train(ctx, trainer, init_key, step_key)
  ae = Autoencoder.from_params(config, state["g_params"], mesh)
  metrics = evaluate(ctx, ae)
  ctx.log("held-out: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
  return {**metrics, "generator_params": n_params, "discriminator_params": n_disc,
          "skipped_steps": last["skipped_steps"], "bad_images": last["bad_images"],
          "steps_per_sec": last.get("steps_per_sec", 0.0),
          "train_seconds": last.get("train_seconds", 0.0), "devices": jax.device_count(),
          **{k: last[k] for k in INPUT_METRICS if k in last}}


def train(ctx, trainer: Trainer, init_key, step_key) -> tuple[Any, dict]:
  """Trains from the latest checkpoint to train.steps; returns (state, last metrics)."""
  config, t = ctx.config, ctx.config.vqgan.train
  mesh, rules = trainer.mesh, config.mesh.logical_axis_rules
  # The data first: a folder with bad images stops here, before any training.
  source = load_source(config.data, "train")
  for path, why in getattr(source, "bad_files", ()):
    ctx.log("skipped a bad image (data.bad_images=skip): %s (%s)", path, why)
  state = trainer.init_state(init_key)
  ckpt_dir = ctx.stage_dir / "checkpoints"
  mngr = checkpoints.manager(ckpt_dir, t.keep_checkpoints, t.ckpt_every)
  state, start = checkpoints.restore_latest(mngr, state, ctx.log)
  if start:
    ctx.log("resumed from step %d", start)
  stream = TrainStream(source, t.batch_size, config.seed, ctx.process_index, ctx.process_count,
                       cache=loader.cache_for(config.data.cache, source))
  batches = loader.Loader.for_config(
      config.data, loader.StreamBatches(stream, start), t.steps - start, stream.cached,
      put=lambda el: parallel.put_batch(el["image"], mesh, rules))
  step_key = parallel.put_replicated(step_key, mesh)
  writer, bar = ctx.writer(), ctx.progress(t.steps, start, "vqgan")
  hints = {f"vqgan.train.{k}": t[k] for k in ("lr", "disc_lr", "warmup_steps", "grad_clip")}
  hints["vqgan.disc_weight"] = config.vqgan.disc_weight
  nan_guard = guard.Guard("vqgan", t, hints, ckpt_dir)
  window, last, t0, timed_from = [], {}, None, start
  with batches, loop.ending(mngr, t.steps, nan_guard, bar, writer) as end:
    for s, images in zip(range(start, t.steps), batches):
      state, m = trainer.step(state, step_key, images)
      batches.busy_until(m["rec_loss"])
      window.append(m)
      nan_guard.add(s + 1, m)
      if s == start:  # the first call compiles: time the rest
        jax.block_until_ready(m)
        t0, timed_from = time.time(), s + 1
      # Orbax would also save the very first step; only every ckpt_every is wanted.
      # The steps since the last look are checked first: a broken state is never saved.
      if (s + 1) % t.ckpt_every == 0:
        nan_guard.check(mngr.latest_step())
        if checkpoints.save(mngr, s + 1, state):
          mngr.wait_until_finished()  # the next step donates these buffers
      if (s + 1) % t.log_every == 0 or s + 1 == t.steps:
        nan_guard.check(mngr.latest_step())
        last = guard.mean_finite(window)
        window = []
        writer.scalars(s + 1, {f"train/{n}": x for n, x in last.items()})
        ctx.log("step %d: %s", s + 1, ", ".join(f"{n}={x:.4g}" for n, x in last.items()))
        bar.set_postfix(rec=f"{last['rec_loss']:.4f}", usage=f"{last['batch_usage']:.2f}")
      bar.update(1)
    end.state = state = jax.block_until_ready(state)
    elapsed = time.time() - t0 if t0 else 0.0
  timed = t.steps - timed_from
  last["steps_per_sec"] = timed / elapsed if elapsed > 0 and timed > 0 else 0.0
  last["train_seconds"] = elapsed
  last["skipped_steps"] = nan_guard.skipped
  last["bad_images"] = len(getattr(source, "bad_files", ()))
  last.update(batches.stats())
  return state, last


# ---------------------------------------------------------------------------
# Held-out evaluation.

def evaluate(ctx, ae: "Autoencoder", show: int = 16) -> dict:
  """PSNR (images in [0, 1]), l1/rec loss, codebook usage and perplexity over
  the whole held-out split; saves originals above reconstructions as a PNG."""
  config = ctx.config
  v = config.vqgan
  mesh, rules = ae.mesh, config.mesh.logical_axis_rules
  k = v.codebook_size

  @jax.jit
  def eval_fn(params, x, mask):
    z, idx = ae.model.apply({"params": params}, x, method=vq.VQModel.encode)
    x_rec = ae.decode_fn(params, z)
    mse01 = jnp.mean(jnp.square((x - x_rec) / 2.0), axis=(1, 2, 3))  # [0,1] scale
    l1 = jnp.mean(jnp.abs(x - x_rec), axis=(1, 2, 3))
    l2 = jnp.mean(jnp.square(x - x_rec), axis=(1, 2, 3))
    w = jnp.broadcast_to(mask[:, None, None], idx.shape).astype(jnp.float32)
    counts = jnp.zeros((k,)).at[idx.reshape(-1)].add(w.reshape(-1))
    return x_rec, {"mse01": mse01, "l1": l1, "l2": l2}, counts

  per_image, counts, grid = {"mse01": [], "l1": [], "l2": []}, np.zeros(k), None
  source = load_source(config.data, "heldout")
  for batch in eval_batches(source, v.train.batch_size, ctx.process_index, ctx.process_count):
    x, mask = parallel.put_batch((batch["image"], batch["mask"]), mesh, rules)
    x_rec, m, c = eval_fn(ae.params, x, mask)
    keep = parallel.to_host(mask)
    for n in per_image:
      per_image[n].append(parallel.to_host(m[n])[keep])
    counts += parallel.to_host(c)
    if grid is None:
      grid = (parallel.to_host(x)[:show], parallel.to_host(x_rec)[:show])
  per_image = {n: np.concatenate(x).astype(np.float64) for n, x in per_image.items()}
  p = counts / max(counts.sum(), 1.0)
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
  mse = per_image["mse01"]
  metrics = {
      # Over all pixels of the split (stricter than the mean of per-image PSNRs).
      "psnr": float(10 * np.log10(1.0 / max(mse.mean(), 1e-12))),
      "psnr_image_mean": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
      "l1": float(per_image["l1"].mean()),
      "rec_loss": float(v.l1_weight * per_image["l1"].mean() + v.l2_weight * per_image["l2"].mean()),
      "codebook_usage": float(np.mean(counts > 0)),
      "perplexity": float(np.exp(entropy)),
      "heldout_images": float(len(mse)),
  }
  if ctx.is_main and grid is not None:
    image = save_grid(ctx.stage_dir / "reconstructions.png", *grid)
    writer = ctx.writer()
    writer.image(config.vqgan.train.steps, "reconstructions", image)
    writer.close()
  return metrics


def save_grid(path: Path, originals, reconstructions, cols: int = 8, pad: int = 2) -> np.ndarray:
  """Originals (rows of `cols`) above their reconstructions, as a uint8 PNG
  (returned as an HWC array too)."""
  def tile(x):
    x = to_uint8(x)
    n, h, w, c = x.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
      r, q = divmod(i, cols)
      out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return out
  top, bottom = tile(originals), tile(reconstructions)
  band = np.full((2 * pad, *top.shape[1:]), 128, np.uint8)  # grey line between the two
  image = np.concatenate([top, band, bottom], axis=0)
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  atomic_write_bytes(Path(path), buf.getvalue())
  return image
