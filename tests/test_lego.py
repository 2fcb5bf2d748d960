"""LEGO bricks: shapes and coordinates for every preset and canvas, regions
that stay local, every brick trained, exact and cheaper skipping, refusals."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import blocks as blk
from rissole_jax import defaults
from rissole_jax.defaults import apply_variants, base_config
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError
from rissole_jax.models import common, lego, make_denoiser
from rissole_jax.models import rows as model_rows
from rissole_jax.inference import program
from rissole_jax.train import diffusion as dif

SHAPE, K, B = (8, 8, 4), 3, 2


def tiny(preset="pg", variant="rissole", **lg):
  """A LEGO stack small enough to compile in a second or two."""
  c = apply_variants(base_config(), f"lego_{preset}")
  c.model.variant = variant
  c.model.lego.update(depth=2 if preset != "u" else 3, width=32, emb_dim=32)
  c.model.lego.update(**lg)
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  c.diffusion.train.update(steps=40, batch_size=8, lr=3e-3, warmup_steps=1)
  c.sample.update(sampler="ddim", steps=10, eta=1.0)
  return c


def random_params(model, shape=SHAPE, seed=0):
  """Random parameters from eval_shape shapes (zero-initialised heads and gates
  would hide what the inputs do)."""
  x, t, cond = model_rows.init_inputs(model, shape, K)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))
  rng = np.random.default_rng(seed)
  def draw(a):
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 25
    return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), a.dtype)
  return jax.tree.map(draw, shapes["params"])


def data(shape=SHAPE, seed=0):
  rng = np.random.default_rng(seed)
  z0 = jnp.asarray(rng.normal(size=(B, *shape)), jnp.float32)
  nb = jnp.asarray(rng.normal(size=(B, K, *shape)), jnp.float32)
  return z0, nb


# ---------------------------------------------------------------------------
# Shapes and coordinates.

@pytest.mark.parametrize("variant", ["rissole", "blocks_only", "full"])
@pytest.mark.parametrize("preset", ["pg", "pr", "u"])
def test_every_preset_predicts_every_brick_on_the_canvas(preset, variant):
  m = make_denoiser(tiny(preset, variant), SHAPE)
  canvas = (4, 4) if m.blocks else (8, 8)
  regions = [b[0] for b in m.bricks]
  # The paper's orders: PG local -> full canvas, PR the reverse, U = PR then PG.
  want = {"pg": [(2, 2), (4, 4)], "pr": [(4, 4), (2, 2)], "u": [(4, 4), (2, 2), (4, 4)]}[preset]
  assert regions == [tuple(np.array(r) * canvas[0] // 4) for r in want]
  z0, nb = data()
  x, cond = model_rows.model_inputs(m, z0, nb)
  t = jnp.zeros((x.shape[0],), jnp.int32)
  p = nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, t, **cond)))
  out = jax.eval_shape(lambda p: m.apply(p, x, t, **cond, all_bricks=True), p)
  assert out.shape == (len(m.bricks), x.shape[0], *canvas, 4)
  assert jax.eval_shape(lambda p: m.apply(p, x, t, **cond), p).shape == x.shape


def test_coordinates_span_the_canvas_and_tile_into_blocks():
  c = np.asarray(lego.coords(6, 10))
  assert c.shape == (6, 10, 2)
  assert c[0, 0].tolist() == [-1, -1] and c[-1, -1].tolist() == [1, 1]
  assert np.all(np.diff(c[..., 0], axis=1) > 0) and np.all(np.diff(c[..., 1], axis=0) > 0)
  assert np.all(c[..., 0] == c[:1, :, 0]) and np.all(c[..., 1] == c[:, :1, 1])
  # Blocks of a non-square 3x5 grid (2x2 blocks) reassemble into the canvas's coordinates.
  grid = (3, 5)
  tiles = lego.block_coords(jnp.arange(15), grid, 2, 2)
  np.testing.assert_array_equal(np.asarray(blk.merge(tiles, grid)), c)


def test_larger_and_non_square_canvases_get_positions_and_neighbours():
  """A 2x-per-side canvas (and a 1x2 non-square one): the block model's grid
  grows, each block takes the learned position at its relative place and the
  coordinates of the larger canvas; `full` runs its regions over it."""
  m = make_denoiser(tiny("pg"), SHAPE)
  for hw, grid in (((16, 16), (4, 4)), ((8, 16), (2, 4))):
    big = lego.for_canvas(m, hw, SHAPE[:2])
    assert big.grid == grid and big.train_grid == (2, 2)
    pos = jnp.arange(blk.num_blocks(grid))
    rows, cols = pos // grid[1], pos % grid[1]
    want = (rows * 2 // grid[0]) * 2 + cols * 2 // grid[1]
    np.testing.assert_array_equal(lego.train_position(pos, grid, (2, 2)), want)
    z0, nb = data()
    z_big = jnp.zeros((B, *hw, 4))
    nb_big = lego.canvas_neighbours(nb, hw)
    assert nb_big.shape == (B, K, *hw, 4)
    np.testing.assert_array_equal(nb_big[:, :, ::hw[0] // 8, ::hw[1] // 8], nb)
    x, cond = model_rows.model_inputs(big, z_big, nb_big)
    assert x.shape == (B * blk.num_blocks(grid), 4, 4, 4)
    cc = big.canvas_coords(x, cond["pos"])
    np.testing.assert_allclose(np.asarray(blk.merge(model_rows.unfold(cc, blk.num_blocks(grid)), grid))[0],
                               lego.coords(*hw), atol=1e-6)
    params = random_params(m)
    out = jax.jit(lambda p, x, c: big.apply({"params": p}, x, jnp.zeros((x.shape[0],), jnp.int32),
                                            **c))(params, x, cond)
    assert out.shape == x.shape and np.all(np.isfinite(out))
  f = make_denoiser(tiny("pr", "full"), SHAPE)
  assert lego.for_canvas(f, (16, 24), SHAPE[:2]) is f
  with pytest.raises(ConfigError, match="not tiled"):
    lego.for_canvas(f, (12, 16), SHAPE[:2])
  out = jax.eval_shape(lambda p: f.apply({"params": p}, jnp.zeros((1, 16, 24, 4)),
                                        jnp.zeros((1,), jnp.int32)), random_params(f))
  assert out.shape == (1, 16, 24, 4)


def test_attention_and_patches_stay_inside_a_region():
  """One local brick (4x4 regions on the 8x8 canvas): changing the noisy input
  in one region changes the prediction there only."""
  c = tiny("pg", "full", bricks=((4, 2, 1, 32),))
  m = make_denoiser(c, SHAPE)
  params = random_params(m)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *SHAPE)), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  f = jax.jit(lambda x: m.apply({"params": params}, x, t))
  d = np.abs(np.asarray(f(x.at[0, 5, 6].add(3.0)) - f(x)))[0].sum(-1)
  assert d[4:, 4:].max() > 1e-3
  d[4:, 4:] = 0
  assert d.max() == 0
  tok = lego.to_regions(x, (4, 4), 2)
  assert tok.shape == (4, 4, 16)
  np.testing.assert_array_equal(lego.from_regions(tok, 1, 8, 8, (4, 4), 2), x)


def test_neighbours_as_tokens_reach_only_their_region():
  """model.lego.neighbours: 'tokens' adds parameters for the neighbour tokens
  and drops the channels; a change in one region of one neighbour changes the
  prediction in that region only (a region attends to the same region of each
  neighbour); 'both' keeps the channels too. 'channels' is today's model."""
  z0, nb = data()
  outs, counts = {}, {}
  for how in lego.NEIGHBOURS_AS:
    c = tiny("pg", "full", bricks=((4, 2, 1, 32),), neighbours=how)
    c.model.variant = "rissole"
    c.blocks.grid = (1, 1)        # the block is the whole 8x8 latent: regions 4x4
    m = make_denoiser(c, SHAPE)
    params = random_params(m)
    counts[how] = common.count_params(params)
    x, cond = model_rows.model_inputs(m, z0, nb)
    tt = jnp.zeros((x.shape[0],), jnp.int32)
    f = jax.jit(lambda nb_: m.apply({"params": params}, x, tt,
                                    **{**cond, "neighbours": model_rows.condition(m, nb_, B)["neighbours"]}))
    d = np.abs(np.asarray(f(nb.at[0, 1, 1, 2].add(3.0)) - f(nb)))[0].sum(-1)
    outs[how] = d
  assert counts["tokens"] != counts["channels"]   # token embeddings instead of input channels
  assert counts["both"] > counts["tokens"] and counts["both"] > counts["channels"]
  for how in ("tokens", "both"):
    d = outs[how].copy()
    assert d[:4, :4].max() > 1e-3       # the changed region sees it
    d[:4, :4] = 0
    assert d.max() == 0                 # no other region does
  with pytest.raises(ConfigError, match="model.lego.neighbours"):
    make_denoiser(tiny("pg", neighbours="bag"), SHAPE)


# ---------------------------------------------------------------------------
# Training: every brick is a denoiser.

def test_every_brick_learns():
  c = tiny("pr")
  c.diffusion.train.lr = 3e-3
  p = dif.parts(c, SHAPE)
  model, schedule = p.model, p.schedule
  state = jax.jit(dif.init_fn(model, p.tx, SHAPE, K))(jax.random.PRNGKey(0))
  state = nn.meta.unbox(state)
  z0, nb = data(seed=1)
  z0 = jnp.tile(z0, (2, 1, 1, 1))
  nb = jnp.tile(nb, (2, 1, 1, 1, 1))

  @jax.jit
  def brick_losses(params, key):
    x0, cond = model_rows.model_inputs(model, z0, nb)
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, schedule.T)
    noise = jax.random.normal(kn, x0.shape)
    out = model.apply({"params": params}, schedule.q_sample(x0, t, noise), t, **cond,
                      all_bricks=True)
    target = schedule.target(c.diffusion.prediction, x0, noise, t)   # v by default
    return jnp.mean(jnp.square(out - target), axis=(1, 2, 3, 4))

  key = jax.random.PRNGKey(3)
  before = np.asarray(brick_losses(state["params"], key))
  step = jax.jit(p.step)
  for _ in range(12):
    state, m = step(state, jax.random.PRNGKey(1), z0, nb)
  after = np.asarray(brick_losses(state["params"], key))
  assert before.shape == (2,)
  assert np.all(after < 0.9 * before), (before, after)


# ---------------------------------------------------------------------------
# Skipping bricks.

def _sampler(c, model, params, nb):
  schedule = make_schedule(c.diffusion)
  return jax.jit(lambda p, nb, key: program.latents_fn(model, schedule, c)(p, nb, key))


@pytest.mark.parametrize("preset", ["pg", "pr"])
def test_skipping_nothing_is_exact_and_skipping_saves_flops(preset):
  c = tiny(preset)
  model = make_denoiser(c, SHAPE)
  params = random_params(model)
  _, nb = data()
  key = jax.random.PRNGKey(0)
  c0 = tiny(preset)
  c0.sample.skip.bricks = ()
  assert lego.skip_plan(model, c0) is None   # the no-skip program: one stack, one loop
  ref = np.asarray(_sampler(c0, model, params, nb)(params, nb, key))
  # A real skip plan whose switch lies at the trajectory's end (t_break * T
  # rounds to 0 at the low end, to T at the high end): both stacks are
  # compiled, the reduced one runs no step, so it must equal the no-skip program.
  T = int(c.diffusion.timesteps)
  c.sample.skip.t_break = 0.4 / T
  plan = lego.skip_plan(model, c)
  assert plan is not None and plan[2] == (0 if c.sample.skip.end == "low" else T)
  n = lego.step_counts(c, None)[0]
  assert lego.step_counts(c, plan) == ((n, 0) if c.sample.skip.end == "low" else (0, n))
  np.testing.assert_array_equal(np.asarray(_sampler(c, model, params, nb)(params, nb, key)), ref)

  x, cond = model_rows.model_inputs(model, nb[:, 0], nb)
  full = lego.sampler_flops(model, params, c, x, cond)["flops"]
  last = full
  for t_break in (0.5, 1.0):
    c.sample.skip.t_break = t_break
    f = lego.sampler_flops(model, params, c, x, cond)
    assert f["flops"] < last
    last = f["flops"]
    if t_break == 0.5:   # two loops, one per stack: it runs, and differs
      out = np.asarray(_sampler(c, model, params, nb)(params, nb, key))
      assert np.all(np.isfinite(out)) and not np.array_equal(out, ref)
  # With every step skipped, the compiled sampler (one loop) costs less, per XLA.
  schedule = make_schedule(c.diffusion)
  cost = lambda cfg: jax.jit(lambda p, nb, k: program.latents_fn(model, schedule, cfg)(p, nb, k)
                             ).lower(params, nb, key).compile().cost_analysis()["flops"]
  assert cost(c) < cost(c0)
  # The reduced stack is the skipped bricks' share cheaper.
  frac = f["flops_per_step_low" if c.sample.skip.end == "low" else "flops_per_step_high"]
  assert frac < full / f["steps_low" if c.sample.skip.end == "low" else "steps_high"]


def test_skip_steps_follow_t_break():
  c = tiny("pg")
  m = make_denoiser(c, SHAPE)
  c.sample.update(sampler="ddpm")
  for end, t_break, want in (("low", 0.25, (15, 5)), ("high", 0.25, (5, 15)),
                             ("low", 1.0, (0, 20)), ("high", 1.0, (20, 0))):
    c.sample.skip.update(end=end, t_break=t_break)
    plan = lego.skip_plan(m, c)
    assert lego.step_counts(c, plan) == want
    assert (plan[1] if end == "low" else plan[0]) == (0,)   # the brick kept


# ---------------------------------------------------------------------------
# Config refusals.

@pytest.mark.parametrize("change,match", [
    (lambda c: c.model.lego.update(bricks=((3, 1, 1, 32),)), "regions do not divide"),
    (lambda c: c.model.lego.update(bricks=((4, 3, 1, 32),)), "patch 3x3 does not divide"),
    (lambda c: c.model.lego.update(preset="zz"), "Unknown model.lego.preset"),
    (lambda c: c.sample.skip.update(bricks=(0, 1), t_break=0.5), "skips every brick"),
    (lambda c: c.sample.skip.update(bricks=(0,), t_break=0.5), "skips brick 0"),
    (lambda c: c.sample.skip.update(bricks=(5,)), "names brick 5"),
    (lambda c: c.sample.skip.update(t_break=1.5), "t_break"),
    (lambda c: c.sample.skip.update(end="middle"), "sample.skip.end"),
    (lambda c: c.model.update(variant="rdm"), "needs the U-Net"),
    (lambda c: c.model.update(backbone="vit"), "Unknown model.backbone"),
])
def test_configs_that_cannot_work_are_refused_with_the_fix(change, match):
  c = tiny("pg")
  change(c)
  with pytest.raises(ConfigError, match=match) as e:
    make_denoiser(c, SHAPE)
  assert "Fix" in str(e.value) or "use one of" in str(e.value) or "must" in str(e.value)


def test_variants_compose_with_smoke():
  from configs import mnist
  for p in ("pg", "pr", "u"):
    c = mnist.get_config(f"lego_{p},smoke")
    m = make_denoiser(c, SHAPE)
    assert isinstance(m, lego.LegoDenoiser) and c.model.lego.preset == p


def test_workdirs_made_before_lego_keep_their_fingerprints():
  """A U-Net config's fingerprints ignore the LEGO keys (and skipping with
  t_break 0), so older workdirs are not taken for another config."""
  from rissole_jax.stages import workdir as wd
  c = base_config()
  secs = wd.config_sections(c, ("model", "sample"))
  assert "lego" not in secs["model"] and "backbone" not in secs["model"]
  assert "skip" not in secs["sample"]
  old = c.to_dict()
  del old["model"]["backbone"], old["model"]["lego"], old["sample"]["skip"]
  import ml_collections as mlc
  assert wd.config_sections(mlc.ConfigDict(old), ("model", "sample")) == secs
  lego_secs = wd.config_sections(tiny("pr"), ("model",))   # neighbours='channels' is inert
  assert "neighbours" not in lego_secs["model"]["lego"]
  # The U-Net's layout knobs change nothing in a LEGO model, at any value.
  lg = tiny("pr")
  lg.model.update(defaults.LEGACY_MODEL)
  assert wd.config_sections(lg, ("model",)) == lego_secs
  assert not set(defaults.LEGACY_MODEL) & set(lego_secs["model"])
  assert wd.config_sections(tiny("pr", neighbours="tokens"), ("model",)) != lego_secs
  lg = tiny("pr")
  lg.sample.skip.t_break = 0.5
  secs = wd.config_sections(lg, ("model", "sample"))
  assert secs["model"]["backbone"] == "lego" and secs["sample"]["skip"]["t_break"] == 0.5


# ---------------------------------------------------------------------------
# Mesh.

def test_lego_on_the_8_device_mesh_equals_one_device(tmp_path):
  """Forward pass and one train step on a 2x4 (data x fsdp) mesh of 8 host
  devices == on one device (in a subprocess: the device count is fixed at start)."""
  worker = os.path.join(os.path.dirname(__file__), "lego_mesh_worker.py")
  env = {**os.environ, "XLA_FLAGS": (f"{os.environ.get('XLA_FLAGS', '')} "
                                    "--xla_force_host_platform_device_count=8"),
         "JAX_PLATFORMS": "cpu"}
  # (900 s like the other subprocess tests: 80 s on a quiet 2-core machine,
  # but it timed out at 300 s sharing the CPU with the background runs and a busy machine.)
  out = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout
