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

Sample-quality cells show the value and its 95% bootstrap interval; every row
is compared with the baseline row (`config.baseline`, else the first) and
marked worse/better only where the difference is beyond the noise (`compare`);
the words under the table give the real-data floor and each row's verdict.
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

import numpy as np

from absl import app, flags
from ml_collections import config_flags

from rissole_jax import main as main_lib
from rissole_jax.metrics import scores as scores_lib
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
    ("KID (classifier)", "evaluate", ("classifier/kid",)),
    ("precision", "evaluate", ("classifier/precision",)),
    ("recall", "evaluate", ("classifier/recall",)),
    ("density", "evaluate", ("classifier/density",)),
    ("coverage", "evaluate", ("classifier/coverage",)),
    ("seam score", "evaluate", ("seam_score", "seams/seam_score")),
    ("memorisation (median ratio)", "evaluate", ("memorization/median_ratio",)),
    ("confident", "evaluate", ("classifier/confident_fraction",)),
    ("n samples", "evaluate", ("n_scored", "n_samples")),
]
# Sample-quality columns: each has a 95% interval, a real-data floor and
# bootstrap replicates (DIR/evaluate/bootstrap.npz), so rows can be compared
# with the baseline row beyond the noise. (column, metric key, lower is better)
# (column, metric key, which way is better): "lower" (distances), "higher"
# (recall and coverage: the share of the real data the samples reach; more is
# never a fault), "floor" (precision and density: fidelity, which a model of
# prototypes pushes above real data's own; nearer the real-data floor is
# better, and without a floor higher is).
QUALITY = [
    ("FID (Inception)", "inception/fid", "lower"),
    ("FD (classifier)", "classifier/fd", "lower"),
    ("KID (classifier)", "classifier/kid", "lower"),
    ("precision", "classifier/precision", "floor"),
    ("recall", "classifier/recall", "higher"),
    ("density", "classifier/density", "floor"),
    ("coverage", "classifier/coverage", "higher"),
]
FAMILY_LEVEL = 0.95  # family-wise over the quality metrics compared in a row


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
  metrics_by_stage = {}
  for col, stage, keys in columns:
    if stage not in metrics_by_stage:
      metrics_by_stage[stage] = files.read_json(root / stage / "metrics.json", missing_ok=True)
    metrics = metrics_by_stage[stage]
    if metrics is None:
      continue
    for k in keys:
      if k in metrics:
        out[col] = metrics[k]
        break
  if "train img/s" not in out:  # a diffusion stage made before that key existed
    try:
      rate = (metrics_by_stage.get("diffusion") or {})["steps_per_sec"]
      cfg = json.loads((root / "diffusion" / "stage.json").read_text())["config"]
      out["train img/s"] = rate * cfg["diffusion"]["train"]["batch_size"]
    except (FileNotFoundError, KeyError):
      pass
  ev = metrics_by_stage.get("evaluate") or {}
  intervals, floors = {}, {}
  for col, key, _ in QUALITY:
    if f"{key}_lo" in ev:
      intervals[col] = [ev[f"{key}_lo"], ev[f"{key}_hi"]]
    group, metric = key.split("/")
    if f"{group}/floor/{metric}/mean" in ev:  # [mean, std over draws, s.e. of one real set]
      floors[col] = [ev[f"{group}/floor/{metric}/mean"], ev[f"{group}/floor/{metric}/std"],
                     ev.get(f"{group}/floor/{metric}/se", float("nan"))]
  if intervals:
    out["intervals"] = intervals
  if floors:
    out["floor"] = floors
  return out


def compare(rows: list[dict], replicates: dict[str, dict], baseline: str | None = None,
            level: float = FAMILY_LEVEL) -> None:
  """Marks each row against the baseline row (the first unless named), in place.

  For every quality metric both rows have, the difference row - baseline gets
  an interval from the two rows' bootstrap replicates
  (`replicates[name][metric key]`, scores.difference_interval): normal, from
  the bootstrap standard error of the difference, at a family-wise `level` over the metrics compared
  (Bonferroni), so an identical model is called "within noise" at least 95% of
  the time. A difference whose interval excludes 0 is "better" or "worse" by
  QUALITY's direction: FD and KID lower, recall and coverage higher,
  precision and density nearer the real-data floor. row["vs_baseline"] = {column: {diff, lo, hi, mark}};
  row["verdict"]: baseline | within noise | worse | better | mixed | not compared."""
  if not rows:
    return
  base = next((r for r in rows if r["name"] == baseline), rows[0]) if baseline else rows[0]
  base_reps = replicates.get(base["name"], {})
  for row in rows:
    row.pop("vs_baseline", None)
    if row is base:
      row["verdict"] = "baseline"
      continue
    reps = replicates.get(row["name"], {})
    cols = [(c, k, way) for c, k, way in QUALITY
            if k in reps and k in base_reps and c in row and c in base
            and np.isfinite(reps[k]).sum() > 1 and np.isfinite(base_reps[k]).sum() > 1]
    if not cols:
      row["verdict"] = "not compared"
      continue
    each = 1 - (1 - level) / len(cols)  # Bonferroni: family-wise `level` over the row
    marks = {}
    for col, key, way in cols:
      diff = float(row[col]) - float(base[col])
      lo, hi = scores_lib.difference_interval(reps[key], base_reps[key], diff, each)
      mark = "within noise"
      if lo > 0 or hi < 0:
        floor = base.get("floor", {}).get(col)
        if way == "floor" and floor is not None:
          worse = abs(float(row[col]) - floor[0]) > abs(float(base[col]) - floor[0])
        else:
          worse = (diff > 0) == (way == "lower")
        mark = "worse" if worse else "better"
      marks[col] = {"diff": diff, "lo": lo, "hi": hi, "mark": mark}
    row["vs_baseline"] = marks
    found = {v["mark"] for v in marks.values()} - {"within noise"}
    row["verdict"] = ("within noise" if not found else found.pop() if len(found) == 1
                      else "mixed")


def load_replicates(runs_dir: Path, rows: list[dict]) -> dict[str, dict]:
  from rissole_jax.stages.evaluate import load_bootstrap
  return {r["name"]: load_bootstrap(runs_dir / r["name"] / "evaluate") for r in rows}


def benchmark(bench, out: Path, only=()) -> list[dict]:
  rows, done = [], {}
  runs_dir = out.with_suffix(".d")
  for name, overrides in bench.runs:  # what earlier invocations finished, `only` or not
    if (runs_dir / name).is_dir():
      register_done(with_overrides(bench.base, dict(overrides)), runs_dir / name, done)
  for name, overrides in bench.runs:
    config = with_overrides(bench.base, dict(overrides))
    root = runs_dir / name
    # A run left out of `only` is still a row of the table if an earlier
    # invocation finished it: the JSON and table always hold every finished run.
    asked = not only or name in only
    if not asked and not (root.is_dir() and main_lib.stage_records(config, root)[-1].is_done()):
      continue
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
      if sampler in bench.samplers and asked:
        run_linked(sconf, sroot, done)
      elif not (sroot.is_dir() and main_lib.stage_records(sconf, sroot)[-1].is_done()):
        continue
      row[f"sample img/s ({sampler})"] = wd.read_metrics(sroot / "sample").get("samples_per_sec")
    rows.append(row)
    compare(rows, load_replicates(runs_dir, rows), bench.get("baseline"))
    files.atomic_write_json(out, rows)  # after every run: a long benchmark loses nothing
    files.atomic_write_bytes(out.with_suffix(".md"), markdown(rows).encode())
  return rows


def _fmt(v, digits: int = 4) -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def markdown(rows: list[dict]) -> str:
  """The table, then in words what differs from the baseline row beyond the noise."""
  quality = {c for c, _, _ in QUALITY}
  present = {k for r in rows for k in r}
  cols = ["name"] + [c for c, _, _ in COLUMNS[:3]] + sorted(
      {k for k in present if k.startswith("sample img/s")}) + [
          c for c, _, _ in COLUMNS[3:] if c in present or c not in quality] + ["peak_rss_mib"]
  compared = any("verdict" in r for r in rows)
  if compared:
    cols.insert(1, "vs baseline")

  def cell(r, c):
    if c == "vs baseline":
      return r.get("verdict", "–")
    text = _fmt(r.get(c))
    if c in quality and c in r.get("intervals", {}):
      lo, hi = r["intervals"][c]
      text += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
    mark = r.get("vs_baseline", {}).get(c, {}).get("mark")
    if mark in ("worse", "better"):
      text += f" **{mark}**"
    return text

  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
  lines += [""] + notes(rows)
  return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> list[str]:
  """The words under the table: the floor, how to read the marks, each row's verdict."""
  out = []
  floors = next((r["floor"] for r in rows if r.get("floor")), None)
  n = next((r.get("n samples") for r in rows if r.get("n samples")), None)
  if any(r.get("intervals") for r in rows):
    out.append(f"Quality metrics: value [95% bootstrap interval over the {_fmt(n)} samples "
               "scored], all against the same real reference.")
  if floors:
    def floor_text(c, f):
      se = f[2] if len(f) > 2 and f[2] == f[2] else f[1]  # NaN: fall back to the spread
      return f"{c} {_fmt(f[0], 3)} ± {_fmt(se, 2)}"
    out.append("Real-data floor (what as many real images not in the reference score: mean "
               "over draws ± the standard error of one real set): " + ", ".join(
                   floor_text(c, f) for c, f in floors.items()) + ".")
  base = next((r for r in rows if r.get("verdict") == "baseline"), None)
  if base is None:
    return out
  out.append(f"Each row is compared with the baseline row `{base['name']}`: a metric marked "
             "**worse** or **better** differs beyond the noise (the bootstrap interval on the "
             "difference, 95% family-wise over the metrics compared, excludes 0; better means "
             "lower FD and KID, higher recall and coverage, precision and density nearer the "
             "real-data floor). Anything unmarked shows no measurable difference: "
             "it is not a tie, only not resolved at this n.")
  for r in rows:
    if r is base:
      continue
    v = r.get("verdict")
    if v == "within noise":
      out.append(f"- `{r['name']}`: within noise, no measurable difference from "
                 f"`{base['name']}`.")
    elif v == "not compared":
      out.append(f"- `{r['name']}`: not compared (no bootstrap replicates for it or the "
                 "baseline).")
    elif v in ("worse", "better", "mixed"):
      parts = [f"{c} {d['mark']} ({d['diff']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}])"
               for c, d in r["vs_baseline"].items() if d["mark"] != "within noise"]
      same = [c for c, d in r["vs_baseline"].items() if d["mark"] == "within noise"]
      text = f"- `{r['name']}`: {v} than `{base['name']}`" if v != "mixed" else \
          f"- `{r['name']}`: mixed against `{base['name']}`"
      text += ": " + "; ".join(parts)
      if same:
        text += "; no measurable difference in " + ", ".join(same)
      out.append(text + ".")
  return out


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
