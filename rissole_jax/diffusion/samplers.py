"""Samplers: DDPM ancestral and DDIM, each one `lax.fori_loop` (jit-friendly).

A sampler takes `model_fn(x_t, t) -> (eps, x0)` (t: (B,) int32), the schedule,
the starting noise x_T and a key; it returns x_0. `guided` turns a network that
predicts eps, x0 or v (with and without its condition) into such a function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.diffusion.schedule import Schedule
from rissole_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim")


def normal(key, shape, dtype=jnp.float32):
  """Standard normal drawn flat, then reshaped: the same distribution, but
  XLA:CPU compiles the partitionable threefry over a 1-d shape in a fraction
  of the time it takes over a 4-d one."""
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def step_noise(key, i, shape, dtype=jnp.float32):
  """Standard normal noise for step i. `key` is one key for the whole batch, or
  one raw key per row ((B, 2) uint32): then row r's noise depends only on its
  own key, so a sample does not change with the batch it is drawn in (its
  size, its padding, the devices it is split over)."""
  if key.ndim == 2:
    return jax.vmap(lambda k: normal(jax.random.fold_in(k, i), shape[1:], dtype))(key)
  return normal(jax.random.fold_in(key, i), shape, dtype)


def _tvec(x, t):
  return jnp.full((x.shape[0],), t, jnp.int32)


def _loops(body, n: int, n_high: int, model_fn, model_fn_low, x):
  """Steps [0, n_high) with model_fn, [n_high, n) with model_fn_low: two loops,
  so that each compiled loop holds only its own model (skipped work is gone
  from the program, not masked). Without model_fn_low, one loop as before."""
  if model_fn_low is None or n_high >= n:
    return jax.lax.fori_loop(0, n, lambda i, x: body(model_fn, i, x), x)
  if n_high > 0:
    x = jax.lax.fori_loop(0, n_high, lambda i, x: body(model_fn, i, x), x)
  return jax.lax.fori_loop(max(n_high, 0), n, lambda i, x: body(model_fn_low, i, x), x)


def ddpm(schedule: Schedule, model_fn, x_T, key, model_fn_low=None, t_switch=None):
  """Ancestral sampling through all T steps with the posterior variance;
  model_fn_low (if given) replaces model_fn for t < t_switch."""
  T = schedule.T

  def body(fn, i, x):
    t = T - 1 - i
    tv = _tvec(x, t)
    _, x0 = fn(x, tv)
    mean, _, logvar = schedule.q_posterior(x0, x, tv)
    z = step_noise(key, i, x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * logvar), 0.0) * z

  n_high = T - int(t_switch) if model_fn_low is not None else T   # steps with t >= t_switch
  return _loops(body, T, n_high, model_fn, model_fn_low, x_T)


def ddim_timesteps(T: int, steps: int) -> np.ndarray:
  """`steps` timesteps spread evenly over [0, T-1], ascending (all T when steps >= T)."""
  steps = min(int(steps), T)
  if steps < 1:
    raise ConfigError(f"sample.steps must be at least 1, got {steps}.")
  return np.unique(np.round(np.linspace(0, T - 1, steps)).astype(np.int32))


def ddim(schedule: Schedule, model_fn, x_T, key, steps: int, eta: float = 0.0,
         model_fn_low=None, t_switch=None):
  """DDIM (Song et al. 2021) on a subsequence of timesteps; eta=1 with every step
  is DDPM's ancestral sampler, eta=0 is deterministic. model_fn_low (if given)
  replaces model_fn for t < t_switch."""
  ts_np = ddim_timesteps(schedule.T, steps)
  ts = jnp.asarray(ts_np)
  n = ts.shape[0]

  def body(fn, i, x):
    j = n - 1 - i
    t = ts[j]
    tv = _tvec(x, t)
    eps, x0 = fn(x, tv)
    ab = schedule.alphas_cumprod[t]
    ab_prev = jnp.where(j > 0, schedule.alphas_cumprod[ts[jnp.maximum(j - 1, 0)]], 1.0)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    z = step_noise(key, i, x.shape, x.dtype)
    dir_xt = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0))
    return jnp.sqrt(ab_prev) * x0 + dir_xt * eps + sigma * z

  n_high = int(np.sum(ts_np >= int(t_switch))) if model_fn_low is not None else n
  return _loops(body, n, n_high, model_fn, model_fn_low, x_T)


def run_sampler(name: str, schedule: Schedule, model_fn, x_T, key, steps: int = 0,
                eta: float = 0.0, model_fn_low=None, t_switch=None):
  """x_0 from x_T. With model_fn_low and t_switch (an int timestep), steps at
  t < t_switch use model_fn_low (e.g. a LEGO stack with bricks skipped)."""
  if (model_fn_low is None) != (t_switch is None):
    raise ValueError("run_sampler: give model_fn_low and t_switch together.")
  if name == "ddpm":
    return ddpm(schedule, model_fn, x_T, key, model_fn_low, t_switch)
  if name == "ddim":
    return ddim(schedule, model_fn, x_T, key, steps, eta, model_fn_low, t_switch)
  raise ConfigError(f"Unknown sample.sampler {name!r}: use one of {SAMPLERS}.")


def guided(pred_fn, schedule: Schedule, prediction: str, scale: float = 1.0):
  """`model_fn` for the samplers from `pred_fn(x, t, keep) -> network output`,
  where keep (B,) bool says which rows see their retrieval condition (a
  model without a learned null may ignore it: scale 1 only asks for True).

  scale == 1: the conditional model alone. Otherwise classifier-free guidance,
  eps = eps_u + scale * (eps_c - eps_u) (two passes over the same batch).
  """
  def model_fn(x, t):
    B = x.shape[0]
    eps_c, x0_c = schedule.to_eps_x0(prediction, x, t, pred_fn(x, t, jnp.ones((B,), bool)))
    if scale == 1.0:
      return eps_c, x0_c
    eps_u, _ = schedule.to_eps_x0(prediction, x, t, pred_fn(x, t, jnp.zeros((B,), bool)))
    eps = eps_u + scale * (eps_c - eps_u)
    return eps, schedule.x0_from_eps(x, t, eps)
  return model_fn
