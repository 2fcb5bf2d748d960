"""Config-driven benchmark: a matrix of runs of the main job, one table.

  python -m rissole_jax.benchmark --config configs/bench/default.py --out runs/bench.json

For every run in `config.runs` (the base config plus overrides) the main job
runs in its own workdir under `<out>.d/<name>/`, in a subprocess so that its
peak memory is its own. Stages whose fingerprint matches a run done earlier
are linked, not redone, so runs share one VQ-GAN, one set of latents and,
where retrieval settings agree, one index. Sampling throughput is timed for
each sampler in `config.samplers` by an extra `sample` stage on the same
denoiser with `config.timing_batch` images per batch. Results go to
FILE.json and a markdown table FILE.md.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rissole_jax import main as main_lib
from rissole_jax.stages import workdir as wd
from rissole_jax import files
FLAGS = flags.FLAGS

# (column, stage, metrics.json key); the first key found is used.
COLUMNS = [
    ("denoiser params", "diffusion", ("denoiser_params",)),
    ("train img/s", "diffusion", ("train_images_per_sec", "images_per_sec")),
    ("compile s", "diffusion", ("compile_seconds",)),
    ("FID (Inception)", "evaluate", ("inception/fid",)),
    ("FD (classifier)", "evaluate", ("classifier/fd",)),
    ("precision", "evaluate", ("classifier/precision",)),
    ("recall", "evaluate", ("classifier/recall",)),
    ("seam score", "evaluate", ("seam_score", "seams/seam_score")),
    ("memorisation (median ratio)", "evaluate", ("memorization/median_ratio",)),
    ("confident", "evaluate", ("classifier/confident_fraction",)),
]


def with_overrides(base, overrides: dict):
  c = copy.deepcopy(base)
  c.unlock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    target = c
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def register_done(config, root: Path, done: dict[str, Path]) -> list:
  """Records the finished stages under `root` in `done` (fingerprint -> folder);
  returns the run's stage records."""
  records = main_lib.stage_records(config, root)
  for rec in records:
    if rec.is_done():
      done.setdefault(rec.fingerprint, rec.directory)
  return records


def link_upstream(config, root: Path, done: dict[str, Path]) -> None:
  """Links stage folders already made (same fingerprint) into this run's workdir."""
  root.mkdir(parents=True, exist_ok=True)
  for rec in register_done(config, root, done):
    if rec.is_done():
      continue
    src = done.get(rec.fingerprint)
    if src is not None and not rec.directory.exists():
      rec.directory.symlink_to(src.resolve(), target_is_directory=True)


def run_linked(config, root: Path, done: dict[str, Path]) -> dict:
  """Links what earlier runs made, runs the rest, and records what this run
  made so that later runs (its sampler timings too) link to it."""
  link_upstream(config, root, done)
  stats = run_job(config, root)
  link_upstream(config, root, done)
  return stats


def run_job(config, root: Path) -> dict:
  """The main job in a subprocess; returns its peak RSS in MiB."""
  fd, cfg_path = tempfile.mkstemp(suffix=".pkl")
  with os.fdopen(fd, "wb") as f:
    pickle.dump(config, f)
  cmd = [sys.executable, "-m", "rissole_jax.benchmark", "--_job", cfg_path, "--_root", str(root)]
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  os.unlink(cfg_path)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"run in {root} failed (exit {os.waitstatus_to_exitcode(status)}); see its log.txt files")
  # The peak over every invocation that worked in this folder: a re-run that
  # only skips finished stages must not report its own small footprint.
  record = root / "peak_rss.json"
  before = json.loads(record.read_text())["peak_rss_mib"] if record.exists() else 0.0
  peak = max(before, usage.ru_maxrss / 1024)
  files.atomic_write_json(record, {"peak_rss_mib": peak})
  return {"peak_rss_mib": peak}


def collect(root: Path, columns=COLUMNS) -> dict:
  out = {}
  for col, stage, keys in columns:
    try:
      metrics = wd.read_metrics(root / stage)
    except FileNotFoundError:
      continue
    for k in keys:
      if k in metrics:
        out[col] = metrics[k]
        break
  if "train img/s" not in out:  # a diffusion stage made before that key existed
    try:
      rate = wd.read_metrics(root / "diffusion")["steps_per_sec"]
      cfg = json.loads((root / "diffusion" / "stage.json").read_text())["config"]
      out["train img/s"] = rate * cfg["diffusion"]["train"]["batch_size"]
    except (FileNotFoundError, KeyError):
      pass
  return out


def benchmark(bench, out: Path, only=()) -> list[dict]:
  rows, done = [], {}
  runs_dir = out.with_suffix(".d")
  for name, overrides in bench.runs:  # what earlier invocations finished, `only` or not
    if (runs_dir / name).is_dir():
      register_done(with_overrides(bench.base, dict(overrides)), runs_dir / name, done)
  for name, overrides in bench.runs:
    if only and name not in only:
      continue
    config = with_overrides(bench.base, dict(overrides))
    root = runs_dir / name
    row = {"name": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in dict(overrides).items()}}
    row.update(run_linked(config, root, done))
    row.update(collect(root))
    # Throughput per sampler: same denoiser, same batch. A timing left out of
    # `samplers` is still reported if an earlier invocation made it (same config).
    for sampler in dict.fromkeys((*bench.samplers, "ddpm", "ddim")):
      sconf = with_overrides(config, {"stages": ("vqgan", "encode", "index", "diffusion", "sample")})
      sconf.sample.update(sampler=sampler, batch_size=bench.timing_batch,
                          num=bench.timing_batch * (bench.timing_batches + 1))
      sroot = runs_dir / f"{name}.{sampler}"
      if sampler in bench.samplers:
        run_linked(sconf, sroot, done)
      elif not (sroot.is_dir() and main_lib.stage_records(sconf, sroot)[-1].is_done()):
        continue
      row[f"sample img/s ({sampler})"] = wd.read_metrics(sroot / "sample").get("samples_per_sec")
    rows.append(row)
    files.atomic_write_json(out, rows)  # after every run: a long benchmark loses nothing
    files.atomic_write_bytes(out.with_suffix(".md"), markdown(rows).encode())
  return rows


def markdown(rows: list[dict]) -> str:
  cols = ["name"] + [c for c, _, _ in COLUMNS[:3]] + sorted(
      {k for r in rows for k in r if k.startswith("sample img/s")}) + [
          c for c, _, _ in COLUMNS[3:]] + ["peak_rss_mib"]
  def fmt(v):
    if v is None:
      return "–"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS._job:
    with open(FLAGS._job, "rb") as f:
      config = pickle.load(f)
    main_lib.run(config, Path(FLAGS._root), progress=False)
    return
  if FLAGS.config is None or FLAGS.out is None:
    raise app.UsageError("--config and --out are required.")
  rows = benchmark(FLAGS.config, Path(FLAGS.out), tuple(FLAGS.runs))
  print(markdown(rows))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Benchmark config [:variant].",
                                  lock_config=False)
  flags.DEFINE_string("out", None, "Output JSON file (a .md table is written beside it).")
  flags.DEFINE_list("runs", [], "Run only these names from config.runs.")
  flags.DEFINE_string("_job", None, "internal: pickled config of one run")
  flags.DEFINE_string("_root", None, "internal: workdir of one run")
  app.run(main)
