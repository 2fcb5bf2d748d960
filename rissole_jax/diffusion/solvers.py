"""Samplers: DDPM ancestral, DDIM and DPM-Solver++ (multistep), each a
`lax.fori_loop` (jit-friendly).

A sampler takes `model_fn(x_t, t) -> (eps, x0)` (t: (B,) int32), the schedule,
the starting noise x_T and a key; it returns x_0. `guided` turns a network that
predicts eps, x0 or v (with and without its condition) into such a function.

Every sampler can switch network part-way (`model_fn_low`, `t_switch`): the
steps at timesteps t >= t_switch use `model_fn`, the rest `model_fn_low`. The
loop is split into two loops, so each compiled segment contains only its own
network (what LEGO brick skipping needs to save FLOPs; a lax.cond would keep
both networks in one loop body).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.diffusion.schedule import Schedule
from rissole_jax.errors import ConfigError, check_choice

SAMPLERS = ("ddpm", "ddim", "dpmpp", "distilled")
# "distilled": a progressively distilled student (train/distill.py) run on
# the trailing grid of its step count by DDIM (eta=0: as it was trained).
DISTILLED = "distilled"
# Timestep spacings (Lu et al. 2022): "time_uniform" is DDIM's evenly spread
# timesteps (the authors' advice for guided sampling); "logsnr" is uniform in
# log-SNR (their advice for unguided sampling); "time_quadratic" crowds steps
# near t=0 (DDIM's alternative spacing); "trailing" is t_i = round(i T / n) - 1,
# i = 1..n (Lin et al. 2024): it starts at t = T-1 and its grid for n steps is
# every other point of its grid for 2n, which progressive distillation needs.
SPACINGS = ("time_uniform", "logsnr", "time_quadratic", "trailing")
ORDERS = (1, 2, 3)
# diffusers' rule: below this many steps, DPM-Solver++ lowers its order over
# the final steps (its higher-order corrections are unstable there).
LOWER_ORDER_FINAL_BELOW = 15


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


# ---------------------------------------------------------------------------
# Timesteps.

def ddim_timesteps(T: int, steps: int) -> np.ndarray:
  """`steps` timesteps spread evenly over [0, T-1], ascending (all T when steps >= T)."""
  steps = min(int(steps), T)
  if steps < 1:
    raise ConfigError(f"sample.steps must be at least 1, got {steps}.")
  return np.unique(np.round(np.linspace(0, T - 1, steps)).astype(np.int32))


def _distinct(ts: np.ndarray, T: int) -> np.ndarray:
  """Rounded timesteps made strictly increasing inside [0, T-1] without
  changing their count (rounding a dense spacing can merge neighbours, and
  the step count is what a user pays for and compares)."""
  ts = np.asarray(ts, np.int64).copy()
  n = len(ts)
  for j in range(1, n):
    ts[j] = max(ts[j], ts[j - 1] + 1)
  for j in range(n - 1, -1, -1):
    ts[j] = min(ts[j], T - n + j)
  return ts.astype(np.int32)


def timesteps(alphas_cumprod, steps: int, spacing: str = "time_uniform") -> np.ndarray:
  """`steps` distinct timesteps in [0, T-1], ascending, always including 0 and T-1."""
  ab = np.asarray(alphas_cumprod, np.float64)
  T = len(ab)
  if spacing == "time_uniform":
    return ddim_timesteps(T, steps)
  steps = min(int(steps), T)
  if steps < 1:
    raise ConfigError(f"sample.steps must be at least 1, got {steps}.")
  if spacing == "trailing":
    return trailing_timesteps(T, steps)
  if steps == 1:
    return np.array([T - 1], np.int32)
  if spacing == "time_quadratic":
    ts = np.linspace(0, np.sqrt(T - 1), steps) ** 2
  elif spacing == "logsnr":
    lam = 0.5 * np.log(ab / (1 - ab))                # decreasing in t
    target = np.linspace(lam[0], lam[-1], steps)
    ts = np.interp(-target, -lam, np.arange(T))      # np.interp needs increasing x
  else:
    check_choice("sample.spacing", spacing, SPACINGS)
  return _distinct(np.round(ts), T)


def trailing_timesteps(T: int, n: int) -> np.ndarray:
  """round(i T / n) - 1 for i = 1..n, ascending: the last is T-1, and the grid
  for n is the even-numbered points of the grid for 2n."""
  if not 1 <= n <= T:
    raise ConfigError(f"{n} trailing steps: need 1 to {T} (the schedule's timesteps).")
  i = np.arange(1, n + 1, dtype=np.int64)
  return ((2 * i * T + n) // (2 * n) - 1).astype(np.int32)   # exact integer rounding


def _split_point(ts_desc, t_switch) -> int:
  """How many of the descending timesteps run on the full model (t >= t_switch)."""
  if t_switch is None:
    return len(ts_desc)
  return int(np.sum(np.asarray(ts_desc) >= int(t_switch)))


def _loop(n, body, state, model_fn, model_fn_low, m):
  """fori_loop(0, n, body(model_fn)), but steps m.. with model_fn_low: two
  loops, each compiling only its own network."""
  if model_fn_low is None or m >= n:
    return jax.lax.fori_loop(0, n, functools.partial(body, model_fn), state)
  if m > 0:
    state = jax.lax.fori_loop(0, m, functools.partial(body, model_fn), state)
  return jax.lax.fori_loop(m, n, functools.partial(body, model_fn_low), state)


# ---------------------------------------------------------------------------
# The samplers.

def ddpm(schedule: Schedule, model_fn, x_T, key, model_fn_low=None, t_switch=None):
  """Ancestral sampling through all T steps with the posterior variance."""
  T = schedule.T

  def body(fn, i, x):
    t = T - 1 - i
    tv = _tvec(x, t)
    _, x0 = fn(x, tv)
    mean, _, logvar = schedule.q_posterior(x0, x, tv)
    z = step_noise(key, i, x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * logvar), 0.0) * z

  m = _split_point(np.arange(T)[::-1], t_switch)
  return _loop(T, body, x_T, model_fn, model_fn_low, m)


def ddim(schedule: Schedule, model_fn, x_T, key, steps: int, eta: float = 0.0,
         spacing: str = "time_uniform", model_fn_low=None, t_switch=None):
  """DDIM (Song et al. 2021) on a subsequence of timesteps; eta=1 with every step
  is DDPM's ancestral sampler, eta=0 is deterministic."""
  ts_np = timesteps(schedule.alphas_cumprod, steps, spacing)
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

  return _loop(n, body, x_T, model_fn, model_fn_low, _split_point(ts_np[::-1], t_switch))


def step_orders(n: int, order: int, lower_order_final: bool = True) -> np.ndarray:
  """The order of each of n multistep updates: warm-up from 1 (no history yet),
  first order into t=0's clean point (its log-SNR step is infinite), and with
  few steps lower orders over the final steps (Lu et al.; diffusers)."""
  i = np.arange(n)
  o = np.minimum(order, i + 1)
  if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
    o = np.minimum(o, n - i)
  o[-1] = 1
  return o.astype(np.int32)


def dpmpp_coefficients(alphas_cumprod, ts_desc, orders, sde: bool = False):
  """Per-step coefficients (n, 4) of DPM-Solver++ (multistep, data prediction;
  Lu et al. 2022, Alg. 2 and its third-order variant): the update is
  x_next = c[0] x + c[1] D0 + c[2] D_-1 + c[3] D_-2, with D the denoiser's x0
  at this and the previous two steps. The last step goes to the clean point
  (alpha 1, sigma 0), where every order reduces to x_next = D0, as DDIM's does.
  sde: SDE-DPM-Solver++ (orders 1-2; diffusers' "sde-dpmsolver++", midpoint):
  x_next = c[0] x + ... + c[4] z with z standard normal; its first order is
  DDIM with eta=1 (the same posterior step). Returns (n, 5), c[4] = 0 for the ODE.
  Computed with jnp, so a traced schedule works too."""
  ab = jnp.asarray(alphas_cumprod, jnp.float32)
  t = jnp.asarray(ts_desc)
  n = t.shape[0]
  a_s, s_s = jnp.sqrt(ab[t]), jnp.sqrt(1 - ab[t])
  lam_s = jnp.log(a_s) - jnp.log(s_s)
  last = jnp.arange(n) == n - 1
  nxt = jnp.concatenate([t[1:], t[-1:]])
  a_t = jnp.where(last, 1.0, jnp.sqrt(ab[nxt]))
  s_t = jnp.where(last, 0.0, jnp.sqrt(1 - ab[nxt]))
  lam_t = jnp.where(last, 0.0, jnp.log(a_t) - jnp.log(jnp.where(last, 1.0, s_t)))
  h = jnp.where(last, 1.0, lam_t - lam_s)
  lam_p1 = jnp.concatenate([lam_s[:1], lam_s[:-1]])      # lambda one step back
  lam_p2 = jnp.concatenate([lam_s[:2], lam_s[:-2]])[:n]  # two steps back
  o = jnp.asarray(orders)
  safe = lambda r, ok: jnp.where(ok, r, 1.0)
  r0 = safe((lam_s - lam_p1) / h, o >= 2)
  r1 = safe((lam_p1 - lam_p2) / h, o >= 3)
  phi1 = jnp.expm1(-h)
  phi2 = phi1 / h + 1.0
  phi3 = phi2 / h - 0.5
  cx = s_t / s_s
  # Order 1 (DDIM with eta=0 in log-SNR form).
  c1 = jnp.stack([cx, -a_t * phi1, 0 * cx, 0 * cx], -1)
  # Order 2 (the midpoint form): D1 = (D0 - D_-1) / r0.
  k = 0.5 * a_t * phi1 / r0
  c2 = jnp.stack([cx, -a_t * phi1 - k, k, 0 * cx], -1)
  # Order 3: D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1).
  a = 1 + r0 / (r0 + r1)
  b = r0 / (r0 + r1)
  e = 1 / (r0 + r1)
  k0 = a_t * (phi2 * a - phi3 * e) / r0
  k1 = a_t * (-phi2 * b + phi3 * e) / r1
  c3 = jnp.stack([cx, -a_t * phi1 + k0, -k0 + k1, -k1], -1)
  c = jnp.where((o == 1)[:, None], c1, jnp.where((o == 2)[:, None], c2, c3))
  noise = 0 * cx
  if sde:
    # x_t = (s_t/s_s) e^-h x + a_t (1 - e^-2h) (D0 + D1/2) + s_t sqrt(1 - e^-2h) z.
    em = jnp.exp(-h)
    A = a_t * (-jnp.expm1(-2 * h))
    s1 = jnp.stack([cx * em, A, 0 * cx, 0 * cx], -1)
    k = 0.5 * A / r0
    s2 = jnp.stack([cx * em, A + k, -k, 0 * cx], -1)
    c = jnp.where((o == 1)[:, None], s1, s2)
    noise = s_t * jnp.sqrt(-jnp.expm1(-2 * h))
  c = jnp.concatenate([c, noise[:, None]], -1)
  # Into the clean point: x = D0 (alpha_t = 1, sigma_t = 0, exp(-h) = 0).
  return jnp.where(last[:, None], jnp.array([0.0, 1.0, 0.0, 0.0, 0.0]), c)


def dpmpp(schedule: Schedule, model_fn, x_T, key, steps: int, order: int = 2,
          spacing: str = "time_uniform", lower_order_final: bool = True,
          model_fn_low=None, t_switch=None, eta: float = 0.0):
  """DPM-Solver++ (Lu et al. 2022), multistep. eta=0: the probability-flow
  ODE, orders 1-3, deterministic (the key is unused); order 1 is DDIM with
  eta=0 on the same timesteps. eta=1: SDE-DPM-Solver++, orders 1-2, noise
  from `key` as DDIM draws it; order 1 is DDIM with eta=1. One network
  evaluation a step."""
  if order not in ORDERS:
    raise ConfigError(f"sample.order={order}: DPM-Solver++ has orders {ORDERS}.")
  sde = _dpmpp_sde(eta, order)
  ts_np = timesteps(schedule.alphas_cumprod, steps, spacing)[::-1].copy()
  n = len(ts_np)
  coef = dpmpp_coefficients(schedule.alphas_cumprod, ts_np,
                            step_orders(n, order, lower_order_final), sde)
  ts = jnp.asarray(ts_np)

  def body(fn, i, state):
    x, d1, d2 = state
    _, d0 = fn(x, _tvec(x, ts[i]))
    c = coef[i].astype(x.dtype)
    x_next = c[0] * x + c[1] * d0 + c[2] * d1 + c[3] * d2
    if sde:
      x_next = x_next + c[4] * step_noise(key, i, x.shape, x.dtype)
    return x_next, d0, d1

  zeros = jnp.zeros_like(x_T)
  out, _, _ = _loop(n, body, (x_T, zeros, zeros), model_fn, model_fn_low,
                    _split_point(ts_np, t_switch))
  return out


def _dpmpp_sde(eta: float, order: int) -> bool:
  if eta not in (0.0, 1.0):
    raise ConfigError(f"sample.eta={eta} with sampler 'dpmpp': use 0 (DPM-Solver++, the ODE) "
                      "or 1 (SDE-DPM-Solver++).")
  if eta == 1.0 and order > 2:
    raise ConfigError(f"sample.order={order} with sample.eta=1: SDE-DPM-Solver++ has orders "
                      "1 and 2. Fix: --config.sample.order=2, or --config.sample.eta=0 for "
                      "the third-order ODE solver.")
  return eta == 1.0


def run_sampler(name: str, schedule: Schedule, model_fn, x_T, key, steps: int = 0,
                eta: float = 0.0, *, order: int = 2, spacing: str = "time_uniform",
                lower_order_final: bool = True, model_fn_low=None, t_switch=None,
                clip_x0: float = 0.0):
  """The one dispatch the sampling loop calls. `order` and `lower_order_final`
  are DPM-Solver++'s, `spacing` DDIM's and DPM-Solver++'s, `eta` DDIM's (any
  value in [0, 1]) and DPM-Solver++'s (0: ODE, 1: SDE).
  With model_fn_low and t_switch, steps at t < t_switch use model_fn_low
  (see the module docstring). clip_x0 > 0 clips the predicted x0 to
  [-clip_x0, clip_x0] (static thresholding) before every update."""
  if clip_x0:
    model_fn = clipped(schedule, model_fn, clip_x0)
    model_fn_low = model_fn_low and clipped(schedule, model_fn_low, clip_x0)
  switch = dict(model_fn_low=model_fn_low, t_switch=t_switch)
  if name == "ddpm":
    return ddpm(schedule, model_fn, x_T, key, **switch)
  if name == "ddim":
    return ddim(schedule, model_fn, x_T, key, steps, eta, spacing, **switch)
  if name == "dpmpp":
    return dpmpp(schedule, model_fn, x_T, key, steps, order, spacing, lower_order_final, **switch,
                 eta=eta)
  if name == DISTILLED:   # model_fn is the student's; eta=0 is how it was trained
    return ddim(schedule, model_fn, x_T, key, steps, eta, "trailing", **switch)
  check_choice("sample.sampler", name, SAMPLERS)


def clipped(schedule: Schedule, model_fn, c: float):
  """model_fn with x0 clipped to [-c, c] and eps made consistent with it:
  static thresholding (Saharia et al. 2022; Lu et al. use it with
  DPM-Solver++). For normalised latents c is about the data's largest |z|;
  it stops a poorly fitted model's x0 estimates at high noise from sending
  a deterministic sampler far outside the data."""
  def fn(x, t):
    _, x0 = model_fn(x, t)
    x0 = jnp.clip(x0, -c, c)
    return schedule.eps_from_x0(x, t, x0), x0
  return fn


def options(sample_cfg) -> dict:
  """run_sampler's solver keywords from a config's `sample` section."""
  get = lambda k, d: sample_cfg.get(k, d) if hasattr(sample_cfg, "get") else getattr(sample_cfg, k, d)
  # a distilled student runs on the grid it was trained on, whatever sample.spacing says
  spacing = "trailing" if get("sampler", "") == DISTILLED else get("spacing", "time_uniform")
  return {"order": int(get("order", 2)), "spacing": spacing,
          "lower_order_final": bool(get("lower_order_final", True)),
          "clip_x0": float(get("clip_x0", 0.0) or 0.0)}


def num_steps(sample_cfg, timesteps_T: int) -> int:
  """Network evaluations of one sampler run (one block, unguided)."""
  if sample_cfg.sampler == "ddpm":
    return timesteps_T
  return min(int(sample_cfg.steps), timesteps_T)


def check_config(sample_cfg, timesteps_T: int) -> None:
  """Refuses a sampler setting that cannot run, naming the fix."""
  s, opt = sample_cfg, options(sample_cfg)
  check_choice("sample.sampler", s.sampler, SAMPLERS)
  if s.sampler == "ddpm":
    return
  if s.steps < 1:
    raise ConfigError(f"sample.steps={s.steps}: {s.sampler} needs at least one step.")
  check_choice("sample.spacing", opt["spacing"], SPACINGS)
  if s.sampler == DISTILLED and s.steps > timesteps_T:
    raise ConfigError(f"sample.steps={s.steps} is more than the model's "
                      f"diffusion.timesteps={timesteps_T}.")
  if s.sampler == "dpmpp":
    order = opt["order"]
    if order not in ORDERS:
      raise ConfigError(f"sample.order={order}: DPM-Solver++ has orders {ORDERS}. Fix: "
                        "--config.sample.order=2 (or 3).")
    _dpmpp_sde(float(s.eta), order)
    if s.steps > timesteps_T:
      raise ConfigError(f"sample.steps={s.steps} is more than the model's "
                        f"diffusion.timesteps={timesteps_T}. Fix: at most {timesteps_T} steps.")
    # The last step is always first order (into the clean point) and the first
    # `order - 1` steps warm up: fewer steps than order + 1 never reach it.
    if s.steps < order + 1:
      raise ConfigError(f"sample.order={order} needs at least {order + 1} steps (one to warm "
                        f"up each extra order, and a first-order last step), got "
                        f"sample.steps={s.steps}. Fix: --config.sample.steps={order + 1} or "
                        f"more, or --config.sample.order={max(1, s.steps - 1)}.")


EVERY_STEP = (0.0, 1.0)


def guided_at(t, T: int, interval=EVERY_STEP):
  """Whether timestep(s) t are inside the guidance interval (lo <= t/T <= hi)."""
  lo, hi = interval
  frac = t / T
  return (frac >= lo) & (frac <= hi)


def guided(pred_fn, schedule: Schedule, prediction: str, scale: float = 1.0,
           interval=EVERY_STEP):
  """`model_fn` for the samplers from `pred_fn(x, t, keep) -> network output`,
  where keep (B,) bool says which rows see their retrieval condition (a
  model without a learned null may ignore it: scale 1 only asks for True).

  scale == 1: the conditional model alone. Otherwise classifier-free guidance,
  eps = eps_u + scale * (eps_c - eps_u) (two passes over the same batch), at
  the steps inside `interval` (fractions of T, sample.guidance_interval);
  elsewhere the conditional model alone, one pass (a lax.cond: the second
  pass is not run).
  """
  def conditional(x, t):
    B = x.shape[0]
    return schedule.to_eps_x0(prediction, x, t, pred_fn(x, t, jnp.ones((B,), bool)))

  def guided_fn(x, t):
    B = x.shape[0]
    eps_c, _ = conditional(x, t)
    eps_u, _ = schedule.to_eps_x0(prediction, x, t, pred_fn(x, t, jnp.zeros((B,), bool)))
    eps = eps_u + scale * (eps_c - eps_u)
    return eps, schedule.x0_from_eps(x, t, eps)

  if scale == 1.0:
    return conditional
  if tuple(interval) == EVERY_STEP:
    return guided_fn
  T = schedule.T

  def model_fn(x, t):  # every row of a sampler step shares its timestep
    return jax.lax.cond(guided_at(t[0], T, interval), guided_fn, conditional, x, t)
  return model_fn
