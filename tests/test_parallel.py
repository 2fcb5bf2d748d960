"""Changing the mesh changes where numbers live, not what they are; fsdp
divides parameter bytes; two processes equal one.

Each test runs tests/mesh_worker.py in subprocesses (the device count must be
forced before jax is imported). To keep the file quick, one 8-device process
trains on both 8-device meshes, one after the other.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "mesh_worker.py")
MESHES = ("8x1", "2x4")
RTOL, ATOL = 2e-4, 2e-5
SHARE_BOUND = 0.2  # per-device share of the bytes on an fsdp=8 mesh (1/8 = 0.125)


def _worker(devices, *args, env=None, timeout=600):
  subprocess.run([sys.executable, WORKER, str(devices), *map(str, args)], check=True,
                 env={**os.environ, **(env or {})}, timeout=timeout)


def _params(wd):
  return np.load(os.path.join(wd, "params.npz"))


def _metrics(wd, stage):
  with open(os.path.join(wd, stage, "metrics.json")) as f:
    return json.load(f)


def _assert_params_equal(got, ref, stage):
  keys = [k for k in ref.files if k.startswith(stage + "/")]
  assert keys and keys == [k for k in got.files if k.startswith(stage + "/")]
  for k in keys:
    np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """One device: every stage up to the diffusion model."""
  tmp = tmp_path_factory.mktemp("mesh")
  one = str(tmp / "one")
  _worker(1, data_dir, f"1x1:{one}:vqgan,encode,index,diffusion")
  return tmp, one


@pytest.fixture(scope="module")
def eight(reference, data_dir):
  """8 devices, one process: on each mesh the VQ-GAN, and the diffusion model
  from the reference's latents and index (so both see the same inputs)."""
  tmp, one = reference
  wds = {shape: str(tmp / f"eight{shape}") for shape in MESHES}
  _worker(8, data_dir, *(f"{shape}:{wd}:vqgan,diffusion:{one}" for shape, wd in wds.items()))
  return wds


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_does_not_change_results(reference, eight, shape):
  _, one = reference
  wd = eight[shape]
  ref, got = _params(one), _params(wd)
  for stage in ("vqgan", "diffusion"):
    _assert_params_equal(got, ref, stage)
    for key, value in _metrics(one, stage).items():
      if "loss" in key:
        assert _metrics(wd, stage)[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert _metrics(wd, stage)["devices"] == 8


def test_two_processes_equal_one(reference, data_dir):
  """Two processes on localhost (CPU collectives), one device each, against
  the single-process reference: same global batch, same parameters."""
  tmp, one = reference
  wd = str(tmp / "two")
  port = 12000 + os.getpid() % 2000
  procs = []
  for pid in range(2):
    env = {**os.environ, "RISSOLE_COORDINATOR": f"localhost:{port}",
           "RISSOLE_NUM_PROCESSES": "2", "RISSOLE_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen([sys.executable, WORKER, "1", data_dir, f"-1x1:{wd}:vqgan"],
                                  env=env))
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0]
  _assert_params_equal(_params(wd), _params(one), "vqgan")
  assert _metrics(wd, "vqgan")["devices"] == 2


def test_fsdp_divides_parameter_bytes(tmp_path):
  """On a (data=1, fsdp=8) mesh each device holds about 1/8 of the parameters
  (and of the whole train state): only small leaves (norm scales, embeddings
  whose rows 8 does not divide, the 4-channel output conv) stay replicated."""
  out = tmp_path / "bytes.json"
  _worker(8, "fsdp-bytes", "1x8", out)
  row = json.loads(out.read_text())
  assert row["mesh"] == {"data": 1, "fsdp": 8} and row["devices"] == 8
  for name in ("params", "state"):
    per, total = row[name]["per_device"], row[name]["total"]
    assert len(per) == 8
    assert max(per) - min(per) <= 0.01 * total, (name, per)  # evenly spread
    assert 1 / 8 <= max(per) / total <= SHARE_BOUND, (name, max(per) / total, row)
