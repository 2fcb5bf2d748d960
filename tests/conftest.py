"""Shared fixtures. Tests run on the CPU with one device unless a test starts a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
