"""The per-op profiler (benchmarks/profile.py) runs and its tables add up;
its trace and HLO arithmetic on small known cases. (What the profile says:
docs/performance.md.)"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from rissole_jax.benchmarks import profile, xplane

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_profile_cli_runs_and_shares_add_up(tmp_path):
  out = tmp_path / "profile.json"
  # The VQ-GAN shrunk further (no res blocks, one discriminator layer: a
  # quarter of the smoke step's compile); its downsampling stays the smoke's,
  # so the denoiser's programs are the smoke's.
  run = subprocess.run(
      [sys.executable, "-m", "rissole_jax.benchmarks.profile", "--config",
       "configs/mnist.py:smoke", "--what", "train,sample,vqgan", "--steps", "1", "--warmup", "0",
       "--database", "16", "--override", "diffusion.train.batch_size=2",
       "--override", "vqgan.train.batch_size=2", "--override", "vqgan.num_res_blocks=0",
       "--override", "vqgan.attn_lowest=False", "--override", "vqgan.disc_layers=1",
       "--top", "3", "--compilation_cache", "--out", str(out)],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
      timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  [result] = json.loads(out.read_text())
  train, sample, vqgan = result["programs"]
  assert [p["program"] for p in result["programs"]] == ["train", "sample_step", "vqgan_train"]
  for p in (train, sample, vqgan):
    assert p["calls"] == 1 and p["images"] == 2 and p["hlo_ops"] > 10 and p["params"] > 0
    assert sum(r["share"] for r in p["by_module"]) == pytest.approx(1.0)
    assert sum(r["share"] for r in p["by_kind"]) == pytest.approx(1.0)
    for r in p["by_module"]:
      assert r["share"] == pytest.approx(r["forward"] + r["backward"])
    assert 0 < p["busy_ms"] <= p["wall_ms"]
    assert 0 <= p["host_share"] < 1
    counted = sum(k["gflop_per_call"] or 0 for k in p["by_kind"])
    assert 0 < counted <= p["xla_gflop"] * 1.0001   # convs and dots: part of XLA's count
    assert len(p["ops"]) == p["hlo_ops"] and p["top"] == 3
    assert p["conditionals"] == 0
  for p in (train, sample):
    assert {"conv_in", "conv_out"} <= {r["module"] for r in p["by_module"]}
  assert sum(r["backward"] for r in train["by_module"]) > 0   # the gradient is profiled
  assert sum(r["backward"] for r in sample["by_module"]) == 0
  # The VQ-GAN step: the generator's modules and the step's scopes
  # (train/vqgan.SCOPES), both gradients, past disc_start with the GAN on.
  vq = {r["module"]: r for r in vqgan["by_module"]}
  for m in ("encoder", "decoder", "discriminator_update"):
    assert vq[m]["forward"] > 0 and vq[m]["backward"] > 0, m
  assert vq["adaptive_weight"]["backward"] > 0   # its two gradients w.r.t. the last kernel
  assert vqgan["status"].startswith("GAN terms on (vqgan.disc_start=2;"), vqgan["status"]
  assert run.stdout.count("share of op time by top-level module") == 3
  assert "**vqgan_train**: mnist_embedded VQ-GAN 32x32x1" in run.stdout


def test_pool_tasks_count_for_the_op_that_queued_them():
  E, op = xplane.Event, {"hlo_module": "m", "run_id": 1}
  events = [
      E(1, "ThunkExecutor::Execute", 0, 100, {}),
      E(1, "conv", 10, 20, dict(op, hlo_op="conv")),
      E(1, "ThreadpoolListener::Record", 15, 15, {"_p": 7}),   # conv queues task 7
      E(1, "add", 60, 70, dict(op, hlo_op="add")),
      E(2, "ThreadpoolListener::StartRegion", 20, 20, {"_c": 7}),
      E(2, "ThreadpoolListener::StopRegion", 50, 50, {}),
      E(3, "ThunkExecutor::Execute (wait for completion)", 0, 100, {}),   # the caller, idle
  ]
  [call] = xplane.op_times(events, "m")
  # 10-20 conv alone, 20-50 conv's task beside the executor, 50-60 the
  # executor alone, 60-70 add; before the first op and the caller's wait: nothing.
  assert call["ops"] == {"conv": 25.0, "add": 10.0}
  assert call["executor"] == 25.0 and call["unlinked"] == 0.0
  assert call["busy"] == 60.0 == sum(call["ops"].values()) + call["executor"]
  assert xplane.op_times(events, "other module") == []


def test_module_names_from_the_name_stack():
  assert profile.top_module("jit(step)/transpose(jvp(Denoiser))/up1_res0/norm1/mul") == "up1_res0"
  assert profile.top_module("jit(fn)/while/body/closed_call/Denoiser/mid_res1/conv1/add") == (
      "mid_res1")
  assert profile.top_module("jit(step)/jvp(Denoiser)/Denoiser._attend/mid_attn/q/dot_general"
                            ) == "mid_attn"
  assert profile.top_module("jit(step)/jvp(Denoiser)/concatenate") == "Denoiser (own ops)"
  assert profile.top_module("jit(step)/jvp(jit(_randint))/while/body/add") is None
  assert profile.top_module("state['opt'][1][0].mu['conv_in']['bias']") == "(state copies)"


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID")])
def test_conv_and_dot_flops_are_xlas(stride, padding):
  def f(x, w, v):
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y.reshape(-1, 8) @ v).sum()

  args = (jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones((8, 4)))
  for fn in (f, jax.grad(f, argnums=(0, 1, 2))):   # the gradients: other dim_labels
    compiled = jax.jit(fn).lower(*args).compile()
    _, ops, comps = profile.parse_hlo(compiled.as_text())
    counted = sum(profile.op_flops(op, ops, comps) for name, op in ops.items()
                  if op.opcode in ("convolution", "dot"))
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert 0.9 * xla < counted <= xla   # the rest: elementwise ops


def test_an_unknown_program_is_refused():
  from rissole_jax import defaults
  from rissole_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="train, sample, vqgan"):
    profile.profile(defaults.base_config(), what=("train", "smaple"))


def test_a_long_chain_of_pool_tasks_keeps_its_op():
  E = xplane.Event
  events = [E(1, "dot", 0, 10, {"hlo_module": "m", "run_id": 1, "hlo_op": "dot"}),
            E(1, "ThreadpoolListener::Record", 5, 5, {"_p": 0})]
  for i in range(200):   # task i runs 10 ps on thread 2 and queues task i + 1
    t = 10 + 10 * i
    events += [E(2, "ThreadpoolListener::StartRegion", t, t, {"_c": i}),
               E(2, "ThreadpoolListener::Record", t + 5, t + 5, {"_p": i + 1}),
               E(2, "ThreadpoolListener::StopRegion", t + 10, t + 10, {})]
  events.append(E(1, "add", 2010, 2020, {"hlo_module": "m", "run_id": 1, "hlo_op": "add"}))
  [call] = xplane.op_times(events, "m")
  assert call["ops"] == {"dot": 2010.0, "add": 10.0} and call["unlinked"] == 0.0


def test_small_map_benchmark_compares_a_conv_with_the_matmul():
  from rissole_jax.benchmarks import small_map
  from rissole_jax.models import layers
  conv, _ = small_map.program((2, 4, 4, 8), matmul=False)
  matmul, _ = small_map.program((2, 4, 4, 8), matmul=True)
  sliced, _ = small_map.program((2, 4, 4, 8), matmul=False, sliced=True)
  assert "convolution(" in conv.as_text()
  assert "convolution(" not in matmul.as_text() and "convolution(" not in sliced.as_text()
  assert layers.MATMUL_CONV_MAX_PIXELS == 4   # restored


def test_vqgan_lowerings_compute_the_stage_s_functions():
  """benchmarks/vqgan_lowerings: the sub-pixel forms equal repeat + conv, and
  swapped into the decoder (its interceptor) they give the decoder's output."""
  import flax.linen as nn
  import numpy as np

  from rissole_jax import defaults
  from rissole_jax.benchmarks import vqgan_lowerings as vl
  from rissole_jax.models import vqgan as vq
  rng = np.random.default_rng(0)
  x, k, b = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 4, 5), (3, 3, 5, 6), 6))
  ref = vl.upsample_conv(x, k, b, "stage")
  assert ref.shape == (2, 6, 8, 6)
  for form in ("phases", "wide"):
    np.testing.assert_allclose(vl.upsample_conv(x, k, b, form), ref, rtol=1e-5, atol=1e-5)

  c = defaults.smoke(defaults.base_config())
  model = vq.make_model(c)
  # Random parameters of the model's shapes (model.init takes seconds to run here).
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
  params = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), shapes)
  decode = lambda z: model.apply(params, z, method=vq.VQModel.decode)

  def swapped(z):
    with nn.intercept_methods(vl._phases_upsampling):
      return decode(z)
  z = rng.standard_normal((2, 8, 8, c.vqgan.z_channels)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(swapped)(z), jax.jit(decode)(z), rtol=1e-4, atol=1e-5)
  convs = lambda f: str(jax.make_jaxpr(f)(z)).count("conv_general_dilated")
  assert convs(swapped) == convs(decode) + 3 * (len(c.vqgan.ch_mult) - 1)   # 4 phases for 1
