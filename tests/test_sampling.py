"""Samplers on a toy with a known answer, pseudo-queries, the jitted block
sampler, and the diffusion + sample stages end to end on a tiny database."""
import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import blocks
from rissole_jax.stages.context import Context
from rissole_jax.defaults import apply_variants, base_config
from rissole_jax.diffusion import solvers as samplers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.models import make_denoiser, unet
from rissole_jax.inference import loading, program, queries
from rissole_jax.stages import diffusion as diffusion_stage
from rissole_jax.stages import sample as sample_stage

SHAPE, K = (8, 8, 4), 3


def tiny(variant="rissole", **model):
  """The smallest denoiser (no residual blocks outside the middle, no
  self-attention): these tests are about the sampler and the stages, and
  every compile costs seconds on a CPU."""
  c = base_config()
  c.model.update(variant=variant, ch=8, ch_mult=(1,), num_res_blocks=0, attn_lowest=False,
                 num_groups=2)
  c.model.update(**model)
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  c.diffusion.train.update(steps=4, batch_size=8, warmup_steps=1, ckpt_every=2, log_every=2)
  c.sample.update(num=6, batch_size=4, steps=3, show=2)
  return c


# ---------------------------------------------------------------------------
# Samplers against a Gaussian toy whose optimal denoiser is known in closed form.

MU, SD = np.array([1.0, -2.0], np.float32), np.array([0.5, 2.0], np.float32)


def gaussian_model(schedule):
  """Exact E[eps | x_t] for data ~ N(MU, SD^2) (per dimension)."""
  def model_fn(x, t):
    ab = schedule.alphas_cumprod[t][:, None]
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SD ** 2 + 1 - ab)
    return eps, schedule.x0_from_eps(x, t, eps)
  return model_fn


def test_ddim_eta1_all_steps_matches_ddpm_in_distribution():
  s = make_schedule(base_config().diffusion)          # T=1000, linear, as the paper
  model_fn = gaussian_model(s)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (8000, 2))
  run = jax.jit(lambda x, k, steps, eta: samplers.ddim(s, model_fn, x, k, steps, eta),
                static_argnums=(2, 3))
  ddpm = np.asarray(jax.jit(lambda x, k: samplers.ddpm(s, model_fn, x, k))(x_T, jax.random.PRNGKey(1)))
  ddim = np.asarray(run(x_T, jax.random.PRNGKey(2), 1000, 1.0))
  for out in (ddpm, ddim):
    np.testing.assert_allclose(out.mean(0), MU, atol=0.05)
    np.testing.assert_allclose(out.std(0), SD, rtol=0.03)
  np.testing.assert_allclose(ddim.mean(0), ddpm.mean(0), atol=0.06)
  np.testing.assert_allclose(ddim.std(0), ddpm.std(0), rtol=0.04)
  # With the same noise, DDIM(eta=1, every step) is the DDPM sampler itself.
  same = np.asarray(run(x_T, jax.random.PRNGKey(1), 1000, 1.0))
  np.testing.assert_allclose(same, ddpm, atol=2e-3)
  # Deterministic DDIM with 50 steps lands on the same distribution, roughly.
  ode = np.asarray(run(x_T, jax.random.PRNGKey(3), 50, 0.0))
  np.testing.assert_allclose(ode.mean(0), MU, atol=0.05)
  np.testing.assert_allclose(ode.std(0), SD, rtol=0.1)


def test_ddim_timesteps_and_guidance_formula():
  assert samplers.ddim_timesteps(1000, 1000).tolist() == list(range(1000))
  ts = samplers.ddim_timesteps(1000, 50)
  assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
  c = base_config().diffusion
  c.timesteps = 10
  s = make_schedule(c)
  x, t = jnp.ones((3, 2)), jnp.array([1, 5, 9])
  pred = lambda x, t, keep: jnp.where(keep[:, None], 2.0, 0.5) * x   # eps: 2x with, 0.5x without
  eps, x0 = samplers.guided(pred, s, "eps", 3.0)(x, t)
  np.testing.assert_allclose(eps, 0.5 + 3.0 * (2.0 - 0.5))
  np.testing.assert_allclose(x0, s.x0_from_eps(x, t, eps))
  eps1, _ = samplers.guided(pred, s, "eps", 1.0)(x, t)
  np.testing.assert_allclose(eps1, 2.0)
  # sample.guidance_interval: guided where lo <= t/T <= hi, the conditional
  # model alone elsewhere (every row of a step shares t).
  for tt, want in ((2, 2.0), (5, 0.5 + 3.0 * 1.5), (8, 0.5 + 3.0 * 1.5), (9, 2.0)):
    eps, _ = jax.jit(samplers.guided(pred, s, "eps", 3.0, (0.5, 0.8)))(x, jnp.full((3,), tt))
    np.testing.assert_allclose(eps, want, err_msg=f"t={tt}")


# ---------------------------------------------------------------------------
# Pseudo-queries never see themselves.

def test_pseudo_queries_exclude_themselves():
  rng = np.random.default_rng(0)
  n = 50
  table = np.stack([rng.choice(np.delete(np.arange(n), i), K, replace=False) for i in range(n)])
  for mode in ("uniform", "frequent"):
    q = queries.pseudo_queries(table, 20, mode, seed=0)
    assert len(set(q.tolist())) == 20                       # without replacement
    ids = queries.query_neighbours(table, q)
    assert ids.shape == (20, K) and not np.any(ids == q[:, None])
    np.testing.assert_array_equal(q, queries.pseudo_queries(table, 20, mode, seed=0))
  # 'frequent' draws only retrieved items, in proportion to how often they are.
  skewed = np.tile(np.array([[1, 2, 3]]), (n, 1))
  skewed[1:4] = [[0, 2, 3], [0, 1, 3], [0, 1, 2]]
  q = queries.pseudo_queries(skewed, 200, "frequent", seed=1)
  assert set(q.tolist()) <= {0, 1, 2, 3}
  assert np.bincount(q, minlength=4)[1:4].min() > np.bincount(q, minlength=4)[0]
  bad = table.copy()
  bad[7, 0] = 7
  with pytest.raises(DataError, match="own neighbours"):
    queries.query_neighbours(bad, np.array([3, 7]))
  with pytest.raises(ConfigError):
    queries.pseudo_queries(table, 5, "popular", 0)


def test_sampling_config_errors():
  c = tiny()
  c.sample.guidance_scale = 2.0
  with pytest.raises(ConfigError, match="cond_dropout"):
    program.check_config(c)
  c.diffusion.cond_dropout = 0.1
  program.check_config(c)
  c = tiny("blocks_only")
  c.sample.guidance_scale = 2.0
  with pytest.raises(ConfigError, match="no retrieval"):
    program.check_config(c)
  c = tiny()
  c.sample.sampler = "euler"
  with pytest.raises(ConfigError, match="sampler"):
    program.check_config(c)
  c = tiny()
  for bad in ((0.6, 0.4), (0.0, 1.5), (0.5,)):
    c.sample.guidance_interval = bad
    with pytest.raises(ConfigError, match="guidance_interval"):
      program.check_config(c)
  # The `guided` variant: dropout in training, guidance on the high-noise half.
  g = apply_variants(tiny(), "guided")
  program.check_config(g)
  assert g.diffusion.cond_dropout == 0.1 and g.sample.guidance_scale == 3.0
  assert tuple(g.sample.guidance_interval) == (0.5, 1.0)
  # The second pass runs only at the guided steps: 20 DDIM steps, 10 of them
  # with t/T >= 0.5 (t = 0, 53, ..., 999 of T = 1000).
  c.diffusion.update(cond_dropout=0.1, timesteps=1000)
  c.sample.update(guidance_scale=2.0, steps=20, sampler="ddim", guidance_interval=(0.5, 1.0))
  model = type("M", (), {"prev_block": False})()
  settings = program.Settings.from_config(c.sample)
  assert program.nfe(settings, c, model) == 30
  assert program.nfe(program.Settings.from_config(c.sample, guidance_interval=(0.0, 1.0)), c, model) == 40


# ---------------------------------------------------------------------------
# The jitted sampler: shapes, and which blocks depend on which neighbours.

def fake_decode(params, z):
  """A stand-in VQ-GAN decoder (f=4, one channel)."""
  img = jnp.tanh(z.mean(-1, keepdims=True) * params["scale"])
  return jnp.repeat(jnp.repeat(img, 4, 1), 4, 2)


def random_params(model, seed=0):
  x, t, cond = unet.init_inputs(model, SHAPE, K)
  import flax.linen as nn
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))
  rng = np.random.default_rng(seed)
  draw = lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(
      np.prod(a.shape[:-1]) if len(a.shape) > 1 else 25), a.dtype)
  return jax.tree.map(draw, shapes["params"])


@pytest.mark.parametrize("variant,kw,sampler", [("rissole", {}, "ddim"),
                                                ("rissole", {"use_prev_block": True}, "ddim"),
                                                ("full", {}, "ddpm")])
def test_sample_fn_shapes_and_block_dependencies(variant, kw, sampler):
  c = tiny(variant, **kw)
  c.sample.sampler = sampler
  # A random network predicting eps sends x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
  # to ~1e5 at t=T; predicting x0 keeps every step bounded.
  c.diffusion.prediction = "x0"
  model = make_denoiser(c, SHAPE)
  params = random_params(model)
  stats = {"mean": np.full(4, 0.5, np.float32), "std": np.full(4, 2.0, np.float32)}
  fn = program.make_sample_fn(model, make_schedule(c.diffusion), c.diffusion.prediction,
                         program.Settings.from_config(c.sample), fake_decode, stats)
  fn = jax.jit(functools.partial(fn, start=0))
  rng = np.random.default_rng(0)
  nb = jnp.asarray(rng.normal(size=(2, K, *SHAPE)), jnp.float32)
  key = jax.random.PRNGKey(0)
  z, img = fn(params, {"scale": 1.0}, nb, key)
  assert z.shape == (2, *SHAPE) and z.dtype == jnp.float32
  assert img.shape == (2, 32, 32, 1) and img.dtype == jnp.float32
  assert np.all(np.isfinite(z)) and np.abs(z).max() < 100
  # Inpainting's kept blocks (the top row): a whole-canvas model sees them at
  # every step, a previous-block model conditions the next block on them,
  # blocks denoised on their own are unchanged.
  follow = jax.jit(functools.partial(program.make_sample_fn(
      model, make_schedule(c.diffusion), c.diffusion.prediction,
      program.Settings.from_config(c.sample), fake_decode, stats, follow=True), start=0))
  kept = jnp.asarray(rng.normal(size=(2, *SHAPE)), jnp.float32)
  mask = jnp.zeros(SHAPE[:2], bool).at[:4].set(True)
  zf, _ = follow(params, {"scale": 1.0}, nb, key, kept=kept, mask=mask)
  assert program.couples_blocks(model) == (not model.blocks or model.prev_block)
  if not program.couples_blocks(model):
    np.testing.assert_array_equal(zf, z)
  elif model.prev_block:
    np.testing.assert_allclose(zf[:, :4], kept[:, :4], atol=1e-5)     # kept blocks: the user's
    assert float(jnp.abs(zf[:, 4:, :4] - z[:, 4:, :4]).max()) > 1e-4   # block 2 follows block 1
  else:
    assert float(jnp.abs(zf[:, 4:] - z[:, 4:]).max()) > 1e-4 and np.all(np.isfinite(zf))
  if not model.blocks:
    return
  # Change the neighbours' block 1 only: without previous-block conditioning
  # only sample block 1 changes; with it, blocks 1, 2, 3 (raster order) change.
  nb2 = blocks.split(nb, model.grid).at[:, :, 1].add(1.0)
  z2, _ = fn(params, {"scale": 1.0}, blocks.merge(nb2, model.grid), key)
  b1, b2 = blocks.split(z, model.grid), blocks.split(z2, model.grid)
  changed = [float(jnp.abs(b1[:, i] - b2[:, i]).max()) > 1e-4 for i in range(4)]
  assert changed == ([False, True, True, True] if model.prev_block else [False, True, False, False])


# ---------------------------------------------------------------------------
# The stages, end to end, on a tiny database with a fake autoencoder.

class FakeAutoencoder:
  latent_shape, f, fingerprint = SHAPE, 4, "fake"

  def __init__(self):
    self.params = {"scale": jnp.float32(1.0)}

  def decode_fn(self, params, z):
    return fake_decode(params, z)

  def decode(self, z, batch_size=256):
    return np.clip(np.asarray(fake_decode(self.params, jnp.asarray(z))), -1, 1)


def write_database(root, c, n=40):
  from rissole_jax import retrieval
  rng = np.random.default_rng(0)
  templates = rng.normal(size=(4, 2, 2, 4)).repeat(4, 1).repeat(4, 2)
  lat = (3.0 * templates[np.arange(n) % 4] + 1.0 + 0.2 * rng.normal(size=(n, *SHAPE))).astype(np.float32)
  held = lat[:6] + 0.1
  lab = (np.arange(n) % 4).astype(np.int32)
  retrieval.save_latents(root / "encode", "fake", "toy", {
      "train": (lat, lab, "toy:train"), "heldout": (held, lab[:6], "toy:heldout")})
  c.retrieval.backend = "exact"
  retrieval.index_database(root / "index", c, root / "encode")
  return lat


def ctx_for(c, root, stage):
  (root / stage).mkdir(parents=True, exist_ok=True)
  return Context(config=c, root=root, stage=stage, logger=logging.getLogger(f"test.{stage}"),
                 progress_bars=False)


def test_diffusion_and_sample_stages(tmp_path, monkeypatch):
  c = tiny()
  c.diffusion.cond_dropout = 0.2
  c.diffusion.train.gather = "host"   # test_denoiser trains with the device gather
  write_database(tmp_path, c)
  m = diffusion_stage.run(ctx_for(c, tmp_path, "diffusion"))
  assert m["denoiser_params"] > 0 and np.isfinite(m["loss"]) and m["steps_per_sec"] > 0
  assert np.isfinite(m["heldout_loss"])
  ckpts = tmp_path / "diffusion" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  _, ema_a, stats = loading.load_denoiser(c, tmp_path)
  assert stats["k"] == K and np.all(stats["std"] > 0)

  # Interrupted after step 2: resuming gives exactly the same weights.
  shutil.rmtree(ckpts / "4")
  diffusion_stage.run(ctx_for(c, tmp_path, "diffusion"))
  _, ema_b, _ = loading.load_denoiser(c, tmp_path)
  jax.tree.map(np.testing.assert_array_equal, ema_a, ema_b)

  from rissole_jax.models import autoencoder
  monkeypatch.setattr(autoencoder, "load_autoencoder", lambda config, d: FakeAutoencoder())
  c.sample.guidance_scale = 1.5
  from rissole_jax.main import stage_records
  for rec in stage_records(c, tmp_path):   # the upstream stages, as main.run records them
    if rec.name in loading.NEEDED_STAGES:
      rec.start()
      rec.finish({}, 0.0)
  out = sample_stage.run(ctx_for(c, tmp_path, "sample"))
  sdir = tmp_path / "sample"
  samples, queries = np.load(sdir / "samples.npy"), np.load(sdir / "queries.npy")
  assert samples.shape == (6, 32, 32, 1) and samples.dtype == np.uint8
  assert queries.shape == (6,) and out["num"] == 6 and out["nfe_per_sample"] == 6
  from PIL import Image
  fig = np.asarray(Image.open(sdir / "figure.png"))
  assert fig.shape[0] > 2 * 32 and fig.shape[1] > (K + 2) * 32   # 2 rows of query|k|sample
  assert (sdir / "samples.png").exists()


def test_stage_input_errors(tmp_path):
  from rissole_jax.errors import RissoleError
  c = tiny()
  c.blocks.grid = (3, 3)
  # Refused from the config alone, before the database is even looked for.
  with pytest.raises(ConfigError, match="does not divide the latent of 8x8"):
    diffusion_stage.run(ctx_for(c, tmp_path, "diffusion"))
  c = tiny()
  with pytest.raises(RissoleError, match="encode"):
    diffusion_stage.run(ctx_for(c, tmp_path, "diffusion"))     # no database yet
  with pytest.raises(DataError, match="'diffusion' stage has not run"):
    loading.load_denoiser(c, tmp_path)
