"""int8 quantization (Qwix) of the denoiser and decoder, and the exported
StableHLO sampler run by its standalone runner in a subprocess. Parts are
built without training (random weights): these tests are about the
machinery; quality is measured by rissole_jax.benchmarks.solvers."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax.inference import quantize as qz
from rissole_jax.inference import stablehlo
from rissole_jax.defaults import LEGACY_MODEL, base_config, smoke
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.models import make_denoiser, unet
from rissole_jax.models import vqgan as vq
from rissole_jax.train import diffusion as dif
from rissole_jax.models.autoencoder import Autoencoder

SHAPE, K, N = (8, 8, 4), 3, 24
# Qwix 0.1.8 warns on every op about an nnx alias it still uses.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _random_params(model, seed=0):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *unet.init_inputs(model, SHAPE, K, 2)[:2],
                                             **unet.init_inputs(model, SHAPE, K, 2)[2]))
  rng = np.random.default_rng(seed)
  draw = lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(
      np.prod(a.shape[:-1]) if len(a.shape) > 1 else 25), a.dtype)
  import flax.linen as nn
  return jax.tree.map(draw, nn.unbox(shapes["params"]))


@pytest.fixture(scope="module")
def parts():
  c = smoke(base_config())
  c.model.update(ch=8, ch_mult=(1,), num_res_blocks=0, attn_lowest=False, num_groups=2)
  # The first layout (an up block, the neighbour encoder's convs): with none
  # of them a model this small is mostly norms and biases, and the byte
  # counts below test kernels.
  c.model.update(LEGACY_MODEL)
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  c.diffusion.prediction = "x0"        # keeps a random network's steps bounded
  c.sample.update(sampler="dpmpp", steps=4, order=2)
  model = make_denoiser(c, SHAPE)
  vqm = vq.make_model(c)
  import flax.linen as nn
  ae_params = nn.unbox(jax.jit(vqm.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 1)))["params"])
  ae = Autoencoder.from_params(c, ae_params)
  rng = np.random.default_rng(0)
  cb = np.asarray(ae_params["quantizer"]["codebook"], np.float32)   # latents are codebook vectors
  latents = cb[rng.integers(0, len(cb), size=(N, *SHAPE[:-1]))]
  nbrs = np.stack([(np.arange(1, K + 1) + i) % N for i in range(N)]).astype(np.int32)
  stats = {**dif.latent_stats(latents), "k": K, "latent_shape": SHAPE}
  db = types.SimpleNamespace(latents=latents, neighbours=nbrs)
  return types.SimpleNamespace(config=c, model=model, params=_random_params(model), ae=ae,
                               stats=stats, db=db, schedule=make_schedule(c.diffusion))


def _calib(p, num=8):
  lat = dif.normalise(p.db.latents, p.stats).astype(np.float32)
  return qz.calibration_inputs(p.model, p.schedule, lat, p.db.neighbours, num, batch=4)


def _rel(a, b):
  return float(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2))


@pytest.mark.parametrize("mode", ["int8_weights", "int8"])
def test_quantized_weights_are_int8_round_trip_and_stay_close(parts, mode, tmp_path):
  p = parts
  q = qz.quantize_parts(p, mode, num_calib=8)
  for tree, floats in ((q.params, p.params), (q.ae_params, qz.decoder_params(p.ae.params))):
    by = qz.dtype_bytes(tree)
    assert by["int8"] > by["float32"], by            # kernels int8, scales/norms/biases float
    assert qz.param_bytes(tree) < 0.45 * qz.param_bytes(floats)
    qz.save_params(tmp_path / "p.npz", tree)
    back = qz.load_params(tmp_path / "p.npz", tree)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, tree)
    assert {str(np.asarray(a).dtype) for a in jax.tree.leaves(back)} == set(by)
  # The quantized networks plug in unchanged and stay close to float.
  x, t, cond = _calib(p)[0]
  # Jitted: one compile each instead of an op-by-op dispatch.
  ref = jax.jit(lambda x, t, c: p.model.apply({"params": p.params}, x, t, **c))(x, t, cond)
  out = jax.jit(lambda x, t, c: q.model.apply({"params": q.params}, x, t, **c))(x, t, cond)
  assert _rel(out, ref) < 0.02, _rel(out, ref)
  z = jnp.asarray(p.db.latents[:4])
  assert _rel(q.decode_fn(q.ae_params, z), p.ae.decode_fn(p.ae.params, z)) < 0.05
  if mode == "int8_weights":   # (mode-independent: checked once) sensitivity
    # ranks layers by the error they add alone.
    sens = qz.layer_sensitivity(p.model, p.params, _calib(p, 4), "int8_weights")
    assert set(sens) == set(qz.quantizable_layers(p.params)) and all(v >= 0 for v in sens.values())
  with pytest.raises(DataError, match="another structure"):
    qz.load_params(tmp_path / "p.npz", p.params)


def test_calibration_is_deterministic(parts):
  p = parts
  a, b = _calib(p), _calib(p)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ts = np.concatenate([np.asarray(t) for _, t, _ in a])
  assert ts.min() == 0 and ts.max() == p.schedule.T - 1     # spread over the schedule
  _, qa = qz.quantize_denoiser(p.model, p.params, "int8", a)
  _, qb = qz.quantize_denoiser(p.model, p.params, "int8", b)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), qa, qb)


def test_int8_calibrates_through_the_small_map_matmul(parts):
  # The default model's lowest level is a 2x2 map, whose convs run as one
  # matmul (models/layers.py); int8 must quantize those layers too.
  from rissole_jax.models import layers
  p, keep = parts, layers.MATMUL_CONV_MAX_PIXELS
  layers.MATMUL_CONV_MAX_PIXELS = 16         # this model's 4x4 blocks
  layers.tap_index.cache_clear()
  try:
    calib = _calib(p, 4)
    qm, qp = qz.quantize_denoiser(p.model, p.params, "int8", calib)
    x, t, cond = calib[0]
    ref = jax.jit(lambda x, t, c: p.model.apply({"params": p.params}, x, t, **c))(x, t, cond)
    out = jax.jit(lambda x, t, c: qm.apply({"params": qp}, x, t, **c))(x, t, cond)
  finally:
    layers.MATMUL_CONV_MAX_PIXELS = keep
    layers.tap_index.cache_clear()
  assert _rel(out, ref) < 0.02, _rel(out, ref)
  assert qz.dtype_bytes(qp)["int8"] == qz.dtype_bytes(qz.quantize_kernels(p.params))["int8"]


def test_quantization_refusals(parts):
  p = parts
  with pytest.raises(ConfigError, match="calibration data"):
    qz.quantize_denoiser(p.model, p.params, "int8", None)
  with pytest.raises(ConfigError, match="calibration latents"):
    qz.quantize_decoder(p.ae, "int8", None)
  with pytest.raises(ConfigError, match="Unknown sample.quantize"):
    qz.quantize_denoiser(p.model, p.params, "int4")
  with pytest.raises(DataError, match="calibration data"):
    qz.calibration_inputs(p.model, p.schedule, np.zeros((0, *SHAPE), np.float32), None)


# ---------------------------------------------------------------------------
# The exported sampler.

RUN = """import runpy, sys
sys.argv = ["run.py"] + sys.argv[1:]
try:
  runpy.run_path(sys.argv[1] + "/run.py", run_name="__main__")
except SystemExit as e:
  code = e.code
else:
  code = 0
assert not [m for m in sys.modules if m.startswith("rissole_jax")], "runner imported rissole_jax"
sys.exit(code)
"""


def _run(directory, *args, cwd):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  return subprocess.run([sys.executable, "-c", RUN, str(directory), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["none", "int8_weights"])
def test_export_runs_standalone_and_matches_in_process(parts, mode, tmp_path):
  out = tmp_path / "exp"
  m = stablehlo.export_stablehlo(parts, out, quantize=mode, platforms=("cpu",), say=lambda *a: None)
  assert m["batch"] == "symbolic" and m["quantize"] == mode and m["platforms"] == ["cpu"]
  assert {"sampler.stablehlo", "params.npz", "database.npz", "run.py", "manifest.json"} <= \
      {f.name for f in out.iterdir()}
  # In process: the same program, the same inputs the runner draws.
  fn, leaves, _, _ = stablehlo.build(parts, mode)
  from rissole_jax.inference import export_runner as runner
  _, _, db, _ = runner.load(str(out))
  assert "codes" in np.load(out / "database.npz")     # stored as codebook indices
  nb, seeds, _ = runner.inputs(db, 3, 7)
  # In the runner's batches (2, then 1): one symbolic-batch export serves both.
  run = jax.jit(fn)
  want = np.concatenate([np.asarray(run(*leaves, nb[i:i + 2], seeds[i:i + 2])) for i in (0, 2)])
  assert want.dtype == np.uint8 and want.shape == (3, 32, 32, 1)
  r = _run(out, "--num", "3", "--seed", "7", "--batch", "2", "--out", str(tmp_path / "png"),
           cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / "png" / "samples.npy")
  np.testing.assert_array_equal(got, want)
  assert len(list((tmp_path / "png").glob("sample_*.png"))) == 3


def test_export_refuses_other_jax(parts, tmp_path):
  out = tmp_path / "exp"
  stablehlo.export_stablehlo(parts, out, platforms=("cpu",), say=lambda *a: None)
  mpath = out / "manifest.json"
  m = json.loads(mpath.read_text())
  mpath.write_text(json.dumps({**m, "jax_version": "0.4.1"}))
  r = _run(out, "--num", "1", "--out", str(tmp_path / "png"), cwd=tmp_path)
  assert r.returncode == 2 and "pip install jax==0.4.1" in r.stderr and "--allow-jax-mismatch" in r.stderr
  mpath.write_text(json.dumps({**m, "jax_version": "999.0.0"}))
  r = _run(out, "--num", "1", "--allow-jax-mismatch", "--out", str(tmp_path / "png"), cwd=tmp_path)
  assert r.returncode == 2 and "not forward compatible" in r.stderr
  mpath.write_text(json.dumps({**m, "calling_convention_version": 99}))
  r = _run(out, "--num", "1", "--allow-jax-mismatch", "--out", str(tmp_path / "png"), cwd=tmp_path)
  assert r.returncode == 2 and "calling convention 99" in r.stderr


def test_export_platforms_given_must_lower_default_skips(parts, tmp_path, monkeypatch):
  """Platforms asked for are each required (the error names the one that
  cannot be lowered, and why); none asked for: those that cannot are
  skipped and listed. A platform this jax cannot lower for is simulated:
  on a CPU-only jaxlib every known platform lowers."""
  real = stablehlo.lower

  def lower(fn, specs, platforms):
    if "tpu" in platforms:
      raise RuntimeError("tpu: no lowering rule for this op here")
    return real(fn, specs, platforms)
  monkeypatch.setattr(stablehlo, "lower", lower)
  with pytest.raises(ConfigError, match="platform 'tpu' here: tpu: no lowering rule"):
    stablehlo.export_stablehlo(parts, tmp_path / "a", platforms=("cpu", "tpu"),
                               say=lambda *a: None)
  assert not (tmp_path / "a").exists()
  with pytest.raises(ConfigError, match="Unknown export platform 'nosuch'"):
    stablehlo.export_stablehlo(parts, tmp_path / "a", platforms=("cpu", "nosuch"))
  said = []
  monkeypatch.setattr(stablehlo, "PLATFORMS", ("cpu", "tpu"))
  m = stablehlo.export_stablehlo(parts, tmp_path / "b", say=said.append)
  assert m["platforms"] == ["cpu"] and list(m["platforms_skipped"]) == ["tpu"]
  assert len(said) == 1 and "skipping platform tpu" in said[0]
