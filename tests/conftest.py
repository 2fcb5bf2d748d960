"""Shared fixtures. Tests run on the CPU with one device unless a test starts a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, inherited by the
# subprocesses (CLI runs, mesh workers) and shared by the xdist workers: the
# smoke stages compile the same programs many times, and XLA:CPU compiles are
# most of a smoke run's time (a smoke main job runs ~3x faster on a warm cache).
# Results do not change: an entry is keyed by the program and the compiler.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"rissole-jax-test-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The embedded MNIST prepared once per test session (a few seconds)."""
  d = os.environ.get("RISSOLE_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  from rissole_jax.data.sources import prepare_embedded
  prepare_embedded(d)
  return d


@pytest.fixture
def smoke_config(data_dir):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import mnist
  c = mnist.get_config("smoke")
  c.data.data_dir = data_dir
  return c


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, data_dir):
  """One smoke run (stages vqgan..sample), in this process, once per test
  process; shared by modules, so read only: copy it to change it."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import mnist
  from rissole_jax import main
  c = mnist.get_config("smoke")
  c.data.data_dir = data_dir
  c.stages = ("vqgan", "encode", "index", "diffusion", "sample")
  root = tmp_path_factory.mktemp("smoke") / "run"
  main.run(c, root, progress=False)
  return root
