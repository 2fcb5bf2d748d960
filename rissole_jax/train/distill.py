"""Progressive distillation (Salimans & Ho 2022) of the block denoiser.

A student with n steps learns to do in one DDIM step (eta=0) what its
teacher does in two, on the trailing grid (solvers.trailing_timesteps): the
student's grid for n steps is every other point of the teacher's for 2n, so
student step t -> t'' spans teacher steps t -> t' -> t''. The student starts
as a copy of its teacher and keeps the teacher's retrieval condition (the
same blocks, neighbours and positions). Each round's student is the next
round's teacher: teacher_steps -> teacher_steps/2 -> ... -> min_steps.

For z_t = alpha_t x + sigma_t eps, the teacher's two steps give z_t''; the
student's x-estimate that reaches the same z_t'' in one step is

  x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),

and the loss is max(SNR_t, 1) |x_student - x~|^2 (truncated-SNR weighting).
The end of the last step is the clean point (alpha 1, sigma 0): x~ is then
the teacher's own final x-estimate.

The stage that runs the rounds is stages/distill.py; the sampler that runs a
student is solvers' "distilled".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rissole_jax.diffusion import solvers
from rissole_jax.errors import ConfigError
from rissole_jax.models import rows as model_rows
from rissole_jax.runtime import parallel
from rissole_jax.train import guard, optim
from rissole_jax.train import diffusion as dtrain


def student_counts(distill_cfg) -> list[int]:
  """The step counts of the students, one per round: teacher_steps/2 down to min_steps."""
  n, out = int(distill_cfg.teacher_steps) // 2, []
  while n >= int(distill_cfg.min_steps) and n >= 1:
    out.append(n)
    n //= 2
  return out


def check_config(config) -> None:
  d, T = config.distill, int(config.diffusion.timesteps)
  top, low = int(d.teacher_steps), int(d.min_steps)
  if low < 1 or top <= low or top > T or top % low or (top // low) & (top // low - 1):
    raise ConfigError(
        f"distill.teacher_steps={top}, distill.min_steps={low}: the teacher's steps must be "
        f"min_steps times a power of two (each round halves them), at most "
        f"diffusion.timesteps={T}. Fix: e.g. --config.distill.teacher_steps=16 "
        "--config.distill.min_steps=1.")
  t = d.train
  if t.steps < 1 or t.batch_size < 1:
    raise ConfigError("distill.train.steps (per round) and batch_size must be positive.")
  if not 0 <= t.ema_decay < 1:
    raise ConfigError(f"distill.train.ema_decay={t.ema_decay} must be in [0, 1).")
  guard.check_config(t, "distill.train")
  if float(config.sample.guidance_scale) != 1.0 and config.sample.sampler == solvers.DISTILLED:
    raise ConfigError("sample.sampler='distilled' distils the conditional model (guidance 1); "
                      f"sample.guidance_scale={config.sample.guidance_scale}. Fix: set it to 1.")


def grid(T: int, n: int) -> jnp.ndarray:
  """The teacher's points for a student of n steps: u_0 = -1 (the clean
  point), u_j = the trailing grid of 2n steps (j = 1..2n). Student step i
  (1..n) goes from u_2i to u_2i-2 through the teacher's u_2i-1."""
  return jnp.asarray(np.concatenate([[-1], solvers.trailing_timesteps(T, 2 * n)]), jnp.int32)


def _alpha_sigma(schedule, t, x):
  """alpha_t, sigma_t shaped against x; t = -1 is the clean point (1, 0)."""
  tc = jnp.maximum(t, 0)
  a = jnp.where(t >= 0, schedule.sqrt_alphas_cumprod[tc], 1.0)
  s = jnp.where(t >= 0, schedule.sqrt_one_minus_alphas_cumprod[tc], 0.0)
  shape = a.shape + (1,) * (x.ndim - 1)
  return a.reshape(shape), s.reshape(shape)


def ddim_step(schedule, prediction, apply_fn, z, t, t_next):
  """One deterministic DDIM step of the network `apply_fn(z, t)` from t to t_next."""
  eps, x0 = schedule.to_eps_x0(prediction, z, t, apply_fn(z, t))
  a, s = _alpha_sigma(schedule, t_next, z)
  return a * x0 + s * eps


def target(schedule, prediction, teacher_fn, z_t, t, t_mid, t_end):
  """x~: the x-estimate whose one DDIM step from t reaches where the
  teacher's two steps (t -> t_mid -> t_end) go."""
  z_end = ddim_step(schedule, prediction, teacher_fn, ddim_step(
      schedule, prediction, teacher_fn, z_t, t, t_mid), t_mid, t_end)
  a_t, s_t = _alpha_sigma(schedule, t, z_t)
  a_e, s_e = _alpha_sigma(schedule, t_end, z_t)
  r = s_e / s_t
  return (z_end - r * z_t) / (a_e - r * a_t)


def errors_fn(model, schedule, prediction: str, n: int, train: bool):
  """(params, teacher params, z0, neighbours, key) -> per-example weighted
  squared error of the student's x-estimate against x~ (examples: blocks
  folded into the batch), for a student of n steps."""
  u = grid(schedule.T, n)

  def errors(params, teacher, z0, nb, key):
    x0, cond = model_rows.model_inputs(model, z0, nb)
    ki, kn, kd = jax.random.split(key, 3)
    i = jax.random.randint(ki, (x0.shape[0],), 1, n + 1)
    t, t_mid, t_end = u[2 * i], u[2 * i - 1], u[2 * i - 2]
    z_t = schedule.q_sample(x0, t, solvers.normal(kn, x0.shape, x0.dtype))
    teach = lambda z, tt: model.apply({"params": teacher}, z, tt, **cond)
    x_tilde = jax.lax.stop_gradient(target(schedule, prediction, teach, z_t, t, t_mid, t_end))
    out = model.apply({"params": params}, z_t, t, **cond, train=train, rngs={"dropout": kd})
    _, x_student = schedule.to_eps_x0(prediction, z_t, t, out)
    snr = schedule.alphas_cumprod[t] / (1.0 - schedule.alphas_cumprod[t])
    err = jnp.square(x_student - x_tilde).reshape(x0.shape[0], -1).mean(1)
    return jnp.maximum(snr, 1.0) * err
  return errors


def make_train_step(model, schedule, tx, config, n: int):
  """step(state, key, z0, neighbours) -> (state, metrics); state holds the
  frozen teacher beside the student's params, EMA and optimizer."""
  t = config.distill.train
  errors = errors_fn(model, schedule, config.diffusion.prediction, n, train=True)
  loss = lambda p, teacher, z0, nb, key: jnp.mean(errors(p, teacher, z0, nb, key))

  def step(state, key, z0, nb):
    key = jax.random.fold_in(key, state["step"])
    value, grads = jax.value_and_grad(loss)(state["params"], state["teacher"], z0, nb, key)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = dtrain.ema_update(state["ema"], params, state["step"], t.ema_decay)
    new = {**state, "step": state["step"] + 1, "params": params, "ema": ema, "opt": opt}
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
    return guard.finite_step(t.nan_policy, state, new, metrics, value, metrics["grad_norm"],
                             params, ema)
  return step


def parts(config, model, schedule, n: int) -> dtrain.Parts:
  """The round's step functions in the shape the diffusion stage's train call takes."""
  tx = optim.adam(config.distill.train)
  step = make_train_step(model, schedule, tx, config, n)
  g, h = dtrain.device_gather_step(step), dtrain.host_gather_step(step)
  return dtrain.Parts(model, schedule, tx, step, g, h, None,
                      dtrain.scan_steps(h, gather=False), dtrain.scan_steps(g, gather=True))


def state_target(model, tx, latent_shape, k: int, mesh, rules):
  """(abstract state with shardings, shardings) of a round's train state."""
  import flax.linen as nn

  def init(key):
    x, tt, cond = model_rows.init_inputs(model, latent_shape, k)
    p = model.init({"params": key}, x, tt, **cond)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": p, "ema": p, "opt": tx.init(p),
            "teacher": p}
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = parallel.shardings_for(abstract, mesh, rules)
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)
  return like, shardings


def initial_state(tx, teacher_params, shardings):
  """A round's first state: the student, its EMA and its teacher all the teacher."""
  make = lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "ema": p,
                    "opt": tx.init(p), "teacher": p}
  return jax.jit(make, out_shardings=shardings)(teacher_params)


def match_error(model, schedule, prediction: str, n: int, student, teacher, z0, nb,
                batch: int = 64, seed: int = 4321) -> float:
  """The mean weighted error of `student`'s one step against `teacher`'s two
  on fixed latents z0 (their neighbours nb), with fixed noise and steps: how
  well a student of n steps matches its teacher (student = teacher: before
  training)."""
  fn = jax.jit(errors_fn(model, schedule, prediction, n, train=False))
  key, values = jax.random.PRNGKey(seed), []
  for b, start in enumerate(range(0, len(z0), batch)):
    idx = np.arange(start, start + batch) % len(z0)   # static shape; the tail wraps
    v = fn(student, teacher, z0[idx], nb[idx], jax.random.fold_in(key, b))
    values.append(np.asarray(v).reshape(batch, -1).mean(1)[:min(batch, len(z0) - start)])
  return float(np.mean(np.concatenate(values)))
