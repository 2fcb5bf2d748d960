"""The noise schedule against closed forms."""
import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from rissole_jax.diffusion import schedule as sch
from rissole_jax.errors import ConfigError


def cfg(**kw):
  c = mlc.ConfigDict(dict(timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02))
  c.update(kw)
  return c


def test_linear_alphas_cumprod():
  s = sch.make_schedule(cfg())
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=1e-6)
  assert s.alphas_cumprod_prev[0] == 1.0 and s.T == 1000
  assert float(s.alphas_cumprod[-1]) < 1e-4  # ends near pure noise
  # A shorter schedule is rescaled so that it too ends near pure noise.
  assert float(sch.make_schedule(cfg(timesteps=50)).alphas_cumprod[-1]) < 1e-3


def test_cosine_alphas_cumprod():
  T, s_ = 200, 0.008
  s = sch.make_schedule(cfg(schedule="cosine", timesteps=T))
  f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
  want = np.array([f(t + 1) / f(0) for t in range(T)])
  np.testing.assert_allclose(s.alphas_cumprod[:-5], want[:-5], rtol=1e-4)
  assert np.all(np.asarray(s.betas) <= 0.999)


def test_q_sample_mean_and_variance():
  s = sch.make_schedule(cfg())
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)][:, None]
  mean, var = s.q_mean_variance(x0, t)
  np.testing.assert_allclose(mean, np.sqrt(ab) * x0, rtol=1e-5, atol=1e-6)
  var = np.broadcast_to(var, x0.shape)
  np.testing.assert_allclose(var, np.broadcast_to(1 - ab, x0.shape), rtol=1e-4, atol=1e-6)
  # q_sample is that Gaussian: exact in the noise, and right empirically.
  np.testing.assert_allclose(s.q_sample(x0, t, jnp.zeros_like(x0)), mean, rtol=1e-6)
  noise = jnp.asarray(np.random.default_rng(1).normal(size=(20000, 4, 3)), jnp.float32)
  xt = np.asarray(jax.vmap(lambda n: s.q_sample(x0, t, n))(noise))
  np.testing.assert_allclose(xt.mean(0), mean, atol=0.03)
  np.testing.assert_allclose(xt.var(0), var, rtol=0.05, atol=1e-3)


def test_posterior_against_gaussian_product():
  """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1-ab_{t-1})."""
  s = sch.make_schedule(cfg(timesteps=100))
  betas = np.asarray(s.betas, np.float64)
  ab = np.cumprod(1 - betas)
  rng = np.random.default_rng(0)
  x0, xt = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
  t = np.array([1, 40, 99])
  mean, var, logvar = s.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), t)
  a, b, abp = 1 - betas[t][:, None], betas[t][:, None], ab[t - 1][:, None]
  prec = a / b + 1 / (1 - abp)
  want_var = 1 / prec
  want_mean = want_var * (np.sqrt(a) * xt / b + np.sqrt(abp) * x0 / (1 - abp))
  np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.broadcast_to(var, (3, 2)), np.broadcast_to(want_var, (3, 2)), rtol=1e-4)
  np.testing.assert_allclose(np.exp(np.broadcast_to(logvar, (3, 2))), np.broadcast_to(want_var, (3, 2)), rtol=1e-4)
  # At t=0 the posterior is x_0 itself (variance 0, log variance clipped).
  m0, v0, lv0 = s.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), np.zeros(3, int))
  np.testing.assert_allclose(m0, x0, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(v0) == 0) and np.all(np.isfinite(lv0))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_eps_x0_v_round_trips(kind):
  s = sch.make_schedule(cfg(schedule=kind, timesteps=300))
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.normal(size=(5, 2, 2, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(5, 2, 2, 3)), jnp.float32)
  t = jnp.array([0, 3, 100, 250, 299])
  xt = s.q_sample(x0, t, eps)
  tol = dict(rtol=1e-3, atol=2e-3)
  np.testing.assert_allclose(s.x0_from_eps(xt, t, eps), x0, **tol)
  np.testing.assert_allclose(s.eps_from_x0(xt, t, x0), eps, **tol)
  v = s.v_from(x0, eps, t)
  np.testing.assert_allclose(s.x0_from_v(xt, t, v), x0, **tol)
  np.testing.assert_allclose(s.eps_from_v(xt, t, v), eps, **tol)
  for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
    np.testing.assert_allclose(s.target(pred, x0, eps, t), out, rtol=1e-6)
    e, x = s.to_eps_x0(pred, xt, t, out)
    np.testing.assert_allclose(e, eps, rtol=1e-2, atol=1e-2)  # eps from x0 is ill-posed at t=0
    np.testing.assert_allclose(x, x0, **tol)


def test_schedule_is_a_pytree_and_refuses_bad_config():
  s = sch.make_schedule(cfg(timesteps=10))
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 9 and all(l.shape == (10,) for l in leaves)
  assert jax.jit(lambda s: s.alphas_cumprod.sum())(s) > 0
  with pytest.raises(ConfigError):
    sch.make_schedule(cfg(schedule="quadratic"))
  with pytest.raises(ConfigError):
    sch.make_schedule(cfg(timesteps=1))
  with pytest.raises(ValueError):
    s.target("score", 0, 0, 0)
