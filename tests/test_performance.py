"""What the speed work could break: every U-Net cost knob acts, tiny-map convs
equal convs, workdirs made before the knobs keep their architecture, the
throughput benchmark runs. (Speed itself: benchmarks/throughput.py, not tests.)"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import defaults
from rissole_jax.stages import workdir as wd
from rissole_jax.errors import ConfigError
from rissole_jax.models import layers, make_denoiser, unet

SHAPE, K, B = (8, 8, 4), 3, 2


def two_levels(**model):
  """Two U-Net levels on 4x4 blocks (the default's layout, narrower)."""
  c = defaults.base_config()
  c.model.update(**{**dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=2), **model})
  c.retrieval.k = K
  return c


@functools.lru_cache(maxsize=1)
def legacy_cost():
  return cost(two_levels(**defaults.LEGACY_MODEL))


def cost(config):
  """(parameter count, forward FLOPs) from shapes and XLA's count of the lowered
  program: nothing is compiled."""
  model = make_denoiser(config, SHAPE)
  x, t, cond = unet.init_inputs(model, SHAPE, K, batch=B)
  params = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))["params"]
  flops = jax.jit(lambda p: model.apply({"params": p}, x, t, **cond)).lower(
      params).cost_analysis()["flops"]
  return unet.count_params(params), flops


@pytest.mark.parametrize("key,value", [
    ("up_extra_block", False), ("attn_mid_only", True), ("mid_res_blocks", 1),
    ("mid_res_blocks", 0), ("upsample", "conv_transpose"), ("upsample", "nearest"),
    ("neighbour_encoder", "one_conv"), ("neighbour_encoder", "none")])
def test_each_cost_knob_acts(key, value):
  params0, flops0 = legacy_cost()
  changed = two_levels(**{**defaults.LEGACY_MODEL, key: value})
  params1, flops1 = cost(changed)
  assert params1 < params0 and flops1 < flops0, (key, value, params0, params1, flops0, flops1)


def test_bad_knob_values_are_refused():
  for key, value in [("upsample", "bilinear"), ("neighbour_encoder", "mlp"),
                     ("mid_res_blocks", 3)]:
    with pytest.raises(ConfigError, match=key):
      make_denoiser(two_levels(**{key: value}), SHAPE)


def test_legacy_values_are_the_first_layout():
  """At LEGACY_MODEL the module tree is the one old checkpoints hold."""
  model = make_denoiser(two_levels(**defaults.LEGACY_MODEL), SHAPE)
  x, t, cond = unet.init_inputs(model, SHAPE, K)
  names = set(nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))["params"])
  assert {"up0_res1", "up1_res1", "mid_res1", "down1_0_attn", "up1_1_attn", "mid_attn",
          "up1_sample"} <= names
  assert set(names) >= {"neighbour_concat"}
  assert not any(n.startswith("up0_res2") for n in names)


@pytest.mark.parametrize("size,kernel,stride,cin,cout", [
    (2, 3, 1, 8, 6), (4, 3, 2, 4, 8), (1, 3, 1, 4, 4), (2, 3, 2, 3, 5), (3, 3, 2, 4, 4)])
def test_small_map_conv_equals_the_convolution(size, kernel, stride, cin, cout):
  """Output and both gradients of the matmul form match lax's convolution."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  args = ((stride, stride), "SAME")

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w, *args, dimension_numbers=dn)))
  ref = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  got = jax.value_and_grad(loss(layers.small_map_conv), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # It takes the matmul path here (else this test would compare lax with itself).
  out = -(-size // stride)
  assert out * out <= layers.MATMUL_CONV_MAX_PIXELS
  pads = tuple(jax.lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), "SAME"))
  assert layers.tap_index((size, size), (kernel, kernel), (stride, stride), pads) is not None


@pytest.mark.parametrize("size,stride", [(4, 1), (5, 2), (8, 2)])
def test_sliced_conv_for_batched_kernels(size, stride):
  """Per-position kernels (vmapped with the input) take the slices + dot form
  (layers.batched_kernels): output and both gradients equal the vmapped
  lax convolution, and the compiled program has no convolution left."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, size, size, 3)), jnp.float32)   # 4 positions
  w = jnp.asarray(rng.normal(size=(4, 3, 3, 3, 5)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape[1:], w.shape[1:], ("NHWC", "HWIO", "NHWC"))

  def loss(fn):
    conv = jax.vmap(lambda x, w: fn(x, w, (stride, stride), "SAME", dimension_numbers=dn))
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  ref = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  with layers.batched_kernels():
    f = jax.jit(jax.value_and_grad(loss(layers.small_map_conv), (0, 1)))
    got = f(x, w)
    hlo = f.lower(x, w).compile().as_text()
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert "convolution(" not in hlo


def test_fingerprints_leave_out_legacy_values():
  """A config at the first layout's values fingerprints as before the keys
  existed; another value is in the fingerprint."""
  c = defaults.base_config()
  c.model.update(defaults.LEGACY_MODEL)
  sections = wd.config_sections(c, ("model",))
  assert not set(defaults.LEGACY_MODEL) & set(sections["model"])
  c.model.upsample = "conv_transpose"
  assert wd.config_sections(c, ("model",))["model"]["upsample"] == "conv_transpose"


def _record(root, name, sections):
  (root / name).mkdir(parents=True)
  (root / name / "stage.json").write_text(json.dumps({"config": sections, "done": True}))


def test_old_workdir_reads_with_its_first_layout(tmp_path):
  """A workdir whose records predate the knobs (no such keys) reads back with
  the legacy values, whatever today's defaults are; a new record's values win."""
  from rissole_jax.inference.configs import workdir_config
  old = {"model": {"ch": 32, "ch_mult": [1, 2], "variant": "rissole"}}
  _record(tmp_path / "old", "vqgan", {})
  _record(tmp_path / "old", "diffusion", old)
  c = workdir_config(tmp_path / "old")
  assert {k: c.model[k] for k in defaults.LEGACY_MODEL} == defaults.LEGACY_MODEL
  new = {"model": dict(old["model"], up_extra_block=False, upsample="conv_transpose")}
  _record(tmp_path / "new", "vqgan", {})
  _record(tmp_path / "new", "diffusion", new)
  c = workdir_config(tmp_path / "new")
  assert c.model.up_extra_block is False and c.model.upsample == "conv_transpose"
  assert c.model.neighbour_encoder == defaults.LEGACY_MODEL["neighbour_encoder"]


def test_bfloat16_mfu_uses_the_bfloat16_peak():
  """MFU of bf16 compute is against the bf16 peak (2x TF32's on NVIDIA)."""
  from rissole_jax.benchmarks import peaks, throughput
  assert peaks.peak_tflops("NVIDIA H200", "bfloat16") == 2 * peaks.peak_tflops("NVIDIA H200")
  assert throughput._known_peak("TPU v4", "bfloat16") == peaks.peak_tflops("TPU v4")
  assert throughput._known_peak("cpu", "bfloat16") == 0.0
  # A PCIe card's lower peak, not the SXM one's whose name it contains.
  for dtype in ("float32", "bfloat16"):
    assert 0 < peaks.peak_tflops("NVIDIA H100 PCIe", dtype) < peaks.peak_tflops(
        "NVIDIA H100 80GB HBM3", dtype)


def test_throughput_benchmark_runs():
  from rissole_jax.benchmarks import throughput
  c = two_levels(num_res_blocks=0, attn_lowest=False)
  c.model.ch_mult = (1,)
  c.diffusion.train.batch_size = 2
  rows = throughput.measure(c, steps=1, warmup=0, sample_batch=2, sample_steps=2, n_db=16,
                            compilation_cache=True)
  assert [r["program"] for r in rows] == list(throughput.PROGRAMS)
  for r in rows:
    assert r["images_per_sec"] > 0 and r["flops"] > 0 and r["compile_s"] > 0
    assert r["dtype"] == "float32"
  assert rows[2]["flops"] == pytest.approx(2 * rows[1]["flops"])
  table = throughput.markdown(rows)
  assert table.count("\n") == 2 + len(rows) and "sample_ddim" in table


def test_throughput_runs_against_old_trees():
  """With --trees, throughput.py runs against other trees' packages (back to
  5c3a3a5): at module level it may import nothing of rissole_jax (an import of
  benchmarks.markdown_table there broke every comparison with older trees)."""
  import ast
  from rissole_jax.benchmarks import throughput
  tree = ast.parse(open(throughput.__file__).read())
  imported = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
  assert not [m for m in imported if m.split(".")[0] == "rissole_jax"], imported


def test_vqgan_step_benchmark_runs():
  """The VQ-GAN step timer (docs/performance.md, "XLA:CPU flags") on the smoke config."""
  from rissole_jax.benchmarks import vqgan_step
  c = defaults.smoke(defaults.base_config())
  row = vqgan_step.measure(c, steps=1, warmup=0)
  assert row["batch"] == c.vqgan.train.batch_size
  assert row["step_ms_median"] > 0 and row["images_per_sec"] > 0 and row["first_call_s"] > 0
  assert row["gan"].startswith("GAN terms on")   # timed past vqgan.disc_start


def test_default_xla_flags_never_override_the_users():
  from rissole_jax.runtime import xla_flags
  ynn = xla_flags.CPU_FLAGS[0]
  assert xla_flags.merged("") == ynn
  assert xla_flags.merged("--xla_force_host_platform_device_count=8") == (
      "--xla_force_host_platform_device_count=8 " + ynn)
  mine = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
  assert xla_flags.merged(mine) == mine
  env = {"XLA_FLAGS": mine}
  xla_flags.apply(env)
  assert env["XLA_FLAGS"] == mine
  env = {xla_flags.OPT_OUT: "0"}
  xla_flags.apply(env)
  assert "XLA_FLAGS" not in env


_FORWARD = """
import json, os, sys
import jax, numpy as np
sys.path.insert(0, os.getcwd())
from tests.test_performance import two_levels, SHAPE, K
from rissole_jax.models import make_denoiser, unet
model = make_denoiser(two_levels(), SHAPE)
x, t, cond = unet.init_inputs(model, SHAPE, K, batch=2)
rng = np.random.default_rng(0)
x = rng.normal(size=x.shape).astype(np.float32)
cond["neighbours"] = rng.normal(size=cond["neighbours"].shape).astype(np.float32)
# Parameters drawn on the host from their shapes: no init program (compiling
# it was three quarters of this script's time; eager, it dispatches every op alone).
import flax.linen as nn
shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond)))
def draw(path, a):
  name, noise = jax.tree_util.keystr(path[-1:]), rng.normal(size=a.shape)
  value = (1 + 0.05 * noise if "scale" in name else 0.05 * noise if "bias" in name
           else noise / np.sqrt(max(1, np.prod(a.shape[:-1]))))
  return np.asarray(value, a.dtype)
params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
loss = lambda p: (model.apply({"params": p}, x, t + 7, **cond) ** 2).mean()
value, grads = jax.jit(jax.value_and_grad(loss))(params)
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "loss": float(value),
                  "grads": [float(np.abs(g).sum()) for g in jax.tree.leaves(grads)]}))
"""


def test_default_xla_flags_keep_results(tmp_path):
  """A forward and backward pass with and without the default flags agree to
  float tolerance (the flags change kernels, not the maths)."""
  import os
  import subprocess
  import sys
  from rissole_jax.runtime import xla_flags
  root = os.path.join(os.path.dirname(__file__), "..")
  out = {}
  for opt in ("1", "0"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({xla_flags.OPT_OUT: opt, "PYTHONPATH": root})
    run = subprocess.run([sys.executable, "-c", _FORWARD], cwd=root, env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    out[opt] = json.loads(run.stdout.strip().splitlines()[-1])
  assert xla_flags.CPU_FLAGS[0] in out["1"]["flags"] and not out["0"]["flags"]
  np.testing.assert_allclose(out["1"]["loss"], out["0"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(out["1"]["grads"], out["0"]["grads"], rtol=1e-4, atol=1e-6)


def test_patch_conv_transpose_is_flax_conv_transpose():
  """Same parameters, same outputs as nn.ConvTranspose(kernel = stride)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 3, 5)), jnp.float32)
  ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
  params = ref.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)   # a non-zero bias too
  got = layers.conv_transpose(4).apply(params, x)
  np.testing.assert_allclose(got, ref.apply(params, x), rtol=1e-5, atol=1e-6)
