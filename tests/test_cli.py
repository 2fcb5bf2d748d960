"""The main job's smoke variant end to end through the real CLI, then the
runner's behaviour on a finished workdir, and the benchmark runner on it.

The CLI run is conftest's smoke run (`smoke_cli`, every stage), made once per
test run and shared with the other modules: tests that change it work on a copy."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import smoke_cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
STAGES = ("vqgan", "encode", "index", "diffusion", "sample", "evaluate")


def _cli(workdir, data_dir, *extra, check=True, env=None, cache_dir=None):
  r = subprocess.run(smoke_cli(workdir, data_dir, *extra, cache_dir=cache_dir), cwd=ROOT,
                     capture_output=True, text=True, timeout=900, env=env)
  if check and r.returncode:
    raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
  return r


@pytest.fixture(scope="module")
def smoke_run(smoke_workdir, data_dir):
  """(workdir, data_dir) of conftest's smoke CLI run: read only."""
  return smoke_workdir, data_dir


def _copy(wd, tmp_path):
  """A copy of the smoke run to change; its config (evaluate.cache_dir too) is the run's."""
  dst = tmp_path / "smoke" / "run"
  shutil.copytree(wd, dst, symlinks=True)
  return dst


def test_every_stage_writes_its_outputs(smoke_run):
  wd, _ = smoke_run
  for s in STAGES:
    m = json.loads((wd / s / "metrics.json").read_text())
    assert m and all(isinstance(v, (int, float)) for v in m.values()), s
    assert (wd / s / "log.txt").exists() and json.loads((wd / s / "stage.json").read_text())["done"]
  assert {"psnr", "codebook_usage", "perplexity"} <= set(json.loads((wd / "vqgan/metrics.json").read_text()))
  # The input's share of the step's wall time and its rate (data/loader.py).
  for stage, prefix in (("vqgan", ""), ("encode", "train_"), ("encode", "heldout_")):
    m = json.loads((wd / stage / "metrics.json").read_text())
    assert 0.0 <= m[f"{prefix}input_wait_share"] <= 1.0, (stage, m)
    assert m[f"{prefix}input_images_per_second"] > 0 and m[f"{prefix}input_workers"] == 0
  train = np.load(wd / "encode" / "train-00000.npy")   # code indices, one shard
  assert train.dtype == np.uint8 and train.shape == (4500, 8, 8)
  nb = np.load(wd / "index" / "neighbours_train.npy")
  assert nb.dtype == np.int32 and nb.shape == (4500, 3)
  assert not (nb == np.arange(4500)[:, None]).any()  # never itself
  samples = np.load(wd / "sample" / "samples.npy")
  assert samples.dtype == np.uint8 and samples.shape == (8, 32, 32, 1)
  for png in ("vqgan/reconstructions.png", "sample/samples.png", "sample/figure.png"):
    assert (wd / png).stat().st_size > 100, png
  assert list((wd / "vqgan" / "tensorboard").iterdir())


def test_rerun_skips_and_mismatch_is_refused(smoke_run, tmp_path):
  smoke, data_dir = smoke_run
  wd, cache = _copy(smoke, tmp_path), smoke.parent / "cache"
  before = {s: json.loads((wd / s / "stage.json").read_text()) for s in STAGES}
  r = _cli(wd, data_dir, cache_dir=cache)
  assert "skipped" in r.stderr
  assert before == {s: json.loads((wd / s / "stage.json").read_text()) for s in STAGES}
  r = _cli(wd, data_dir, "--config.sample.num=16", "--only=sample", check=False, cache_dir=cache)
  assert r.returncode == 2 and "sample.num: 8 -> 16" in r.stderr and "--overwrite" in r.stderr


def test_bad_grid_is_refused_before_any_work(tmp_path, data_dir):
  # Without a JAX_COMPILATION_CACHE_DIR of the user's, the CLI turns the
  # compilation cache on in the user cache (the smoke runs above keep theirs).
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["RISSOLE_CACHE"] = str(tmp_path / "user_cache")
  r = _cli(tmp_path / "w", data_dir, "--config.blocks.grid=(3,3)", check=False, env=env)
  assert r.returncode == 2 and "does not divide the latent" in r.stderr
  assert not (tmp_path / "w" / "vqgan").exists()
  assert (tmp_path / "user_cache" / "jax").is_dir()


def test_benchmark_runner_tiny_matrix(smoke_run, tmp_path):
  """Two runs sharing the smoke run's upstream stages; a JSON and a table."""
  smoke, data_dir = smoke_run
  wd = _copy(smoke, tmp_path)       # the benchmark writes into its runs' folders
  from configs.bench import default as bench_default
  from rissole_jax import benchmark
  bench = bench_default.get_config("smoke")
  bench.base.data.data_dir = data_dir
  bench.base.evaluate.cache_dir = str(smoke.parent / "cache")
  bench.runs = [("rissole", {}), ("blocks_only", {"model.variant": "blocks_only"})]
  bench.samplers = ("ddim",)
  out = tmp_path / "bench.json"
  # Seed the benchmark's run folder with the finished smoke stages.
  (tmp_path / "bench.d").mkdir()
  (tmp_path / "bench.d" / "rissole").symlink_to(wd)
  rows = benchmark.benchmark(bench, out)
  assert [r["name"] for r in rows] == ["rissole", "blocks_only"]
  assert rows[1]["denoiser params"] < rows[0]["denoiser params"]
  for r in rows:
    assert r["seam score"] > 0 and r["sample img/s (ddim)"] > 0 and r["peak_rss_mib"] > 0
  # blocks_only reused the VQ-GAN, latents and index of the first run.
  assert (tmp_path / "bench.d" / "blocks_only" / "vqgan").is_symlink()
  # Each sampler timing reused its run's denoiser instead of training another.
  for name in ("rissole", "blocks_only"):
    assert (tmp_path / "bench.d" / f"{name}.ddim" / "diffusion").is_symlink()
  # Re-running redoes nothing and keeps the peak memory of the run that worked;
  # a run left out of --runs but finished stays in the table.
  again = benchmark.benchmark(bench, out, only=("blocks_only",))
  assert [r["name"] for r in json.loads(out.read_text())] == ["rissole", "blocks_only"]
  assert again[1]["peak_rss_mib"] == rows[1]["peak_rss_mib"]
  assert again[1]["FD (classifier)"] == rows[1]["FD (classifier)"]
  table = out.with_suffix(".md").read_text()
  lines = [line for line in table.splitlines() if line.startswith("|")]
  assert len(lines) == 4 and "blocks_only" in table  # header, rule, two rows; words under it
  assert "- `blocks_only`:" in table  # its verdict against the baseline row, in words
