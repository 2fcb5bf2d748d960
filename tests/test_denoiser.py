"""The block denoiser: one weight set for all blocks, every switch acts, it trains."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax.defaults import base_config
from rissole_jax.errors import ConfigError
from rissole_jax.models import common, make_denoiser
from rissole_jax.models import rows as model_rows
from rissole_jax.train import diffusion as dif

SHAPE, K, B = (8, 8, 4), 3, 2


def tiny(variant="rissole", **model):
  """A denoiser small enough to compile in a second or two."""
  c = base_config()
  c.model.update(variant=variant, ch=8, ch_mult=(1,), num_res_blocks=1, num_groups=2)
  c.model.update(**model)
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  # Condition dropout gives retrieval models their learned null (keep=False).
  c.diffusion.cond_dropout = 0.1 if common.uses_retrieval(variant) else 0.0
  c.diffusion.train.update(steps=40, batch_size=8, lr=3e-3, warmup_steps=1)
  return c


def random_params(model, seed=0):
  """Parameters drawn at random without compiling an init: the shapes come from
  eval_shape. Zero-initialised layers and nulls would otherwise hide what the
  inputs do."""
  x, t, cond = model_rows.init_inputs(model, SHAPE, K)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))
  rng = np.random.default_rng(seed)
  def draw(a):
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 25
    return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), a.dtype)
  return jax.tree.map(draw, shapes["params"])


def data(seed=0):
  rng = np.random.default_rng(seed)
  z0 = jnp.asarray(rng.normal(size=(B, *SHAPE)), jnp.float32)
  nb = jnp.asarray(rng.normal(size=(B, K, *SHAPE)), jnp.float32)
  return z0, nb


@pytest.fixture(scope="module")
def models():
  """name -> (model, params, jitted apply); the rissole one has two levels
  (down- and up-sampling), the others one, to keep compiles short."""
  out = {}
  for name, variant, kw in [("rissole", "rissole", {"ch_mult": (1, 2)}),
                            ("prev", "rissole", {"use_prev_block": True}),
                            ("nopos", "rissole", {"use_position": False}),
                            ("xattn", "rissole", {"cond": "cross_attn"}),
                            ("blocks_only", "blocks_only", {}), ("full", "full", {}), ("rdm", "rdm", {})]:
    m = make_denoiser(tiny(variant, **kw), SHAPE)
    out[name] = (m, random_params(m), jax.jit(lambda p, x, t, c, keep, m=m: m.apply(
        {"params": p}, x, t, **c, keep=keep)))
  return out


def call(models, name, x, t, cond, keep=None):
  """The model's output; keep defaults to all-True (one compiled shape per model)."""
  m, p, f = models[name]
  keep = jnp.ones((x.shape[0],), bool) if keep is None else keep
  return np.asarray(f(p, x, t, cond, keep))


@pytest.mark.parametrize("name", ["rissole", "prev", "xattn"])
def test_folded_blocks_equal_a_per_block_loop(models, name):
  """All blocks of all examples in one call == each block on its own, with its
  inputs cut from the latents here by hand. (Each loop call fills every row
  with one block's inputs, so it reuses the compiled batch shape.)"""
  m, _, _ = models[name]
  z0, nb = data()
  x0, cond = model_rows.model_inputs(m, z0, nb)
  t = jnp.arange(x0.shape[0], dtype=jnp.int32) % 20
  folded = call(models, name, x0, t, cond)
  gh, gw = m.grid
  bh, bw = SHAPE[0] // gh, SHAPE[1] // gw
  cut = lambda a, i: a[..., (i // gw) * bh:(i // gw + 1) * bh, (i % gw) * bw:(i % gw + 1) * bw, :]
  n = gh * gw
  rows = lambda a: jnp.concatenate([a] * (x0.shape[0] // len(a)))
  for b in range(B):
    for i in range(n):
      r = b * n + i
      one = {"pos": rows(jnp.array([i])), "neighbours": rows(cut(nb[b:b + 1], i))}
      if m.prev_block:
        one["prev"] = rows(cut(z0[b:b + 1], i - 1) if i > 0 else jnp.zeros((1, bh, bw, SHAPE[2])))
      out = call(models, name, rows(cut(z0[b:b + 1], i)), rows(t[r:r + 1]), one)
      np.testing.assert_allclose(folded[r], out[0], rtol=1e-4, atol=1e-5)


def test_position_switch(models):
  z0, nb = data()
  x, cond = model_rows.model_inputs(models["rissole"][0], z0, nb)
  t = jnp.full((x.shape[0],), 5, jnp.int32)
  other = {**cond, "pos": (cond["pos"] + 1) % 4}
  assert not np.allclose(call(models, "rissole", x, t, cond), call(models, "rissole", x, t, other))
  np.testing.assert_allclose(call(models, "nopos", x, t, cond), call(models, "nopos", x, t, other))
  assert "position" in models["rissole"][1] and "position" not in models["nopos"][1]


@pytest.mark.parametrize("name", ["rissole", "xattn", "rdm"])
def test_neighbour_content_and_null_switch(models, name):
  m = models[name][0]
  z0, nb = data()
  _, nb2 = data(seed=1)
  x, cond = model_rows.model_inputs(m, z0, nb)
  _, cond2 = model_rows.model_inputs(m, z0, nb2)
  t = jnp.full((x.shape[0],), 7, jnp.int32)
  a = call(models, name, x, t, cond)
  assert not np.allclose(a, call(models, name, x, t, cond2))
  # keep=False swaps in the learned null: that changes the output, and then
  # the neighbours' content no longer matters.
  drop = jnp.zeros((x.shape[0],), bool)
  u = call(models, name, x, t, cond, drop)
  assert not np.allclose(a, u)
  np.testing.assert_allclose(u, call(models, name, x, t, cond2, drop), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a, call(models, name, x, t, cond, ~drop), rtol=1e-5, atol=1e-6)


def test_prev_block_switch(models):
  z0, nb = data()
  x, cond = model_rows.model_inputs(models["prev"][0], z0, nb)
  t = jnp.full((x.shape[0],), 3, jnp.int32)
  other = {**cond, "prev": cond["prev"] + 1.0}
  assert not np.allclose(call(models, "prev", x, t, cond), call(models, "prev", x, t, other))
  x1, cond1 = model_rows.model_inputs(models["rissole"][0], z0, nb)
  assert "prev" not in cond1
  # Without the switch a previous block is not an input at all.
  np.testing.assert_allclose(call(models, "rissole", x1, t, cond1),
                             call(models, "rissole", x1, t, {**cond1, "prev": cond["prev"] + 1.0}))


def test_concat_vs_cross_attention_and_variants(models):
  z0, nb = data()
  outs = {}
  for name in ["rissole", "xattn", "blocks_only"]:
    x, cond = model_rows.model_inputs(models[name][0], z0, nb)
    outs[name] = call(models, name, x, jnp.full((x.shape[0],), 4, jnp.int32), cond)
    assert x.shape == (B * 4, 4, 4, 4) and outs[name].shape == x.shape
  # concat: the neighbours enter conv_in (through model.neighbour_encoder's convs or not)
  cin = {n: models[n][1]["conv_in"]["kernel"].shape[2] for n in ("rissole", "blocks_only")}
  assert cin["rissole"] > cin["blocks_only"] and "neighbour_tokens" in models["xattn"][1]
  assert not any("xattn" in k for k in models["rissole"][1])
  assert any("xattn" in k for k in models["xattn"][1])
  assert not np.allclose(outs["rissole"], outs["xattn"])
  # blocks_only and full take no neighbours; full and rdm see the whole latent.
  _, cond = model_rows.model_inputs(models["blocks_only"][0], z0, nb)
  assert cond["neighbours"] is None
  for name in ["full", "rdm"]:
    x, cond = model_rows.model_inputs(models[name][0], z0, nb)
    assert x.shape == (B, *SHAPE) and "pos" not in cond
    assert (cond["neighbours"] is None) == (name == "full")
    assert call(models, name, x, jnp.array([3, 9]), cond).shape == x.shape


@pytest.mark.parametrize("name", ["rissole", "prev", "xattn", "blocks_only", "full", "rdm"])
def test_every_parameter_is_used(models, name):
  """Every parameter reaches the output (dead code eliminated from the traced
  computation): no layer is created and then ignored. Tracing only, no compile."""
  from jax._src.interpreters import partial_eval as pe
  m, p, _ = models[name]
  z0, nb = data()
  x, cond = model_rows.model_inputs(m, z0, nb)
  t = jnp.arange(x.shape[0], dtype=jnp.int32) % 20
  keep = jnp.arange(x.shape[0]) % 2 == 0   # some rows use the learned null
  closed = jax.make_jaxpr(lambda p: m.apply({"params": p}, x, t, **cond, keep=keep))(p)
  _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)]
  unused = [path for path, u in zip(paths, used) if not u]
  assert len(used) == len(paths) and not unused, unused


def test_null_only_with_condition_dropout():
  c = tiny()
  c.diffusion.cond_dropout = 0.0
  m = make_denoiser(c, SHAPE)
  assert "null_neighbours" not in random_params(m)
  z0, nb = data()
  x, cond = model_rows.model_inputs(m, z0, nb)
  with pytest.raises(ValueError, match="cond_dropout"):
    jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, jnp.zeros(x.shape[0], jnp.int32),
                                  **cond, keep=jnp.ones(x.shape[0], bool)))


def test_param_counts(models):
  counts = {n: common.count_params(p) for n, (_, p, _) in models.items()}
  assert all(c > 0 for c in counts.values())
  assert counts["rissole"] > counts["blocks_only"] and counts["rdm"] > counts["full"]


def test_config_errors():
  with pytest.raises(ConfigError, match="variant"):
    make_denoiser(tiny("unet"), SHAPE)
  with pytest.raises(ConfigError, match="cond"):
    make_denoiser(tiny(cond="film"), SHAPE)
  with pytest.raises(ConfigError, match="use_prev_block"):
    make_denoiser(tiny("full", use_prev_block=True), SHAPE)
  with pytest.raises(ConfigError, match="does not divide"):
    c = tiny()
    c.blocks.grid = (3, 3)
    dif.check_config(c, SHAPE)
  with pytest.raises(ConfigError, match="ch_mult"):
    c = tiny(ch_mult=(1, 2, 2, 2))
    make_denoiser(c, SHAPE)
  with pytest.raises(ConfigError, match="cond_dropout"):
    c = tiny("blocks_only")
    c.diffusion.cond_dropout = 0.1
    dif.check_config(c, SHAPE)
  with pytest.raises(ConfigError, match="gather"):
    c = tiny()
    c.diffusion.train.gather = "disk"
    dif.check_config(c, SHAPE)
  with pytest.raises(ConfigError, match=r"Unknown model.backbone 'resnet': use one of \('unet', 'lego'\)"):
    make_denoiser(tiny(backbone="resnet"), SHAPE)


def test_backbones_by_name():
  """models.make_denoiser picks the backbone by config.model.backbone."""
  from rissole_jax import models
  from rissole_jax.models import lego, unet
  assert set(models.BACKBONES) == {"unet", "lego"}
  assert isinstance(make_denoiser(tiny(), SHAPE), unet.Denoiser)
  c = tiny()
  c.model.backbone = "lego"
  c.model.lego.update(preset="pg", depth=2, width=32, emb_dim=32)
  assert isinstance(make_denoiser(c, SHAPE), lego.LegoDenoiser)


# ---------------------------------------------------------------------------
# The train step.

def tiny_database(n=48, seed=0):
  """Latents made of a few smooth templates plus noise; neighbours: other
  members of the same template (never the item itself)."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(4, 2, 2, 4)).repeat(4, 1).repeat(4, 2)
  cls = np.arange(n) % 4
  lat = (templates[cls] + 0.1 * rng.normal(size=(n, *SHAPE))).astype(np.float32)
  nbr = np.stack([rng.choice(np.flatnonzero((cls == cls[i]) & (np.arange(n) != i)), K, replace=False)
                  for i in range(n)]).astype(np.int32)
  return lat, nbr


def test_train_step_lowers_the_loss():
  from rissole_jax.runtime import parallel
  c = tiny(num_res_blocks=0, attn_lowest=False)   # the machinery, not the model: compile less
  lat, nbr = tiny_database()
  mesh = parallel.make_mesh(c.mesh)
  model, schedule, tx, state, sh = dif.build(c, SHAPE, K, mesh, 0)
  # Fixed state shardings (as the stage does): one compile for every call.
  step = jax.jit(dif.device_gather_step(dif.make_train_step(model, schedule, tx, c)),
                 in_shardings=(sh, None, None, None, None), out_shardings=(sh, None))
  key = jax.random.PRNGKey(1)
  # The loss a step reports is computed before its update, with noise from
  # fold_in(key, step): evaluate with the step counter reset, so before and
  # after see the same batches, timesteps and noise.
  evaluate = lambda st: float(np.mean([step({**st, "step": st["step"] * 0}, key, lat, nbr,
                                            np.arange(i, i + 8))[1]["loss"] for i in (0, 8, 16, 24, 32, 40)]))
  before = evaluate(state)
  s = state
  for i in range(40):
    s, m = step(s, key, lat, nbr, (np.arange(8) + 8 * i) % len(lat))
  after = evaluate(s)
  assert int(s["step"]) == 40 and np.isfinite(float(m["loss"]))
  assert after < 0.8 * before, (before, after)
  # The EMA moved from the initial weights toward the trained ones.
  d = lambda a, b: sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert d(s["ema"], s["params"]) < d(state["params"], s["params"])
