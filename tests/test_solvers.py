"""Few-step solvers (DPM-Solver++) on a Gaussian toy whose probability-flow
ODE has a closed-form solution, their timestep spacings and config checks,
and the model switch at t_switch every sampler offers (LEGO brick skipping)."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from rissole_jax.defaults import base_config
from rissole_jax.diffusion import solvers as samplers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError

MU, SD = np.array([1.0, -2.0], np.float32), np.array([0.5, 2.0], np.float32)


def gaussian_model(schedule):
  """Exact E[eps | x_t] for data ~ N(MU, SD^2) (per dimension)."""
  def model_fn(x, t):
    ab = schedule.alphas_cumprod[t][:, None]
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SD ** 2 + 1 - ab)
    return eps, schedule.x0_from_eps(x, t, eps)
  return model_fn


def exact_output(schedule, x_T):
  """What a solver with infinitely many steps returns: the ODE solution at
  t=0 (for Gaussian marginals N(a MU, a^2 SD^2 + s^2) the standardised
  x_t is constant along the flow), then the final jump to the denoiser's x0."""
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  var = lambda t: ab[t] * SD ** 2 + 1 - ab[t]
  T = len(ab)
  x0 = np.sqrt(ab[0]) * MU + np.sqrt(var(0) / var(T - 1)) * (x_T - np.sqrt(ab[T - 1]) * MU)
  # E[x0 | x_t] at t = 0.
  return MU + np.sqrt(ab[0]) * SD ** 2 / var(0) * (x0 - np.sqrt(ab[0]) * MU)


@pytest.fixture(scope="module")
def toy():
  s = make_schedule(base_config().diffusion)   # T=1000, linear
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (512, 2)))
  return s, gaussian_model(s), x_T, exact_output(s, np.asarray(x_T, np.float64))


def _solve(s, fn, x_T, steps, order, spacing="time_uniform", lower_order_final=False):
  run = jax.jit(lambda x: samplers.dpmpp(s, fn, x, None, steps, order, spacing, lower_order_final))
  return np.asarray(run(jnp.asarray(x_T)), np.float64)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_converges_at_its_order(toy, order):
  """Error against the exact ODE solution halves per doubling of steps at
  order 1 and quarters at order 2. Order 3's global order is capped at 2 by
  its first-order warm-up step (as in the authors' multistep solver), but its
  error is the smallest."""
  s, fn, x_T, ref = toy
  steps = (24, 48, 96)
  errs = [np.abs(_solve(s, fn, x_T, n, order, "logsnr") - ref).max() for n in steps]
  rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
  assert np.all(rates > min(order, 2) - 0.3), (errs, rates)
  if order > 1:
    lower = np.abs(_solve(s, fn, x_T, 96, order - 1, "logsnr") - ref).max()
    assert errs[-1] < lower / (1.5 if order == 3 else 10), (errs, lower)


def test_dpmpp_order1_is_ddim_eta0(toy):
  s, fn, x_T, _ = toy
  for spacing in ("time_uniform", "logsnr"):
    ddim = jax.jit(lambda x: samplers.ddim(s, fn, x, jax.random.PRNGKey(0), 10, 0.0, spacing))
    np.testing.assert_allclose(_solve(s, fn, x_T, 10, 1, spacing), np.asarray(ddim(x_T)),
                               atol=1e-5, rtol=1e-5)


def test_sde_dpmpp_order1_is_ddim_eta1(toy):
  s, fn, x_T, _ = toy
  key = jax.random.PRNGKey(5)
  for spacing in ("time_uniform", "logsnr"):
    sde = jax.jit(lambda x: samplers.dpmpp(s, fn, x, key, 10, 1, spacing, eta=1.0))
    ddim = jax.jit(lambda x: samplers.ddim(s, fn, x, key, 10, 1.0, spacing))
    np.testing.assert_allclose(np.asarray(sde(x_T)), np.asarray(ddim(x_T)), atol=1e-4, rtol=1e-4)
  # Second order lands on the data distribution in few steps.
  big = jax.random.normal(jax.random.PRNGKey(1), (8000, 2))
  out = np.asarray(jax.jit(lambda x: samplers.dpmpp(s, fn, x, key, 20, 2, "logsnr", eta=1.0))(big))
  np.testing.assert_allclose(out.mean(0), MU, atol=0.06)
  np.testing.assert_allclose(out.std(0), SD, rtol=0.06)


def test_few_steps_beat_ddim(toy):
  """The point of the solver: at 10 network evaluations its error is a
  third or less of DDIM's."""
  s, fn, x_T, ref = toy
  err = lambda o, sp: np.abs(_solve(s, fn, x_T, 10, o, sp, True) - ref).max()
  assert err(2, "logsnr") < err(1, "time_uniform") / 3
  assert err(3, "logsnr") < err(1, "time_uniform") / 1.5   # order 3 pays off with more steps


def test_spacings():
  ab = np.asarray(make_schedule(base_config().diffusion).alphas_cumprod)
  lam = 0.5 * np.log(ab / (1 - ab))
  for spacing in samplers.SPACINGS:
    for n in (1, 2, 5, 20, 100, 999, 1000, 5000):
      ts = samplers.timesteps(ab, n, spacing)
      assert len(ts) == min(n, 1000), (spacing, n)
      m = min(n, 1000)   # trailing starts one step in (round(T/m) - 1), the others at 0
      first = (2000 + m) // (2 * m) - 1 if spacing == "trailing" else 0
      assert n == 1 or (ts[-1] == 999 and ts[0] == first), (spacing, n, ts[:3])
      assert np.all(np.diff(ts) > 0)
  ts = samplers.timesteps(ab, 20, "logsnr")
  dl = -np.diff(lam[ts])
  assert dl.max() / dl.min() < 1.5   # nearly uniform in log-SNR (rounded to integers)
  assert samplers.timesteps(ab, 50, "time_uniform").tolist() == \
      samplers.ddim_timesteps(1000, 50).tolist()
  with pytest.raises(ConfigError, match="spacing"):
    samplers.timesteps(ab, 10, "karras")


def test_step_orders():
  assert samplers.step_orders(5, 3).tolist() == [1, 2, 3, 2, 1]
  assert samplers.step_orders(20, 3).tolist() == [1, 2] + [3] * 17 + [1]
  assert samplers.step_orders(20, 2, False).tolist() == [1] + [2] * 18 + [1]


def _sample_cfg(**kw):
  s = base_config().sample
  s.update(**kw)
  return s


def test_check_config_refuses_with_fix():
  samplers.check_config(_sample_cfg(sampler="dpmpp", steps=10, order=3, spacing="logsnr", eta=0.0), 1000)
  samplers.check_config(_sample_cfg(sampler="ddpm", steps=0), 1000)
  with pytest.raises(ConfigError, match="at least 4 steps.*sample.order=2"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=3, order=3, eta=0.0), 1000)
  with pytest.raises(ConfigError, match="orders"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=10, order=4), 1000)
  with pytest.raises(ConfigError, match="SDE-DPM-Solver.. has orders 1 and 2.*order=2"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=10, order=3, eta=1.0), 1000)
  with pytest.raises(ConfigError, match="use 0 .* or 1"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=10, order=2, eta=0.5), 1000)
  with pytest.raises(ConfigError, match="spacing"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=10, spacing="karras"), 1000)
  with pytest.raises(ConfigError, match="at most 50"):
    samplers.check_config(_sample_cfg(sampler="dpmpp", steps=100), 50)
  with pytest.raises(ConfigError, match="Unknown sample.sampler"):
    samplers.check_config(_sample_cfg(sampler="euler"), 1000)


# ---------------------------------------------------------------------------
# The model switch (the contract LEGO brick skipping builds on).

SWITCH_CASES = [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.0}),
                ("dpmpp", {"order": 2}), ("dpmpp", {"order": 3, "spacing": "logsnr"}),
                ("dpmpp", {"order": 2, "eta": 1.0})]


@pytest.fixture(scope="module")
def small():
  c = base_config().diffusion
  c.timesteps = 40
  s = make_schedule(c)
  return s, gaussian_model(s), jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)


@pytest.mark.parametrize("name,kw", SWITCH_CASES)
def test_switch_with_the_same_model_changes_nothing(small, name, kw):
  s, fn, x_T = small
  key = jax.random.PRNGKey(3)
  run = lambda **sw: np.asarray(jax.jit(lambda x: samplers.run_sampler(
      name, s, fn, x, key, 8, **kw, **sw))(x_T))
  base = run()
  np.testing.assert_array_equal(run(model_fn_low=fn, t_switch=0), base)
  # Split loops compile separately, so XLA may fuse an update differently:
  # equal up to float32 rounding.
  for t_switch in (1, 17, 39, 40):
    np.testing.assert_allclose(run(model_fn_low=fn, t_switch=t_switch), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", SWITCH_CASES)
def test_switch_compiles_each_model_into_its_own_loop(small, name, kw):
  """Steps at t >= t_switch see only model_fn, the rest only model_fn_low,
  and no loop body contains both (so skipping bricks really saves FLOPs)."""
  s, fn, x_T = small
  t_switch = 17

  def marked(prim, ok):
    def f(x, t):
      eps, x0 = fn(x, t)
      bad = jnp.where(ok(t)[:, None], 0.0, jnp.nan)
      return eps + 0 * prim(x) + bad, x0 + bad
    return f
  hi = marked(jnp.sin, lambda t: t >= t_switch)
  lo = marked(jnp.cos, lambda t: t < t_switch)
  f = lambda x: samplers.run_sampler(name, s, hi, x, jax.random.PRNGKey(0), 8, **kw,
                                     model_fn_low=lo, t_switch=t_switch)
  assert np.all(np.isfinite(np.asarray(jax.jit(f)(x_T))))
  # fori_loop with static bounds is a scan (a while loop otherwise).
  loops = [e for e in jax.make_jaxpr(f)(x_T).jaxpr.eqns if e.primitive.name in ("scan", "while")]
  bodies = [str(e.params.get("jaxpr") or e.params["body_jaxpr"]) for e in loops]
  assert len(bodies) == 2
  assert ("sin" in bodies[0]) != ("cos" in bodies[0]) and ("sin" in bodies[1]) != ("cos" in bodies[1])
  assert "sin" in bodies[0] and "cos" in bodies[1]


def test_clip_x0_bounds_the_prediction(small):
  s, fn, x_T = small
  wide = lambda x, t: (fn(x, t)[0], 100.0 * fn(x, t)[1])
  out = samplers.run_sampler("dpmpp", s, wide, x_T, jax.random.PRNGKey(0), 6, 0.0, clip_x0=3.0)
  assert np.abs(np.asarray(out)).max() <= 3.0 + 1e-5     # the last step returns x0 itself
  same = samplers.run_sampler("ddim", s, fn, x_T, jax.random.PRNGKey(0), 6, 1.0, clip_x0=1e6)
  np.testing.assert_allclose(same, samplers.run_sampler("ddim", s, fn, x_T, jax.random.PRNGKey(0), 6, 1.0),
                             rtol=1e-5, atol=1e-5)
