"""The noise schedule as a value: arrays of length T and the closed forms on them.

q(x_t | x_0)        = N(sqrt(ab_t) x_0, (1 - ab_t) I),   ab_t = prod_{s<=t} (1 - beta_s)
q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)
v                   = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0   (Salimans & Ho, 2022)

Timesteps are 0-based: t = 0 is the first noising step, t = T-1 the last.
The schedule is a pytree (flax.struct), so it passes through jit as arrays.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import struct

from rissole_jax.errors import ConfigError, check_choice

PREDICTIONS = ("eps", "x0", "v")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021): ab(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f(t + 1) / f(t), max_beta) for t in range(T)], np.float64)


@struct.dataclass
class Schedule:
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance: jnp.ndarray   # clipped at t=0, where the variance is 0
  posterior_mean_coef1: jnp.ndarray     # multiplies x_0
  posterior_mean_coef2: jnp.ndarray     # multiplies x_t

  @property
  def T(self) -> int:
    return self.betas.shape[0]

  # --- forward process ------------------------------------------------------
  def q_mean_variance(self, x0, t):
    return _bc(self.sqrt_alphas_cumprod, t, x0) * x0, _bc(1 - self.alphas_cumprod, t, x0)

  def q_sample(self, x0, t, noise):
    return (_bc(self.sqrt_alphas_cumprod, t, x0) * x0
            + _bc(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

  def q_posterior(self, x0, xt, t):
    """Mean, variance and log variance of q(x_{t-1} | x_t, x_0)."""
    mean = _bc(self.posterior_mean_coef1, t, xt) * x0 + _bc(self.posterior_mean_coef2, t, xt) * xt
    return mean, _bc(self.posterior_variance, t, xt), _bc(self.posterior_log_variance, t, xt)

  # --- conversions between parameterisations --------------------------------
  def x0_from_eps(self, xt, t, eps):
    return (xt - _bc(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / _bc(
        self.sqrt_alphas_cumprod, t, xt)

  def eps_from_x0(self, xt, t, x0):
    return (xt - _bc(self.sqrt_alphas_cumprod, t, xt) * x0) / _bc(
        self.sqrt_one_minus_alphas_cumprod, t, xt)

  def v_from(self, x0, eps, t):
    return (_bc(self.sqrt_alphas_cumprod, t, x0) * eps
            - _bc(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

  def x0_from_v(self, xt, t, v):
    return _bc(self.sqrt_alphas_cumprod, t, xt) * xt - _bc(
        self.sqrt_one_minus_alphas_cumprod, t, xt) * v

  def eps_from_v(self, xt, t, v):
    return _bc(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt + _bc(
        self.sqrt_alphas_cumprod, t, xt) * v

  def target(self, prediction: str, x0, eps, t):
    """What a network predicting `prediction` is trained to output."""
    if prediction == "eps":
      return eps
    if prediction == "x0":
      return x0
    if prediction == "v":
      return self.v_from(x0, eps, t)
    check_choice("diffusion.prediction", prediction, PREDICTIONS, ValueError)

  def to_eps_x0(self, prediction: str, xt, t, out):
    """(eps, x0) implied by a network output `out` of kind `prediction`."""
    if prediction == "eps":
      return out, self.x0_from_eps(xt, t, out)
    if prediction == "x0":
      return self.eps_from_x0(xt, t, out), out
    if prediction == "v":
      return self.eps_from_v(xt, t, out), self.x0_from_v(xt, t, out)
    check_choice("diffusion.prediction", prediction, PREDICTIONS, ValueError)


def _bc(arr, t, x):
  """arr[t] shaped to broadcast against x (t: scalar or (B,) for x (B, ...))."""
  a = arr[t]
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def from_betas(betas) -> Schedule:
  """All derived arrays, computed in float64 and stored as float32."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-d array in (0, 1).")
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  f = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f(betas), alphas_cumprod=f(ab), alphas_cumprod_prev=f(ab_prev),
      sqrt_alphas_cumprod=f(np.sqrt(ab)), sqrt_one_minus_alphas_cumprod=f(np.sqrt(1 - ab)),
      posterior_variance=f(post_var), posterior_log_variance=f(post_logvar),
      posterior_mean_coef1=f(betas * np.sqrt(ab_prev) / (1 - ab)),
      posterior_mean_coef2=f((1 - ab_prev) * np.sqrt(alphas) / (1 - ab)))


def make_schedule(diffusion_cfg) -> Schedule:
  """The schedule named by a config's `diffusion` section."""
  T, kind = int(diffusion_cfg.timesteps), diffusion_cfg.schedule
  if T < 2:
    raise ConfigError(f"diffusion.timesteps must be at least 2, got {T}.")
  if kind == "linear":
    # Ho et al.'s 1e-4..0.02 is for T=1000; scale it so shorter schedules
    # still end near pure noise (as improved-diffusion does).
    scale = 1000.0 / T
    return from_betas(linear_betas(T, diffusion_cfg.beta_start * scale,
                                   min(diffusion_cfg.beta_end * scale, 0.999)))
  if kind == "cosine":
    return from_betas(cosine_betas(T))
  check_choice("diffusion.schedule", kind, ("linear", "cosine"))
