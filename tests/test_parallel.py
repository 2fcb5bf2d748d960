"""Changing the mesh changes where numbers live, not what they are; fsdp
divides parameter bytes; two processes equal one.

Each test runs tests/mesh_worker.py in subprocesses (the device count must be
forced before jax is imported). To keep the file quick, the training runs
start together, once per test run, as the session starts (`start_early`,
called by conftest), and one 8-device process trains on both 8-device
meshes, one after the other.
"""
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "mesh_worker.py")
MESHES = ("8x1", "2x4")
RTOL, ATOL = 2e-4, 2e-5
TIMEOUT = 900
# Per-device share of the bytes on an fsdp=8 mesh: 1/8 plus 7/8 of the
# replicated leaves (measured on the smoke config: 2.7% of the parameter
# bytes are replicated, so the share is 0.148).
SHARE_BOUND = 0.17


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_all(root, data_dir, groups) -> dict:
  """Starts the worker processes together (each spends most of its time
  compiling on one core, so they overlap well) and waits for all of them.
  Returns {group: [exit codes], group + "_logs": [log paths]}.

    one    1 device: every stage up to the diffusion model (the reference)
    eight  8 devices, one process: the VQ-GAN on each mesh, then the diffusion
           model on each mesh from the reference's latents and index (linked
           once the reference has them), so both see the same inputs
    two    2 processes on localhost (CPU collectives), 1 device each: the VQ-GAN
    twodata  2 processes, 1 device each: the encode and index stages from the
           reference's VQ-GAN (linked once it is trained)
  """
  procs, logs = {}, {}

  def start(group, devices, jobs, env=None, suffix=""):
    log = root / f"{group}{suffix}.log"
    with open(log, "w") as f:
      procs.setdefault(group, []).append(subprocess.Popen(
          [sys.executable, WORKER, str(devices), data_dir, *jobs],
          env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT))
    logs.setdefault(group, []).append(str(log))

  one = root / "one"
  start("one", 1, [f"1x1:{one}:vqgan,encode,index,diffusion"])
  if "eight" in groups:
    wds = {shape: root / f"eight{shape}" for shape in MESHES}
    jobs = [f"{shape}:{wd}:vqgan" for shape, wd in wds.items()]
    jobs += [f"{shape}:{wd}:diffusion:{one}" for shape, wd in wds.items()]
    start("eight", 8, jobs)
  if "two" in groups:
    port = _free_port()
    for pid in range(2):
      env = {"RISSOLE_COORDINATOR": f"localhost:{port}", "RISSOLE_NUM_PROCESSES": "2",
             "RISSOLE_PROCESS_ID": str(pid)}
      start("two", 1, [f"-1x1:{root / 'two'}:vqgan"], env, suffix=str(pid))
  if "twodata" in groups:
    port = _free_port()
    for pid in range(2):
      env = {"RISSOLE_COORDINATOR": f"localhost:{port}", "RISSOLE_NUM_PROCESSES": "2",
             "RISSOLE_PROCESS_ID": str(pid)}
      start("twodata", 1, [f"-1x1:{root / 'twodata'}:encode,index:{one}"], env,
            suffix=str(pid))
  def kill(groups):
    for g in groups:
      for p in procs[g]:
        if p.poll() is None:
          p.kill()
        p.wait()

  deadline = time.time() + TIMEOUT
  try:
    while any(p.poll() is None for ps in procs.values() for p in ps) and time.time() < deadline:
      for g, ps in procs.items():
        if any(p.poll() not in (None, 0) for p in ps):
          # A failed process's peers would wait for it, and without the
          # reference "eight" would wait for its stages, in vain.
          kill(procs if g == "one" else [g])
      time.sleep(0.5)
  finally:
    kill(procs)
  return {**{g: [p.returncode for p in ps] for g, ps in procs.items()},
          **{f"{g}_logs": ls for g, ls in logs.items()}}


TRAINED_BY = (("eight", "test_mesh_does_not_change_results"),
              ("two", "test_two_processes_equal_one"),
              ("twodata", "test_two_processes_encode_and_index_like_one"))


def start_early(shared, data_dir, names):
  """Starts the training runs in a background thread, once per test run (a
  lock in the folder that the pytest-xdist workers share), when a test that
  reads them was collected; returns the thread (None if another process
  started them). conftest calls it as the session starts, so the runs train
  while the workers run other tests."""
  groups = {g for g, test in TRAINED_BY if test in names}
  if not groups:
    return None
  root = shared / "mesh_runs"
  with open(shared / "mesh_runs.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if root.exists():
      return None
    root.mkdir()

  def train():
    try:
      status = _train_all(root, data_dir, groups)
    except Exception as e:  # reported by the tests, which would otherwise wait in vain
      status = {"error": repr(e)}
    (root / "status.tmp").write_text(json.dumps(status))
    (root / "status.tmp").rename(root / "status.json")
  thread = threading.Thread(target=train, name="mesh_runs")
  thread.start()
  return thread


@pytest.fixture(scope="session")
def trained(request, tmp_path_factory, data_dir):
  """(root, status) of the training runs: made once per test run in the
  folder that the pytest-xdist workers share (started by `start_early`)."""
  from conftest import shared_dir
  shared = shared_dir(tmp_path_factory)
  names = {getattr(item, "originalname", item.name) for item in request.session.items}
  thread = start_early(shared, data_dir, names)    # None: already started
  root = shared / "mesh_runs"
  deadline = time.time() + TIMEOUT + 300
  while not (root / "status.json").exists():
    if time.time() > deadline:
      pytest.fail(f"the training runs did not end within {TIMEOUT + 300}s: see {root}")
    time.sleep(0.5)
  if thread:
    thread.join()
  return root, json.loads((root / "status.json").read_text())


def _check(trained, *groups):
  """The root of the runs, once `groups` exited cleanly (else their logs' tails)."""
  root, status = trained
  if "error" in status:
    pytest.fail(f"the training runs could not start: {status['error']}")
  for g in ("one", *groups):
    if status.get(g) != [0] * len(status.get(g) or [1]):
      tails = "\n".join(f"--- {log}\n" + "".join(open(log).readlines()[-40:])
                         for log in status.get(f"{g}_logs", []))
      pytest.fail(f"worker group {g!r} exited with {status.get(g)} (negative: killed "
                  f"after the reference failed or after {TIMEOUT}s):\n{tails}")
  return root


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


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_does_not_change_results(trained, shape):
  root = _check(trained, "eight")
  one, wd = root / "one", root / f"eight{shape}"
  ref, got = _params(one), _params(wd)
  for stage in ("vqgan", "diffusion"):
    _assert_params_equal(got, ref, stage)
    for key, value in _metrics(one, stage).items():
      if "loss" in key:
        assert _metrics(wd, stage)[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert _metrics(wd, stage)["devices"] == 8


def test_two_processes_equal_one(trained):
  """Two processes, one device each, against the single-process reference:
  same global batch, same parameters."""
  root = _check(trained, "two")
  _assert_params_equal(_params(root / "two"), _params(root / "one"), "vqgan")
  assert _metrics(root / "two", "vqgan")["devices"] == 2


def test_two_processes_encode_and_index_like_one(trained):
  """Each of 2 processes encodes its own shards (every other one of 5) and
  searches an even share of the rows (train: 0..2048 and 2048..4500): the
  database and the neighbour tables are the same bytes as one process's, and
  no item is its own neighbour."""
  root = _check(trained, "twodata")
  one, two = root / "one", root / "twodata"
  files = sorted(p.name for p in (one / "encode").iterdir() if p.suffix in (".npy", ".json")
                 and p.name not in ("stage.json", "metrics.json"))
  assert "train-00004.npy" in files and "codebook.npy" in files   # 5 shards of codes
  for name in files:
    assert (two / "encode" / name).read_bytes() == (one / "encode" / name).read_bytes(), name
  for name in ("neighbours_train.npy", "neighbours_heldout.npy", "neighbours.json"):
    assert (two / "index" / name).read_bytes() == (one / "index" / name).read_bytes(), name
  nb = np.load(two / "index" / "neighbours_train.npy")
  assert not (nb == np.arange(len(nb))[:, None]).any()
  assert _metrics(two, "index")["processes"] == 2
  assert np.load(one / "encode" / "train-00000.npy").dtype == np.uint8


def test_gather_placements_on_eight_devices(tmp_path):
  """Codes replicated, sharded over 8 devices, or on the host: the sharded
  gather (a psum of each device's block) equals the plain one, and the bytes
  on each device follow the placement."""
  out = tmp_path / "gather.json"
  _worker(8, "gather-bytes", "8x1", out)
  row = json.loads(out.read_text())
  codes, table, cb = row["codes_bytes"], row["table_bytes"], row["codebook_bytes"]
  assert row["sharded_equals_plain"] and row["step_equals_plain"]
  per = row["per_device"]
  assert per["device"] == [codes + table + cb] * 8
  # 1001 rows padded to 1008: 126 rows of codes and of the table per device.
  assert per["sharded"] == [(codes + table) * 126 // 1001 + cb] * 8
  assert per["host"] == [cb] * 8 and row["host_bytes"]["host"] == codes + table


def _worker(devices, *args, timeout=600):
  subprocess.run([sys.executable, WORKER, str(devices), *map(str, args)], check=True,
                 timeout=timeout)


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
  # Everything but the replicated leaves is split evenly: per device, 1/8 of
  # the sharded bytes plus all the replicated ones.
  total = row["params"]["total"]
  repl = sum(b for _, b in row["replicated_params"])
  assert repl <= 0.04 * total, row["replicated_params"]
  assert max(row["params"]["per_device"]) == pytest.approx((total - repl) / 8 + repl, rel=0.01)


def test_inferred_mesh_size_must_divide_the_devices():
  """(Sizes that do not multiply to the device count, and two -1s, are
  covered in test_workdir.py.) A -1 whose known sizes do not divide the
  device count is refused before any device is touched, with the fix."""
  from rissole_jax.runtime import parallel
  from rissole_jax.defaults import base_config
  from rissole_jax.errors import ConfigError
  c = base_config().mesh
  c.shape = (2, -1)
  with pytest.raises(ConfigError, match=r"does not fit 3 devices.*Fix"):
    parallel.make_mesh(c, devices=[object()] * 3)
  c.axes = ("data",)
  with pytest.raises(ConfigError, match="differ in length"):
    parallel.make_mesh(c, devices=[object()] * 2)


def test_scale_out_benchmark_runs_and_reports_the_fsdp_share(tmp_path):
  """The benchmark module end to end on the smoke config: a 1-device row and a
  (data=1, fsdp=2) row, whose per-device parameter share is about a half."""
  out = tmp_path / "rows.json"
  # (A subprocess: the module defines absl flags. "--meshes X" in the spaced
  # form also checks that the children do not get the parent's own flags.)
  subprocess.run([sys.executable, "-m", "rissole_jax.benchmarks.parallel",
                  "--config=configs/mnist.py:smoke", "--meshes", "1:1x1,2:1x2", "--steps=2",
                  "--warmup=0", "--database=64", "--json", str(out)],
                 cwd=os.path.join(HERE, ".."), check=True, timeout=600, capture_output=True)
  one, two = json.loads(out.read_text())
  assert (one["mesh"], two["mesh"], two["devices"]) == ("1x1", "1x2", 2)
  assert one["param_bytes_per_device_max"] == one["param_bytes_total"]
  assert 0.5 <= two["param_bytes_per_device_max"] / two["param_bytes_total"] <= 0.6
  for r in (one, two):
    assert r["compile_s"] > 0 and r["step_s_median"] > 0 and r["flops_per_step_per_device"] > 0
  assert two["flops_per_step_per_device"] < one["flops_per_step_per_device"]
