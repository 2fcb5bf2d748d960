"""The launch scripts' dry runs print well-formed commands."""
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _dry(script, *args):
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.strip().splitlines()]


def test_tpu_pod_dry_run():
  cmds = _dry("tpu_pod.sh", "--tpu", "my-tpu", "--zone", "us-central2-b", "--accelerator",
              "v4-32", "--workdir", "gs://bucket/run 1", "--create", "--project", "p")
  assert [c[:4] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
  create, scp, ssh = cmds
  assert create[4:6] == ["create", "my-tpu"] and "v4-32" in create
  assert "--worker=all" in scp and "--worker=all" in ssh
  remote = shlex.split(ssh[ssh.index("--command") + 1])
  main = remote[remote.index("rissole_jax.main") - 2:]
  assert main[main.index("--workdir") + 1] == "$HOME/gcs/bucket/run 1"
  assert "gcsfuse" in remote
  assert "RISSOLE_DISTRIBUTED=auto" in remote
  assert not any("data_dir" in a for a in remote)


def test_tpu_pod_data_dir_on_gcs():
  """--data-dir gs://...: its bucket is mounted on every worker too, and the
  run reads the datasets from the mount."""
  cmds = _dry("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--accelerator", "v4-32",
              "--workdir", "gs://runs/r1", "--data-dir", "gs://data/tensorflow_datasets")
  ssh = cmds[-1]
  remote = shlex.split(ssh[ssh.index("--command") + 1])
  assert "$HOME/gcs/data" in " ".join(remote) and remote.count("gcsfuse") == 2
  assert "--config.data.data_dir=$HOME/gcs/data/tensorflow_datasets" in remote


def test_tpu_pod_requires_arguments():
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run"],
                     capture_output=True, text=True)
  assert r.returncode == 2 and "missing --tpu" in r.stderr


def test_multihost_dry_run():
  cmds = _dry("multihost.sh", "--local", "--num-processes", "3", "--workdir", "/tmp/w",
              "--config", "configs/mnist.py:smoke", "--", "--only=vqgan")
  assert len(cmds) == 3
  for i, c in enumerate(cmds):
    assert c[1:3] == ["-m", "rissole_jax.main"]
    assert c[c.index("--process_id") + 1] == str(i)
    assert c[c.index("--num_processes") + 1] == "3" and c[-1] == "--only=vqgan"
  one = _dry("multihost.sh", "--num-processes", "2", "--process-id", "1",
             "--coordinator", "10.0.0.1:1234", "--workdir", "/w")
  assert len(one) == 1 and one[0][one[0].index("--coordinator_address") + 1] == "10.0.0.1:1234"


def test_accelerator_scripts_parse():
  for script in ("accelerator_bench.sh", "device_wheels.sh"):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], check=True)


# What the lent GPU machine's image lacks of setup.py's install_requires (its
# package list: /work/.library/device/KINDS.md); ml_collections travels as a
# wheel (launch/device_wheels.sh), these do not.
NOT_ON_DEVICE = {"tensorflow_datasets", "tensorflow", "array_record", "importlib_resources",
                 "scann", "mlxtend", "tensorboardX", "qwix"}

_TRACE = """
import json, sys
from rissole_jax.stages import workdir  # --json
from rissole_jax.benchmarks import throughput
s = throughput.setup(throughput.load_config("configs/celeba64.py:paper,smoke"), n_db=16)
for jitted, args in (throughput.train_program(s), throughput.sample_program(s, 2)):
  jitted.lower(*args)   # traced: every import the programs' code makes (no compile)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_throughput_imports_only_what_the_device_has():
  """launch/accelerator_bench.sh runs the throughput benchmark on a machine
  whose image has jax, flax, optax, orbax... but none of NOT_ON_DEVICE: the
  benchmark's setup and programs (paper config file, smoke-sized) must not
  import them."""
  out = subprocess.run([sys.executable, "-c", _TRACE], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  modules = set(json.loads(out.strip().splitlines()[-1]))
  # The trace saw the programs' imports (the benchmark trains: optax). orbax is
  # not required: training steps do not read checkpoints.
  assert {"jax", "flax", "optax", "ml_collections", "rissole_jax"} <= modules
  assert not modules & NOT_ON_DEVICE, modules & NOT_ON_DEVICE
