"""Diffusion training machinery: the (block) denoiser's train step, its state,
the latent database's placement and the train call (`make_train_call`). The
diffusion stage itself (the training loop, held-out loss) is
stages/diffusion.py; the trained denoiser back from its checkpoint
(`load_denoiser`) is rissole_jax/inference/loading.py.

One jitted step: gather the batch's latents and its neighbours' latents (on
the devices by default: code indices gathered from the database held there,
replicated or sharded, then looked up in the codebook), cut them
into blocks folded into the batch, draw one timestep per denoiser example
(per block), noise, predict, update, EMA. Randomness is fold_in(key, step) and
batches are a pure function of (seed, step), so a resumed run continues
exactly where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rissole_jax.runtime import parallel
from rissole_jax.stages import workdir as wd
from rissole_jax.diffusion import solvers as samplers
from rissole_jax.diffusion.latents import denormalise, normalise  # noqa: F401
from rissole_jax.diffusion.schedule import PREDICTIONS, make_schedule
from rissole_jax.errors import ConfigError, DataError, check_choice
from rissole_jax import models
from rissole_jax.models import rows as model_rows
from rissole_jax.models.common import uses_retrieval
from rissole_jax.train import guard, optim

GATHERS = ("device", "sharded", "host")


# ---------------------------------------------------------------------------
# The latent database (from the encode and index stages).

def load_database(config, root: Path):
  """retrieval.Database of the encode and index stages under `root`: .rows
  (N, h, w) codes with .codebook (or float latents), .neighbours (N, k),
  .labels, held-out arrays."""
  from rissole_jax import retrieval
  # Memory-mapped code shards: a sharded placement reads only its rows.
  return retrieval.load_database(config, Path(root), mmap=True)


def check_database(db) -> None:
  n, k = db.neighbours.shape
  if n != len(db):
    raise DataError(f"neighbour table has {n} rows but the database {len(db)} latents.")
  if db.neighbours.min() < 0 or db.neighbours.max() >= len(db):
    raise DataError("neighbour table holds ids outside the database.")
  if np.any(db.neighbours == np.arange(n)[:, None]):
    raise DataError("neighbour table lists an item as its own neighbour: a query must "
                    "never retrieve itself. Rebuild the index.")


def latent_stats(latents: np.ndarray) -> dict:
  """Per-channel mean and std of the training latents: the diffusion sees
  (z - mean) / std, about unit variance whatever scale the VQ-GAN chose."""
  z = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
  return {"mean": z.mean(0).astype(np.float32), "std": np.maximum(z.std(0), 1e-6).astype(np.float32)}


def database_stats(rows: np.ndarray, codebook: np.ndarray | None) -> dict:
  """latent_stats of a database of code indices, from how often each code
  occurs (no float copy of the database); float rows as latent_stats."""
  if codebook is None:
    return latent_stats(rows)
  counts = np.zeros(len(codebook), np.float64)
  for s in range(0, len(rows), 65536):
    counts += np.bincount(np.asarray(rows[s:s + 65536]).ravel(), minlength=len(codebook))
  cb, total = codebook.astype(np.float64), counts.sum()
  mean = counts @ cb / total
  var = np.maximum(counts @ (cb * cb) / total - mean * mean, 0.0)
  return {"mean": mean.astype(np.float32), "std": np.maximum(np.sqrt(var), 1e-6).astype(np.float32)}


def training_rows(db, stats: dict):
  """(rows, codebook) as the train step reads them, normalised by `stats`.
  Codes stay codes: the codebook is normalised instead of the database (the
  same numbers: a lookup commutes with the per-channel affine map)."""
  if db.codebook is None:
    return normalise(np.asarray(db.rows), stats).astype(np.float32), None
  return db.rows, normalise(db.codebook, stats).astype(np.float32)


# ---------------------------------------------------------------------------
# Config checks, model, state.

def check_config(config, latent_shape, k: int | None = None) -> None:
  """Everything this stage and sampling read, refused early with the fix."""
  models.check_config(config, latent_shape)
  f, t = config.diffusion, config.diffusion.train
  make_schedule(f)
  check_choice("diffusion.prediction", f.prediction, PREDICTIONS)
  check_choice("diffusion.train.gather", t.gather, GATHERS)
  if t.steps < 1 or t.batch_size < 1:
    raise ConfigError("diffusion.train.steps and batch_size must be positive.")
  if not 0 <= t.ema_decay < 1:
    raise ConfigError(f"diffusion.train.ema_decay={t.ema_decay} must be in [0, 1).")
  guard.check_config(t, "diffusion.train")
  if t.steps_per_call < 1:
    raise ConfigError(f"diffusion.train.steps_per_call={t.steps_per_call} must be at least 1.")
  if k is not None and k < 1 and uses_retrieval(config.model.variant):
    raise ConfigError(f"variant {config.model.variant!r} needs neighbours, but k={k}.")


def expected_latent_shape(config) -> tuple[int, int, int]:
  """The latent shape the config's VQ-GAN makes (the data, once encoded, has the last word)."""
  from rissole_jax.models import vqgan
  return tuple(vqgan.latent_shape(config.vqgan, config.data.image_size))


def make_optimizer(config):
  return optim.adam(config.diffusion.train)


def init_fn(model, tx, latent_shape, k):
  """key -> the train state (params boxed with logical axes, for sharded_init)."""
  def init(key):
    x, t, cond = model_rows.init_inputs(model, latent_shape, k)
    params = model.init({"params": key}, x, t, **cond)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}
  return init


def ema_update(ema, params, step, decay: float):
  # Warm-up (as in many DDPM codebases): early EMA follows the weights closely,
  # so short runs still sample from a trained average, not the initialisation.
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def loss_fn(model, schedule, prediction: str, cond_dropout: float, per_image: bool = False):
  """(params, z0, neighbours, key) -> mean squared error of the prediction
  (or one per image of z0, its blocks together)."""
  def loss(params, z0, nb, key):
    x0, cond = model_rows.model_inputs(model, z0, nb)
    M = x0.shape[0]
    kt, kn, kc, kd = jax.random.split(key, 4)
    t = jax.random.randint(kt, (M,), 0, schedule.T)     # one timestep per example
    noise = samplers.normal(kn, x0.shape, x0.dtype)
    xt = schedule.q_sample(x0, t, noise)
    keep = None
    if model.retrieval and cond_dropout > 0:
      keep = jax.random.bernoulli(kc, 1.0 - cond_dropout, (M,))
    # A stack of LEGO bricks: every brick's prediction is scored (the mean over
    # bricks), so that each one is a denoiser on its own and can end the stack.
    stacked = {"all_bricks": True} if getattr(model, "stacked", False) else {}
    out = model.apply({"params": params}, xt, t, **cond, keep=keep, train=True,
                      rngs={"dropout": kd}, **stacked)
    err = jnp.square(out - schedule.target(prediction, x0, noise, t))
    if stacked:
      err = err.mean(0)
    return err.reshape(z0.shape[0], -1).mean(1) if per_image else jnp.mean(err)
  return loss


def make_train_step(model, schedule, tx, config):
  """step(state, key, z0, neighbours) -> (state, metrics): one jittable update."""
  f = config.diffusion
  loss = loss_fn(model, schedule, f.prediction, f.cond_dropout)

  def step(state, key, z0, nb):
    key = jax.random.fold_in(key, state["step"])
    value, grads = jax.value_and_grad(loss)(state["params"], z0, nb, key)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = ema_update(state["ema"], params, state["step"], f.train.ema_decay)
    new = {"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt}
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
    return guard.finite_step(f.train.nan_policy, state, new, metrics,
                             value, metrics["grad_norm"], params, ema)
  return step


def lookup(rows, codebook):
  """Latents of gathered database rows: code indices looked up in the
  (normalised) codebook; rows without a codebook are float latents already."""
  return rows if codebook is None else jnp.take(codebook, rows.astype(jnp.int32), axis=0)


def take(rows, ids):
  """The plain gather of device_gather_step: rows[ids]."""
  return rows[ids]


def device_gather_step(step, take=take):
  """The step with the batch gathered inside the jit: the database (codes, or
  float latents when codebook is None) and neighbour table live on the
  devices, only the batch's ids travel. take(rows, ids): a plain gather, or
  parallel.take_sharded(mesh) for tables split over the mesh."""
  def gstep(state, key, latents, table, ids, codebook=None):
    return step(state, key, lookup(take(latents, ids), codebook),
                lookup(take(latents, take(table, ids)), codebook))
  return gstep


def scan_steps(step, gather: bool, unroll: bool = False):
  """Several steps in one call (lax.scan; diffusion.train.steps_per_call) of
  `step` (a gather step or a host-batch step). The batch inputs carry the
  steps on axis 1, batch-major ((B, N) ids, or (B, N, ...) rows), so they
  shard over the batch as one step's do; metrics come back as (N,) arrays.
  Each step folds its own counter into the key: N steps per call are N steps.
  unroll (diffusion.train.unroll_steps): the steps written out, no loop."""
  steps_first = lambda a: jnp.swapaxes(a, 0, 1)
  if gather:
    def gathered(state, key, rows, table, ids, codebook=None):
      return jax.lax.scan(lambda s, i: step(s, key, rows, table, i, codebook), state,
                          steps_first(ids), unroll=unroll)
    return gathered

  def host(state, key, z0, nb, codebook=None):
    return jax.lax.scan(lambda s, b: step(s, key, *b, codebook), state,
                        (steps_first(z0), steps_first(nb)), unroll=unroll)
  return host


def host_gather_step(step):
  """The step for batches gathered on the host: code rows (or float latents)
  travel, the codebook lookup runs on the device."""
  def hstep(state, key, z0, nb, codebook=None):
    return step(state, key, lookup(z0, codebook), lookup(nb, codebook))
  return hstep


def place_database(rows, codebook, table, gather: str, mesh):
  """(rows, codebook, table) placed for the gather: device -> replicated on
  every device; sharded -> rows and table split over the mesh, codebook
  replicated; host -> the codebook alone on the devices. Also returns the
  bytes this places on each device and keeps in host memory."""
  cb = None if codebook is None else parallel.put_replicated(codebook, mesh)
  if gather == "device":
    placed = (parallel.put_replicated(rows, mesh), cb, parallel.put_replicated(table, mesh))
  elif gather == "sharded":
    placed = (parallel.put_rows_sharded(rows, mesh), cb, parallel.put_rows_sharded(table, mesh))
  else:
    placed = (rows, cb, table)
  on_device = [x for x in placed if isinstance(x, jax.Array)]
  per_device = parallel.bytes_per_device(on_device)
  host = int(rows.nbytes + table.nbytes) if gather == "host" else 0
  return placed, {"database_bytes_per_device": max(per_device.values(), default=0),
                  "database_bytes_host": host}


# ---------------------------------------------------------------------------
# Building: the step functions, the train state, the train call.

@dataclasses.dataclass(frozen=True)
class Parts:
  """What a config's training needs, as functions; see `parts`."""
  model: object         # a denoiser (models/common.py's interface)
  schedule: object
  tx: optax.GradientTransformation
  step: object          # (state, key, z0, nb) -> (state, metrics)
  gather_step: object   # (state, key, rows, table, ids[, codebook]) -> (state, metrics)
  host_step: object     # (state, key, z0 rows, nb rows[, codebook]) -> (state, metrics)
  eval_loss: object     # (params, z0, nb, key) -> per-image loss, no condition dropout
  steps: object         # host_step over several steps: z0, nb rows (B, N, ...) (scan_steps)
  gather_steps: object  # gather_step over several: ids (B, N)
  unroll: bool = False  # the scanned steps written out (diffusion.train.unroll_steps)


_PARTS: dict = {}


def parts(config, latent_shape) -> Parts:
  """The model and step functions for a config, memoised on the config: a
  resumed or repeated run in the same process (tests, notebooks, benchmarks)
  passes the same function objects to jax.jit and so reuses their compiled code."""
  key = (wd.fingerprint(wd.config_sections(config, ("blocks", "model", "diffusion"))),
         tuple(latent_shape))
  if key not in _PARTS:
    model = models.make_denoiser(config, latent_shape)
    schedule, tx = make_schedule(config.diffusion), make_optimizer(config)
    step = make_train_step(model, schedule, tx, config)
    eval_loss = loss_fn(model, schedule, config.diffusion.prediction, 0.0, per_image=True)
    if len(_PARTS) >= 4:
      _PARTS.pop(next(iter(_PARTS)))
    gstep, hstep = device_gather_step(step), host_gather_step(step)
    unroll = bool(config.diffusion.train.unroll_steps)
    _PARTS[key] = Parts(model, schedule, tx, step, gstep, hstep, eval_loss,
                        scan_steps(hstep, gather=False, unroll=unroll),
                        scan_steps(gstep, gather=True, unroll=unroll), unroll)
  return _PARTS[key]


def build(config, latent_shape, k, mesh, seed: int):
  """(model, schedule, tx, state, state shardings) for a config, sharded on `mesh`."""
  p = parts(config, latent_shape)
  model, schedule, tx = p.model, p.schedule, p.tx
  # The partitionable threefry takes XLA:CPU seconds to compile per 4-d random
  # array (every conv kernel); the classic one compiles in a blink. Init runs
  # once, so it need not be partitionable.
  with jax.threefry_partitionable(False):
    state, shardings = parallel.sharded_init(init_fn(model, tx, latent_shape, k), mesh,
                                             config.mesh.logical_axis_rules,
                                             jax.random.PRNGKey(seed))
  return model, schedule, tx, state, shardings


def abstract_state(config, model, latent_shape, k, mesh):
  """(shape/dtype/sharding tree of the train state, its shardings): a restore
  target that costs no initialisation."""
  init = init_fn(model, make_optimizer(config), latent_shape, k)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = parallel.shardings_for(abstract, mesh, config.mesh.logical_axis_rules)
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)
  return like, shardings


def make_train_call(fns: Parts, gather: str, rows, codebook, table, stream, key, state_sh,
                    mesh, rules):
  """(call, placement bytes): call(state, s, n) -> (state, metrics) runs steps
  s..s+n-1 in one jitted call (metrics (n,) arrays when n > 1), batches from
  `stream`. The database (code rows + codebook, or float latents) and the
  neighbour table are placed by `gather` (place_database): the batch is
  gathered on the devices (device, sharded) or on the host (host)."""
  repl = parallel.replicated(mesh)
  bs = lambda nd: parallel.batch_sharding(mesh, rules, nd)
  (db_rows, db_cb, db_nbr), placed = place_database(rows, codebook, table, gather, mesh)
  cb_sh = None if db_cb is None else repl
  if gather in ("device", "sharded"):
    one = (fns.gather_step if gather == "device"
           else device_gather_step(fns.step, parallel.take_sharded(mesh)))
    many = (fns.gather_steps if gather == "device"
            else scan_steps(one, gather=True, unroll=fns.unroll))
    jit = lambda fn, ids_nd: jax.jit(
        fn, donate_argnums=(0,), out_shardings=(state_sh, repl),
        in_shardings=(state_sh, repl, db_rows.sharding, db_nbr.sharding, bs(ids_nd), cb_sh))
    one, many = jit(one, 1), jit(many, 2)
  else:
    # Async dispatch feeds the host gather ahead: step s+1's rows are gathered
    # while the devices still run step s (nothing here waits for a result).
    jit = lambda fn, extra: jax.jit(
        fn, donate_argnums=(0,), out_shardings=(state_sh, repl),
        in_shardings=(state_sh, repl, bs(rows.ndim + extra), bs(rows.ndim + 1 + extra), cb_sh))
    one, many = jit(fns.host_step, 0), jit(fns.steps, 1)

  def call(state, s, n):
    ids = (stream.indices(s) if n == 1 else
           np.stack([stream.indices(s + j) for j in range(n)], 1))   # (B, n): batch-major
    fn = one if n == 1 else many
    if gather != "host":
      return fn(state, key, db_rows, db_nbr, parallel.put_batch(ids, mesh, rules), db_cb)
    return fn(state, key, *parallel.put_batch((db_rows[ids], db_rows[db_nbr[ids]]), mesh, rules),
              db_cb)
  return call, placed
