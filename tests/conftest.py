"""Shared fixtures. Tests run on the CPU with one device unless a test starts a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

What is expensive is made once per test run, not once per pytest-xdist worker:
the prepared MNIST and the smoke pipeline live in a folder that every worker
of the run shares (`shared_dir`), made under a file lock by whichever worker
comes first. The smoke pipeline starts in the background as soon as a worker
begins its first test (when any collected test needs it), so the workers run
other tests while it trains.
"""
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny and each is compiled once, so compiling is most
# of the suite's time: LLVM at -O0 compiles them about twice as fast (five
# test files: 229 s -> 176 s on 2 cores) and tests the same XLA programs; only the
# machine code is less optimised. Inherited by the subprocesses; a user's
# XLA_FLAGS that already sets the level wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# One persistent compilation cache for the whole run, inherited by the
# subprocesses (CLI runs, mesh workers) and shared by the xdist workers: the
# smoke stages compile the same programs many times, and XLA:CPU compiles are
# most of a smoke run's time (a smoke main job runs ~3x faster on a warm cache).
# Results do not change: an entry is keyed by the program and the compiler.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"rissole-jax-test-cache-{os.getuid()}"))
# Every program (at -O0 many compile in under the default 1 s): the CLI
# subprocesses rerun the smoke stages' programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

ROOT = Path(__file__).resolve().parent.parent
SMOKE_WAIT_S = 1800


def shared_dir(tmp_path_factory) -> Path:
  """A folder of this test run that all its pytest-xdist workers share (the
  parent of their own base temporary folders); the base folder without xdist."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def locked(path: Path):
  """An exclusive lock between the processes of the run, on file `path`."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def prepared_data(shared: Path) -> str:
  """The embedded MNIST prepared once per run (a few seconds)."""
  d = os.environ.get("RISSOLE_TEST_DATA_DIR") or str(shared / "tfds")
  with locked(shared / "tfds.lock"):
    done = shared / "tfds.prepared"
    if not done.exists():
      from rissole_jax.data.sources import prepare_embedded
      prepare_embedded(d)
      done.write_text(d)
  return d


def smoke_cli(workdir, data_dir, *extra, cache_dir=None) -> list:
  """The main job's CLI on the smoke config (test_cli.py runs it again)."""
  return [sys.executable, "-m", "rissole_jax.main", "--config", "configs/mnist.py:smoke",
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
          f"--config.evaluate.cache_dir={cache_dir or Path(workdir).parent / 'cache'}",
          "--no_progress", *extra]


_started = []    # the smoke run this process started: waited for at the end


def start_smoke(shared: Path) -> Path:
  """Starts the smoke run (all stages, vqgan .. evaluate, through the CLI) in
  the background, once per test run; returns its folder."""
  folder = shared / "smoke"
  with locked(shared / "smoke.lock"):
    if not folder.exists():
      data = prepared_data(shared)
      folder.mkdir()
      log = open(folder / "log.txt", "w")
      status = folder / "exit_status"
      # The exit status appears, complete, when the run has ended.
      wrapper = '"$@"; echo $? > "$0.tmp" && mv "$0.tmp" "$0"'
      _started.append(subprocess.Popen(
          ["bash", "-c", wrapper, str(status), *smoke_cli(folder / "run", data)],
          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
      log.close()
  return folder


def _needs_smoke(item) -> bool:
  return "smoke_workdir" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
  """The files with tests on the smoke run go last, and within a file those
  tests go last (a stable sort, the same in every worker), so that other
  tests run while it trains: `--dist worksteal` gives each worker a
  contiguous half of this order, so the smoke tests come at the end of the
  second worker's half and are what an idle first worker steals."""
  on_smoke = {item.path for item in items if _needs_smoke(item)}
  items.sort(key=lambda item: (item.path in on_smoke, _needs_smoke(item)))


@pytest.fixture(scope="session", autouse=True)
def _start_long_runs(request, tmp_path_factory):
  """At the session's start, in the background, once per test run: the smoke
  run, when a collected test needs it, and each collected test module's
  `start_early(shared, data_dir, names)` (test_parallel's training runs)."""
  items = request.session.items
  shared = shared_dir(tmp_path_factory)
  if any("smoke_workdir" in getattr(item, "fixturenames", ()) for item in items):
    start_smoke(shared)
  names = {getattr(item, "originalname", item.name) for item in items}
  modules = {getattr(item, "module", None) for item in items}
  threads = [m.start_early(shared, prepared_data(shared), names)
             for m in modules if hasattr(m, "start_early")]
  yield
  for thread in threads:   # no orphans: another worker may still be waiting
    if thread:
      thread.join()
  for proc in _started:
    proc.wait()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The embedded MNIST prepared once per test run (a few seconds)."""
  return prepared_data(shared_dir(tmp_path_factory))


@pytest.fixture
def smoke_config(data_dir):
  sys.path.insert(0, str(ROOT))
  from configs import mnist
  c = mnist.get_config("smoke")
  c.data.data_dir = data_dir
  return c


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, data_dir):
  """One smoke run of every stage (vqgan .. evaluate) through the real CLI
  (`smoke_cli`), once per test run, shared by the xdist workers and by
  modules: read only, copy it to change it (shutil.copytree(..., symlinks=True)).
  Its evaluation cache (trained classifier) is the folder's ../cache."""
  folder = start_smoke(shared_dir(tmp_path_factory))
  status = folder / "exit_status"
  deadline = time.time() + SMOKE_WAIT_S
  while not status.exists():
    if time.time() > deadline:
      pytest.fail(f"the smoke run did not finish within {SMOKE_WAIT_S}s; see {folder}/log.txt")
    time.sleep(0.2)
  code = int(status.read_text())
  if code:
    tail = "".join((folder / "log.txt").read_text().splitlines(True)[-60:])
    pytest.fail(f"the smoke run ({' '.join(smoke_cli(folder / 'run', data_dir))}) "
                f"exited with {code}:\n{tail}")
  return folder / "run"
