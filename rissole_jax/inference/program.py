"""The sampling program: what a compiled sampler depends on (`Settings`) and
the one jitted function of (denoiser params, decoder params, neighbour
latents, key) that runs every timestep over all blocks of all images, merges
the blocks and decodes (`make_sample_fn`). The Sampler (sampler.py) and the
StableHLO export (stablehlo.py) both build on `sample_latents`.

A sample is a pure function of (model, neighbours, settings, its key): its
starting noise and step noise come from its own key, never from the batch it
is drawn in.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax.diffusion import solvers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.models import lego, mapped, unet


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a compiled sampler depends on (besides the model and batch size)."""
  sampler: str = "ddim"
  steps: int = 100
  eta: float = 1.0
  guidance: float = 1.0
  guidance_interval: tuple = solvers.EVERY_STEP  # fractions of T where guidance acts
  order: int = 2                   # DPM-Solver++
  spacing: str = "time_uniform"    # DDIM, DPM-Solver++
  lower_order_final: bool = True   # DPM-Solver++
  clip_x0: float = 0.0             # static thresholding of the predicted x0 (0: off)
  t_break: float = 0.0   # LEGO: the fraction of the trajectory run without sample.skip.bricks

  @classmethod
  def from_config(cls, s, **overrides) -> "Settings":
    base = cls(sampler=s.sampler, steps=int(s.steps), eta=float(s.eta),
               guidance=float(s.guidance_scale),
               guidance_interval=tuple(float(v) for v in s.get("guidance_interval",
                                                               solvers.EVERY_STEP)),
               t_break=float(s.skip.t_break),
               **solvers.options(s))
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given)


def check_settings(settings: Settings, config) -> None:
  """Refuses settings the model or the sampler cannot use, naming the fix."""
  v = config.model.variant
  solvers.check_config(settings, config.diffusion.timesteps)
  if not 0.0 <= settings.eta <= 1.0:
    raise ConfigError(f"sample.eta={settings.eta} must be in [0, 1].")
  if not 0.0 <= settings.t_break <= 1.0:
    raise ConfigError(f"sample.skip.t_break={settings.t_break} must be in [0, 1].")
  if settings.t_break > 0 and config.model.get("backbone", "unet") != "lego":
    raise ConfigError(f"sample.skip.t_break={settings.t_break} skips LEGO bricks, but this "
                      f"model's backbone is {config.model.get('backbone', 'unet')!r}. Fix: set it to 0.")
  if settings.sampler == solvers.DISTILLED and (settings.guidance != 1.0 or settings.t_break):
    raise ConfigError("sample.sampler='distilled': the student is the conditional model, whole "
                      f"(guidance {settings.guidance}, t_break {settings.t_break} asked). Fix: "
                      "sample.guidance_scale=1 and sample.skip.t_break=0.")
  lo_hi = tuple(settings.guidance_interval)
  if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
    raise ConfigError(f"sample.guidance_interval={lo_hi} must be (lo, hi) with 0 <= lo < hi <= 1 "
                      "(fractions of the diffusion time). Fix: e.g. (0.0, 1.0), every step.")
  if settings.guidance != 1.0:
    if not unet.uses_retrieval(v):
      raise ConfigError(f"sample.guidance_scale={settings.guidance}: variant {v!r} has no "
                        "retrieval condition to guide with. Fix: set it to 1.")
    if config.diffusion.cond_dropout <= 0:
      raise ConfigError(
          f"sample.guidance_scale={settings.guidance} needs a model trained with condition "
          "dropout (classifier-free guidance), but diffusion.cond_dropout=0. Fix: set "
          "sample.guidance_scale=1, or retrain with e.g. --config.diffusion.cond_dropout=0.1.")


def check_config(config) -> None:
  """The sample section, refused early with the fix."""
  from rissole_jax.inference import quantize, queries
  s = config.sample
  check_settings(Settings.from_config(s), config)
  quantize.check_mode(s.get("quantize", "none"))
  check_choice("sample.pseudo_query", s.pseudo_query, queries.PSEUDO_QUERIES)
  if s.num < 1 or s.batch_size < 1:
    raise ConfigError("sample.num and sample.batch_size must be positive.")


def params_for(parts, settings: Settings):
  """The denoiser params that run `settings`: a distilled student of
  settings.steps steps (parts.students), else parts.params. ConfigError
  naming the counts there are, or the command that makes them."""
  if settings.sampler != solvers.DISTILLED:
    return parts.params
  students = getattr(parts, "students", None) or {}
  if settings.steps in students:
    return students[settings.steps]
  if not students:
    raise ConfigError("sample.sampler='distilled', but this model has no distilled student. "
                      "Fix: python -m rissole_jax.distill --workdir W (then sample from W, or "
                      "export it again), or another sampler (ddim, dpmpp).")
  raise ConfigError(f"sample.steps={settings.steps}: this model's distilled students take "
                    f"{', '.join(map(str, sorted(students, reverse=True)))} steps. Fix: one of "
                    "those.")


def nfe(settings: Settings, config, model) -> int:
  """Network evaluations per image (each over all its blocks at once)."""
  T = config.diffusion.timesteps
  steps = solvers.num_steps(settings, T)
  if settings.guidance != 1.0:  # a second pass at the guided steps
    if tuple(settings.guidance_interval) == solvers.EVERY_STEP:
      steps *= 2
    else:
      grid = (np.arange(T) if settings.sampler == "ddpm" else
              solvers.timesteps(make_schedule(config.diffusion).alphas_cumprod, settings.steps,
                                solvers.options(settings)["spacing"]))
      steps += int(np.sum(solvers.guided_at(grid, T, settings.guidance_interval)))
  return steps * (blk.num_blocks(config.blocks.grid) if model.prev_block else 1)



def _row_keys(keys, n: int):
  """(B, 2) image keys -> (B*n, 2) block keys, example-major (as unet.fold)."""
  per = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(keys)
  return per.reshape(-1, keys.shape[-1])


def skip_plan(model, config, settings: Settings):
  """LEGO brick skipping for these settings (lego.skip_plan), None otherwise."""
  if settings.t_break == float(config.sample.skip.t_break):
    return lego.skip_plan(model, config)
  c = config.copy_and_resolve_references()
  c.sample.skip.t_break = settings.t_break
  return lego.skip_plan(model, c)


def couples_blocks(model) -> bool:
  """Does the denoiser see other blocks while it makes one (a whole-canvas
  model, or one conditioned on the previous block)? Then an inpainting's kept
  blocks are followed through the trajectory (`known` in sample_latents)."""
  return not model.blocks or bool(model.prev_block)


def following(fn, schedule, z, mask, row_keys):
  """model_fn that sees the user's latent z where `mask` (h, w) is True,
  forward-noised to each step's t with fresh noise (RePaint-style), and its
  own trajectory elsewhere."""
  m = mask[None, :, :, None]

  def f(x, t):
    noise = jax.vmap(lambda k: solvers.normal(jax.random.fold_in(
        jax.random.fold_in(k, 2), t[0]), x.shape[1:], x.dtype))(row_keys)
    return fn(jnp.where(m, schedule.q_sample(z, t, noise), x), t)
  return f


def sample_latents(model, params, schedule, prediction: str, settings: Settings, nb, keys,
                   plan=None, known=None):
  """Normalised latents (B, h, w, c) for neighbours' normalised latents nb
  (B, k, h, w, c) and one key per image (B, 2); every block of every image at
  once (or block by block in raster order with use_prev_block). Each row's
  starting noise and step noise come from its own key. plan: LEGO bricks
  skipped over part of the trajectory (skip_plan), None for all bricks.
  known: (normalised latents (B, h, w, c), bool (h, w) block-aligned mask):
  an inpainting's kept blocks, followed by models that couple blocks
  (couples_blocks): a whole-canvas model sees them forward-noised at every
  step (`following`); a previous-block model conditions the next block on
  the kept block itself (as it trained: on clean previous blocks). Blocks
  denoised on their own ignore it (their kept rows are replaced after)."""
  B, shape = nb.shape[0], nb.shape[2:]
  follow = known is not None and not model.blocks

  def run(cond, row_keys, row_shape, model=model, params=params):
    def model_fn(active=None):
      def pred_fn(x, t, keep):
        return model.apply({"params": params}, x, t, **cond,
                           keep=keep if model.learn_null else None,
                           **({} if active is None else {"active": active}))
      fn = solvers.guided(pred_fn, schedule, prediction, settings.guidance,
                          settings.guidance_interval)
      return following(fn, schedule, known[0], known[1], row_keys) if follow else fn
    # The low-noise part of the trajectory runs another stack: two loops.
    split = {} if plan is None else {"model_fn_low": model_fn(plan[1]), "t_switch": plan[2]}
    x_T = jax.vmap(lambda k: solvers.normal(jax.random.fold_in(k, 0), row_shape))(row_keys)
    run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(row_keys)
    return solvers.run_sampler(settings.sampler, schedule, model_fn(plan and plan[0]), x_T,
                                run_keys, settings.steps, settings.eta, **split,
                                **solvers.options(settings))

  if not model.blocks:
    return run(unet.condition(model, nb, B), keys, shape)
  n = blk.num_blocks(model.grid)
  bshape = blk.block_shape(shape, model.grid)
  if not model.prev_block:
    x = run(unet.condition(model, nb, B), _row_keys(keys, n), bshape)
    return blk.merge(unet.unfold(x, n), model.grid)
  # Raster order: block i starts once block i-1 is finished and conditions on it.
  nbb = jnp.moveaxis(blk.split(nb, model.grid), 2, 0) if model.retrieval else None  # (n, B, k, ...)
  if known is not None:   # the kept blocks (n, B, ...) and whether each is kept (n,)
    kb = jnp.moveaxis(blk.split(known[0], model.grid), 1, 0)
    kept = blk.split(known[1][None, :, :, None], model.grid)[0].reshape(n, -1).all(-1)
  else:
    kb, kept = jnp.zeros((n, B, *bshape), nb.dtype), jnp.zeros((n,), bool)

  def one_block(prev, inputs):
    i, nb_i, kb_i, kept_i = inputs
    cond = {"pos": jnp.full((B,), i, jnp.int32), "neighbours": nb_i, "prev": prev}
    # Rows of one block: the per-block model (block i's weights, if not shared).
    m_i, p_i = mapped.for_rows(model, params, i)
    x = run(cond, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), bshape, m_i, p_i)
    x = jnp.where(kept_i, kb_i, x)    # a kept block: the user's, for the next one to follow
    return x, x

  _, xs = jax.lax.scan(one_block, jnp.zeros((B, *bshape), nb.dtype),
                       (jnp.arange(n, dtype=jnp.int32), nbb, kb, kept))
  return blk.merge(jnp.moveaxis(xs, 0, 1), model.grid)


def latents_fn(model, schedule, config):
  """fn(params, nb, key) -> normalised latents with config.sample's settings
  (image i's key is fold_in(key, i)): the sampler without the decode, for
  tests and benchmarks."""
  settings = Settings.from_config(config.sample)
  plan = skip_plan(model, config, settings)

  def fn(params, nb, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(nb.shape[0]))
    return sample_latents(model, params, schedule, config.diffusion.prediction, settings, nb,
                          keys, plan)
  return fn


def make_sample_fn(model, schedule, prediction: str, settings: Settings, decode_fn, stats,
                   plan=None, follow: bool = False):
  """fn(params, ae_params, nb, key, start) -> (latents, images in [-1, 1]) for
  one jit: image i of the batch is image start + i of the request, and its
  key is fold_in(key, start + i). follow: fn takes two more arguments, the
  kept latents (B, h, w, c) (not normalised) and their mask (h, w), for
  sample_latents' `known`."""
  mean, std = jnp.asarray(stats["mean"]), jnp.asarray(stats["std"])

  def fn(params, ae_params, nb, key, start, kept=None, mask=None):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, start + i))(jnp.arange(nb.shape[0]))
    known = None if not follow else ((kept - mean) / std, mask)
    z = sample_latents(model, params, schedule, prediction, settings, nb, keys, plan,
                       known) * std + mean
    return z, decode_fn(ae_params, z)
  return fn
