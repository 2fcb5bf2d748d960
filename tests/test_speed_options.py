"""Speed options that must not change results (or must change them as stated):
the vmapped block denoiser, per-position weights, several train steps per
jitted call, bfloat16 compute. Tiny models (a few compiles each)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax.runtime import parallel
from rissole_jax.defaults import base_config
from rissole_jax.errors import ConfigError
from rissole_jax.models import common, make_denoiser, unet
from rissole_jax.models import rows as model_rows
from rissole_jax.train import diffusion as dif

SHAPE, K, BATCH, N_DB = (8, 8, 4), 3, 4, 32


def tiny(**model):
  c = base_config()
  # The machinery, not the model: as few ops as compile (no attention, 3 res blocks).
  c.model.update(ch=8, ch_mult=(1,), num_res_blocks=0, attn_lowest=False, num_groups=2)
  c.model.update(**model)
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  c.diffusion.train.update(batch_size=BATCH, lr=3e-3, warmup_steps=1)
  return c


def database(seed=0):
  rng = np.random.default_rng(seed)
  lat = rng.normal(size=(N_DB, *SHAPE)).astype(np.float32)
  nbr = (np.arange(N_DB)[:, None] + 1 + np.arange(K)[None]) % N_DB
  return jnp.asarray(lat), jnp.asarray(nbr)


@pytest.fixture(scope="module")
def init_state():
  """The folded tiny model's initial train state (vmap and bfloat16 models
  have the same tree and init: one init compile serves them all)."""
  return init(tiny())


def init(c):
  return dif.build(c, SHAPE, K, parallel.make_mesh(c.mesh), 0)[3]


def train(c, state, steps=3):
  """(final state, losses) of `steps` gather steps from `state`, one per call."""
  lat, nbr = database()
  step, key = jax.jit(dif.parts(c, SHAPE).gather_step), jax.random.PRNGKey(1)
  s, losses = state, []
  for i in range(steps):
    s, m = step(s, key, lat, nbr, (np.arange(BATCH) + BATCH * i) % N_DB)
    losses.append(float(m["loss"]))
  return s, losses


def abstract_params(c):
  model = make_denoiser(c, SHAPE)
  x, t, cond = model_rows.init_inputs(model, SHAPE, K)
  return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))["params"]


def close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


def test_vmap_over_blocks_equals_folding(init_state):
  """block_map='vmap' (the one-block denoiser, nn.vmap'ped, shared weights):
  the same parameter tree, and after a few Adam steps from the same state the
  same losses and parameters as folding the blocks into the batch."""
  assert type(dif.parts(tiny(block_map="vmap"), SHAPE).model) is not unet.Denoiser
  assert (jax.tree.structure(abstract_params(tiny(block_map="vmap")))
          == jax.tree.structure(nn.unbox(init_state["params"])))
  fold, loss_f = train(tiny(block_map="fold"), init_state)
  vmap, loss_v = train(tiny(block_map="vmap"), init_state)
  np.testing.assert_allclose(loss_f, loss_v, rtol=1e-5)
  close(fold["params"], vmap["params"])
  close(fold["opt"], vmap["opt"])
  changed = lambda a, b: not np.allclose(jax.tree.leaves(a)[3], jax.tree.leaves(b)[3])
  assert changed(init_state["params"], fold["params"])


def test_per_position_weights_train_and_differ_from_shared(init_state):
  shared_c, pp_c = tiny(block_map="vmap"), tiny(block_map="vmap", share_weights=False)
  n = 4   # blocks of the (2, 2) grid
  state = init(pp_c)
  sp, shared_params = nn.unbox(state["params"]), nn.unbox(init_state["params"])
  # Every leaf gains a leading axis of blocks; the positions start different.
  for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(shared_params)):
    assert a.shape == (n, *b.shape)
  kern = np.asarray(sp["conv_in"]["kernel"])
  assert not np.allclose(kern[0], kern[1])
  assert common.count_params(sp) == n * common.count_params(shared_params)
  trained, losses = train(pp_c, state, steps=2)
  assert np.all(np.isfinite(losses)) and int(trained["step"]) == 2
  # Shared weights stacked n times are the shared model exactly; trained
  # per-position weights give other outputs.
  pp_model, sh_model = dif.parts(pp_c, SHAPE).model, dif.parts(shared_c, SHAPE).model
  lat, nbr = database(1)
  x, cond = model_rows.model_inputs(sh_model, lat[:2], lat[nbr[:2]])
  t = jnp.arange(x.shape[0]) % 20
  rnd = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), shared_params)
  out_sh = jax.jit(lambda p: sh_model.apply({"params": p}, x, t, **cond))(rnd)
  pp_apply = jax.jit(lambda p: pp_model.apply({"params": p}, x, t, **cond))
  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), rnd)
  close(pp_apply(stacked), out_sh, rtol=1e-5, atol=1e-5)
  out_pp = pp_apply(nn.unbox(trained["params"]))
  assert float(jnp.abs(out_pp - out_sh).max()) > 1e-3


def test_per_position_weights_in_the_sampler_and_quantizer():
  """The raster-order sampler (use_prev_block) runs block i with its own
  weights; Qwix quantization refuses per-position weights by name."""
  from rissole_jax.inference import quantize
  from rissole_jax.inference import program
  from rissole_jax.diffusion.schedule import make_schedule
  from rissole_jax.models import mapped
  c = tiny(block_map="vmap", share_weights=False, use_prev_block=True)
  c.sample.update(steps=1, sampler="ddim")
  model = make_denoiser(c, SHAPE)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype),
                        abstract_params(c))
  # One block's rows through its own weights = that block's rows of the whole.
  lat, nbr = database()
  x, cond = model_rows.model_inputs(model, lat[:2], lat[nbr[:2]])
  t = jnp.full((x.shape[0],), 7)
  whole = model_rows.unfold(model.apply({"params": params}, x, t, **cond), 4)
  m2, p2 = mapped.for_rows(model, params, 2)
  rows = {k: model_rows.unfold(v, 4)[:, 2] for k, v in cond.items()}
  close(m2.apply({"params": p2}, model_rows.unfold(x, 4)[:, 2], t[:2], **rows), whole[:, 2],
        rtol=1e-5, atol=1e-5)
  z = program.latents_fn(model, make_schedule(c.diffusion), c)(params, lat[nbr[:2]],
                                                                 jax.random.PRNGKey(0))
  assert z.shape == (2, *SHAPE) and np.all(np.isfinite(np.asarray(z)))
  with pytest.raises(ConfigError, match="share_weights=False"):
    quantize.quantize_denoiser(model, params, "int8_weights")


def test_speed_option_config_errors():
  bad = [({"block_map": "loop"}, "block_map"), ({"dtype": "float16"}, "model.dtype"),
         ({"share_weights": False}, "block_map='vmap'"),
         ({"backbone": "lego", "dtype": "bfloat16"}, "U-Net options")]
  for kw, msg in bad:
    with pytest.raises(ConfigError, match=msg):
      dif.check_config(tiny(**kw), SHAPE)
  c = tiny()
  c.diffusion.train.steps_per_call = 0
  with pytest.raises(ConfigError, match="steps_per_call"):
    dif.check_config(c, SHAPE)


@pytest.mark.parametrize("unroll", [False, True])
def test_several_steps_per_call_equal_single_steps(init_state, unroll):
  """lax.scan over 3 steps in one call, as a loop or written out
  (diffusion.train.unroll_steps): the state of 3 calls of one step."""
  c, state = tiny(), init_state
  c.diffusion.train.unroll_steps = unroll
  lat, nbr = database()
  p, key = dif.parts(c, SHAPE), jax.random.PRNGKey(1)
  ids = [(np.arange(BATCH) + BATCH * i) % N_DB for i in range(3)]
  one = jax.jit(p.gather_step)
  s1 = state
  losses = []
  for i in ids:
    s1, m = one(s1, key, lat, nbr, i)
    losses.append(float(m["loss"]))
  many = jax.jit(p.gather_steps)
  s3, m3 = many(state, key, lat, nbr, np.stack(ids, 1))
  assert m3["loss"].shape == (3,) and int(s3["step"]) == 3
  np.testing.assert_allclose(np.asarray(m3["loss"]), losses, rtol=1e-5)
  close(s1, s3)
  # Unrolled, the call holds the step's own loops three times and no loop
  # over the steps; otherwise one loop around one copy of the step.
  loops = lambda fn, *a: fn.lower(state, key, lat, nbr, *a).compile().as_text().count(" while(")
  per_step = loops(one, ids[0])
  assert loops(many, np.stack(ids, 1)) == (3 * per_step if unroll else per_step + 1)


def test_bfloat16_compute_keeps_float32_state(init_state):
  c = tiny(dtype="bfloat16")
  model = dif.parts(c, SHAPE).model
  assert (jax.tree.structure(abstract_params(c))
          == jax.tree.structure(nn.unbox(init_state["params"])))
  trained, losses = train(c, init_state, steps=2)
  assert np.all(np.isfinite(losses)) and int(trained["step"]) == 2
  for part in ("params", "ema", "opt"):
    dtypes = {a.dtype for a in jax.tree.leaves(trained[part]) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, (part, dtypes)
  # Every conv and matmul of the network runs in bfloat16; the output is float32.
  x, t, cond = model_rows.init_inputs(model, SHAPE, K, batch=2)
  fn = lambda p: model.apply({"params": p}, x, t, **cond)
  eqns = [e for e in jax.make_jaxpr(fn)(trained["params"]).jaxpr.eqns]
  def ops(eqns):
    for e in eqns:
      if e.primitive.name in ("conv_general_dilated", "dot_general"):
        yield e
      for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
        yield from ops(sub.eqns)
      for v in e.params.values():
        inner = getattr(v, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          yield from ops(inner.eqns)
  found = list(ops(eqns))
  assert found and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in found)
  assert fn(trained["params"]).dtype == jnp.float32


def test_compilation_cache_setting(monkeypatch, tmp_path):
  """The CLIs' compilation cache: in the user cache, never over the user's
  JAX_COMPILATION_CACHE_DIR, off with RISSOLE_NO_COMPILATION_CACHE or the flag."""
  from rissole_jax import export, sample
  from rissole_jax.runtime import cache
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert cache.enable_compilation_cache() == tmp_path / "theirs"
    assert jax.config.jax_compilation_cache_dir == before[0]    # untouched
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("RISSOLE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv(cache.OFF_ENV, "1")
    assert cache.enable_compilation_cache() is None
    monkeypatch.setenv(cache.OFF_ENV, "0")
    assert cache.enable_compilation_cache(disabled=True) is None
    assert jax.config.jax_compilation_cache_dir == before[0]
    assert cache.enable_compilation_cache() == tmp_path / "mine" / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine" / "jax")
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
  # main, sample and export call it first, with their flag.
  from rissole_jax import main
  calls = []
  monkeypatch.setattr(cache, "enable_compilation_cache", lambda disabled=False: calls.append(disabled))
  monkeypatch.setattr(main, "run", lambda *a, **k: calls.append("ran"))
  monkeypatch.setattr(main, "FLAGS", type("F", (), dict(
      config=object(), workdir=str(tmp_path), overwrite=False, only=[], no_progress=True,
      no_compilation_cache=False, coordinator_address=None, num_processes=None,
      process_id=None))())
  main.main(["prog"])
  assert calls == [False, "ran"]
  calls.clear()
  assert sample.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--num", "0",
                      "--no_compilation_cache"]) == 2
  assert export.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
  assert calls == [True, False]
