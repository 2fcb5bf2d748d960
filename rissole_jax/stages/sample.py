"""Stage 'sample': pseudo-queries -> neighbours -> denoised blocks -> images.

A pseudo-query is a database item; its k neighbours come from the train
neighbour table, which never lists an item as its own neighbour, so a sample
is not a copy of its query by construction (checked here). The whole sampler
(every timestep, all blocks of all images, the merge and the VQ-GAN decode)
is one jitted function; with previous-block conditioning the blocks go in
raster order as a lax.scan, each conditioned on the block made before it.

Writes under DIR/sample/: samples.npy (uint8 (n, H, W, C)), queries.npy (ids
into the database used), samples.png (a grid) and figure.png (as the paper's
Figure 2: each row a query, its k neighbours, and the generated sample).
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax import parallel
from rissole_jax.data.pipeline import local_slice, to_uint8
from rissole_jax.diffusion import samplers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.models import unet
from rissole_jax.train import diffusion as dif
from rissole_jax.workdir import atomic_save_npy, atomic_write_bytes

PSEUDO_QUERIES = ("uniform", "frequent")


def check_config(config) -> None:
  s, v = config.sample, config.model.variant
  samplers.check_config(s, config.diffusion.timesteps)
  if s.get("quantize", "none") not in ("none", "int8_weights", "int8"):
    raise ConfigError(f"Unknown sample.quantize {s.quantize!r}: use 'none', 'int8_weights' "
                      "or 'int8'.")
  if s.pseudo_query not in PSEUDO_QUERIES:
    raise ConfigError(f"Unknown sample.pseudo_query {s.pseudo_query!r}: use one of {PSEUDO_QUERIES}.")
  if s.num < 1 or s.batch_size < 1:
    raise ConfigError("sample.num and sample.batch_size must be positive.")
  if not 0.0 <= s.eta <= 1.0:
    raise ConfigError(f"sample.eta={s.eta} must be in [0, 1].")
  if s.guidance_scale != 1.0:
    if not unet.uses_retrieval(v):
      raise ConfigError(f"sample.guidance_scale={s.guidance_scale}: variant {v!r} has no "
                        "retrieval condition to guide with. Fix: set it to 1.")
    if config.diffusion.cond_dropout <= 0:
      raise ConfigError(
          f"sample.guidance_scale={s.guidance_scale} needs a model trained with condition "
          "dropout (classifier-free guidance), but diffusion.cond_dropout=0. Fix: set "
          "sample.guidance_scale=1, or retrain with e.g. --config.diffusion.cond_dropout=0.1.")


# ---------------------------------------------------------------------------
# Pseudo-queries and their neighbours.

def retrieval_counts(neighbours: np.ndarray) -> np.ndarray:
  """How often each database item is among the training queries' neighbours."""
  return np.bincount(np.asarray(neighbours).ravel(), minlength=len(neighbours))


def pseudo_queries(neighbours: np.ndarray, num: int, mode: str, seed: int) -> np.ndarray:
  """`num` database ids: uniform, or 'frequent' (RDM): drawn in proportion to how
  often an item is retrieved, so never-retrieved outliers are never queries.
  Without replacement while there are enough candidates."""
  n = len(neighbours)
  rng = np.random.default_rng([seed, 0x5A3])
  if mode == "uniform":
    p = None
    candidates = n
  elif mode == "frequent":
    counts = retrieval_counts(neighbours).astype(np.float64)
    p, candidates = counts / counts.sum(), int(np.count_nonzero(counts))
  else:
    raise ConfigError(f"Unknown sample.pseudo_query {mode!r}: use one of {PSEUDO_QUERIES}.")
  return rng.choice(n, size=num, replace=num > candidates, p=p).astype(np.int64)


def query_neighbours(neighbours: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """(num, k) neighbour ids of each query, refusing any query among its own."""
  ids = np.asarray(neighbours)[queries]
  bad = np.flatnonzero(np.any(ids == np.asarray(queries)[:, None], axis=1))
  if len(bad):
    raise DataError(f"{len(bad)} pseudo-queries (e.g. id {int(queries[bad[0]])}) are among "
                    "their own neighbours: a sample could copy its query. The neighbour "
                    "table must exclude each item itself; rebuild the index.")
  return ids


# ---------------------------------------------------------------------------
# The sampler: one pure function of (params, autoencoder params, neighbours, key).

def sample_latents(model, params, schedule, config, nb, key):
  """Normalised latents (B, h, w, c) for neighbours' normalised latents nb
  (B, k, h, w, c); every block of every image at once (or block by block in
  raster order with use_prev_block)."""
  s, prediction = config.sample, config.diffusion.prediction
  B, shape = nb.shape[0], nb.shape[2:]

  def run(cond, x_T, k):
    def pred_fn(x, t, keep):
      return model.apply({"params": params}, x, t, **cond,
                         keep=keep if model.learn_null else None)
    model_fn = samplers.guided(pred_fn, schedule, prediction, s.guidance_scale)
    return samplers.run_sampler(s.sampler, schedule, model_fn, x_T, k, s.steps, s.eta,
                                **samplers.options(s))

  k_T, k_run = jax.random.split(key)
  if not model.blocks:
    return run(unet.condition(model, nb, B), samplers.normal(k_T, (B, *shape)), k_run)
  n = blk.num_blocks(model.grid)
  bshape = blk.block_shape(shape, model.grid)
  if not model.prev_block:
    x = run(unet.condition(model, nb, B), samplers.normal(k_T, (B * n, *bshape)), k_run)
    return blk.merge(unet.unfold(x, n), model.grid)
  # Raster order: block i starts once block i-1 is finished and conditions on it.
  nbb = jnp.moveaxis(blk.split(nb, model.grid), 2, 0) if model.retrieval else None  # (n, B, k, ...)

  def one_block(prev, inputs):
    i, nb_i = inputs
    cond = {"pos": jnp.full((B,), i, jnp.int32), "neighbours": nb_i, "prev": prev}
    ki = jax.random.fold_in(k_run, i)
    x = run(cond, samplers.normal(jax.random.fold_in(k_T, i), (B, *bshape)), ki)
    return x, x

  _, xs = jax.lax.scan(one_block, jnp.zeros((B, *bshape), nb.dtype),
                       (jnp.arange(n, dtype=jnp.int32), nbb))
  return blk.merge(jnp.moveaxis(xs, 0, 1), model.grid)


def make_sample_fn(model, schedule, config, decode_fn, stats):
  """fn(params, ae_params, nb, key) -> (latents, images in [-1, 1]): sampling,
  de-normalisation and the VQ-GAN decode, for one jit."""
  mean, std = jnp.asarray(stats["mean"]), jnp.asarray(stats["std"])

  def fn(params, ae_params, nb, key):
    z = sample_latents(model, params, schedule, config, nb, key) * std + mean
    return z, decode_fn(ae_params, z)
  return fn


# ---------------------------------------------------------------------------
# Pictures.

def tile(images: np.ndarray, cols: int, pad: int = 2, value: int = 255) -> np.ndarray:
  """uint8 (n, H, W, C) -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) image."""
  n, H, W, C = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (H + pad) - pad, cols * (W + pad) - pad, C), value, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    out[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = im
  return out


def save_png(path: Path, image: np.ndarray) -> None:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())


def figure(queries: np.ndarray, neighbours: np.ndarray, samples: np.ndarray,
           pad: int = 2, gap: int = 8) -> np.ndarray:
  """Rows of [query | its k neighbours | sample] (uint8 images), a wider gap
  around the neighbours, as in the paper's Figure 2."""
  rows = []
  for q, nb, s in zip(queries, neighbours, samples):
    H, W, C = q.shape
    sep = np.full((H, gap, C), 255, np.uint8)
    rows.append(np.concatenate([q, sep, tile(nb, len(nb), pad), sep, s], 1))
  return tile(np.stack(rows), 1, pad + 2)


# ---------------------------------------------------------------------------
# The stage.

def sampling_database(ctx, autoencoder):
  """The database to retrieve from: the training one, or config.sample.database
  encoded and indexed under DIR/sample/database (RDM's database swap)."""
  config = ctx.config
  if not config.sample.database:
    return dif.load_database(config, ctx.root)
  from rissole_jax import retrieval
  source = retrieval.swap_source(config)
  return retrieval.build_database(autoencoder, source, config, ctx.stage_dir / "database",
                                  say=ctx.log, progress=ctx.progress)


def run(ctx) -> dict:
  config, s = ctx.config, ctx.config.sample
  check_config(config)
  from rissole_jax.train.vqgan import load_autoencoder
  mesh = parallel.make_mesh(config.mesh)
  rules = config.mesh.logical_axis_rules
  ae = load_autoencoder(config, ctx.dir("vqgan"))
  model, params, stats = dif.load_denoiser(config, ctx.root, mesh)
  db = sampling_database(ctx, ae)
  if tuple(db.latents.shape[1:]) != tuple(ae.latent_shape):
    raise DataError(f"database latents {db.latents.shape[1:]} do not match the "
                    f"autoencoder's {ae.latent_shape}.")
  k_model = stats["k"]
  if unet.uses_retrieval(model.variant) and db.neighbours.shape[1] != k_model:
    raise DataError(f"the denoiser was trained with k={k_model} neighbours, the sampling "
                    f"database has k={db.neighbours.shape[1]}.")

  queries = pseudo_queries(db.neighbours, s.num, s.pseudo_query, config.seed)
  nb_ids = query_neighbours(db.neighbours, queries)
  latents = dif.normalise(np.asarray(db.latents, np.float32), stats).astype(np.float32)
  ctx.log("sampling %d images (%s, %s, guidance %.2f) from %d pseudo-queries (%s) of a "
          "database of %d", s.num, model.variant, s.sampler, s.guidance_scale, s.num,
          s.pseudo_query, len(latents))

  schedule = make_schedule(config.diffusion)
  decode_fn, ae_params = ae.decode_fn, ae.params
  if s.quantize != "none":
    from types import SimpleNamespace
    from rissole_jax import quantize as qz
    q = qz.quantize_parts(SimpleNamespace(config=config, model=model, params=params, ae=ae,
                                          stats=stats, db=db, schedule=schedule), s.quantize)
    model, params, decode_fn, ae_params = q.model, q.params, q.decode_fn, q.ae_params
    ctx.log("quantized (%s): denoiser %d bytes, decoder %d bytes", s.quantize,
            *q.sizes().values())
  fn = make_sample_fn(model, schedule, config, decode_fn, stats)
  bsh = parallel.batch_sharding(mesh, rules, 5)
  repl = parallel.replicated(mesh)
  jfn = jax.jit(fn, in_shardings=(None, repl, bsh, repl),
                out_shardings=(parallel.batch_sharding(mesh, rules, 4),
                               parallel.batch_sharding(mesh, rules, 4)))
  key = jax.random.PRNGKey(config.seed + 2)
  shards = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh, rules)]))
  bs = -(-min(s.batch_size, s.num) // shards) * shards  # no bigger than needed, splittable
  images, times = [], []
  bar = ctx.progress(s.num, 0, "sample")
  sl = local_slice(bs, ctx.process_index, ctx.process_count)
  for b, start in enumerate(range(0, s.num, bs)):
    ids = nb_ids[start:start + bs]
    ids = np.concatenate([ids, np.repeat(ids[-1:], bs - len(ids), 0)])  # static shape
    nb = parallel.put_batch(latents[ids][sl], mesh, rules)
    t0 = time.time()
    _, img = jfn(params, ae_params, nb, jax.random.fold_in(key, b))
    img = parallel.to_host(img)
    times.append(time.time() - t0)
    images.append(img[:min(bs, s.num - start)])
    bar.update(len(images[-1]))
  bar.close()
  samples = to_uint8(np.concatenate(images))

  # Decoding runs on the whole mesh, so every process takes part; one writes.
  show = min(s.show, s.num)
  q_img = to_uint8(ae.decode(db.latents[queries[:show]]))
  nb_img = to_uint8(ae.decode(db.latents[nb_ids[:show].ravel()]))
  nb_img = nb_img.reshape(show, -1, *nb_img.shape[1:])
  if ctx.is_main:
    out = ctx.stage_dir
    atomic_save_npy(out / "samples.npy", samples)
    atomic_save_npy(out / "queries.npy", queries)
    save_png(out / "samples.png", tile(samples[:min(len(samples), 256)], 16 if len(samples) >= 16 * 16 else 8))
    save_png(out / "figure.png", figure(q_img, nb_img, samples[:show]))
  # The first batch compiles; later ones time the sampler itself.
  steady = times[1:] or times
  return {"num": int(len(samples)), "seconds_first_batch": times[0],
          "seconds_per_batch": float(np.median(steady)),
          "samples_per_sec": bs / float(np.median(steady)),
          "nfe_per_sample": _nfe(config, model)}


def _nfe(config, model) -> int:
  """Network evaluations per image (each over all its blocks at once)."""
  s = config.sample
  T = config.diffusion.timesteps
  steps = samplers.num_steps(s, T)
  steps *= 1 if s.guidance_scale == 1.0 else 2
  return steps * (blk.num_blocks(config.blocks.grid) if model.prev_block else 1)
