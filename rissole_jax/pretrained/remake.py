"""Remakes a shipped pretrained model with the project's own pipeline.

  python -m rissole_jax.pretrained.remake mnist --workdir runs/pretrained_mnist

1. runs the main job of the model's config in WORKDIR (resumes; finished
   stages are kept), and with SHIPPED_STUDENTS its distill stage (python -m
   rissole_jax.distill); the file keeps those students;
2. writes the model file with int8 kernels (format 2), then samples it as the
   sample stage sampled the float model (same n, settings and seed) and
   scores both with the evaluate stage's protocol, paired (same noise, same
   bootstrap resamples): the difference of every metric with its 95%
   interval goes into the manifest's provenance beside the float model's
   metrics, the commit and this command;
3. puts the file at rissole_jax/pretrained/<name>.rissole (--out to write
   elsewhere) and prints the provenance as a markdown table (docs/pretrained.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from rissole_jax import pretrained
from rissole_jax.runtime import host

METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
# The distilled students the shipped file keeps (sampler="distilled"). None:
# stored as int8, the 4-step student lost FD +0.37 [+0.31, +0.43] against its
# float self (paired, 2,000 samples; docs/pretrained.md), a measurable loss the
# shipped file must not have, and float32 would add 3 MB. Each count listed
# here is distilled, kept and compared, int8 against float, in the provenance.
SHIPPED_STUDENTS: tuple[int, ...] = ()


def _commit() -> str | None:
  """HEAD of the repository this package is in (with '+dirty' if it has
  uncommitted changes), or None outside one."""
  here = Path(__file__).resolve().parent
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+dirty" if dirty else "")


def compare(proto, float_images: np.ndarray, int8_images: np.ndarray, seed: int) -> dict:
  """{metric: {float, int8, diff, lo, hi}} of two paired sample sets under
  the protocol `proto` (the same bootstrap resamples for both)."""
  from rissole_jax.metrics import scores as scores_lib
  a, ra = proto.score(float_images, seed)
  b, rb = proto.score(int8_images, seed)
  out = {}
  for m in METRICS:
    diff = float(b[m] - a[m])
    lo, hi = scores_lib.difference_interval(rb[m], ra[m], diff)
    out[m] = {"float": float(a[m]), "float_lo": a.get(f"{m}_lo"), "float_hi": a.get(f"{m}_hi"),
              "floor": proto.floor(proto.scored_n(len(float_images)))[m]["mean"],
              "int8": float(b[m]), "diff": diff, "lo": lo, "hi": hi}
  return out


# The direction a loss would take each metric (recall and coverage are short
# of the real floor on these models; precision and density above it).
WORSE_IF = {"fd": +1, "kid": +1, "recall": -1, "coverage": -1, "precision": +1, "density": +1}


def verdict(cmp: dict) -> str:
  """In words: which metrics the int8 file moves beyond the noise, which way,
  and whether any of them is a loss."""
  beyond = {m: r for m, r in cmp.items() if not r["lo"] <= 0 <= r["hi"]}
  same = [m for m in cmp if m not in beyond]
  if not beyond:
    return "no measurable difference from the float model in " + ", ".join(same)
  moved = ", ".join(f"{m} {r['diff']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]"
                    for m, r in beyond.items())
  lost = [m for m, r in beyond.items() if WORSE_IF.get(m, 0) * r["diff"] > 0]
  head = (f"worse than the float model beyond the noise in {', '.join(lost)}" if lost else
          "no loss against the float model")
  tail = f"; no measurable difference in {', '.join(same)}" if same else ""
  return f"{head}: beyond the noise, {moved}{tail}"


def table(prov: dict) -> str:
  """The provenance's comparison as a markdown table."""
  rows = ["| metric | real-data floor | float32 model [95%] | int8 file | int8 − float [95%] |",
          "|---|---|---|---|---|"]
  for m, r in prov["int8_vs_float"].items():
    rows.append(f"| {m} | {r['floor']:.3g} | {r['float']:.3g} [{r['float_lo']:.3g}, "
                f"{r['float_hi']:.3g}] | {r['int8']:.3g} | {r['diff']:+.3g} "
                f"[{r['lo']:+.3g}, {r['hi']:+.3g}] |")
  text = "\n".join(rows) + f"\n\n{prov['verdict']} (n = {prov['n_samples']}, seed {prov['seed']})."
  for n, d in prov.get("distilled", {}).get("students", {}).items():
    text += f"\n\nThe {n}-step distilled student, int8 against float: {d['verdict']}."
  return text


def remake(name: str, workdir: Path, out: Path | None = None, command: str | None = None) -> dict:
  """Runs the steps in the module docstring; returns the provenance written."""
  from rissole_jax import main
  from rissole_jax.files import atomic_write_bytes
  from rissole_jax.inference.sampler import Sampler
  from rissole_jax.metrics.protocol import Protocol
  config = pretrained.config(name)
  out = Path(out) if out else Path(pretrained.__file__).with_name(pretrained.MODELS[name][0])
  from rissole_jax.stages import distill_stages
  main.run(config, workdir)
  if SHIPPED_STUDENTS:
    dconf = config.copy_and_resolve_references()
    with dconf.unlocked():
      dconf.stages = distill_stages(config)
    main.run(dconf, workdir, only=("distill",))
  float_sampler = Sampler.from_workdir(workdir, config)
  float_sampler.students = {n: p for n, p in float_sampler.students.items()
                            if n in SHIPPED_STUDENTS}
  tmp = Path(workdir) / f"{name}.int8.rissole"
  float_sampler.save(tmp, weights="int8")
  int8_sampler = Sampler.load(tmp)
  float_images = np.load(Path(workdir) / "sample" / "samples.npy")
  int8_images = int8_sampler.sample(len(float_images), seed=config.seed)
  proto = Protocol(config)
  cmp = compare(proto, float_images, int8_images, config.seed)
  # The students too: float against int8, paired, as the default sampler runs them.
  students = {}
  for n in SHIPPED_STUDENTS:
    draw = lambda s: s.sample(len(float_images), seed=config.seed, sampler="distilled", steps=n)
    c = compare(proto, draw(float_sampler), draw(int8_sampler), config.seed)
    students[str(n)] = {"int8_vs_float": c, "verdict": verdict(c)}
  evaluate = json.loads((Path(workdir) / "evaluate" / "metrics.json").read_text())
  prov = {"name": name, "made": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "commit": _commit(), "command": command or pretrained.remake_command(name),
          "config": f"rissole_jax.defaults.{pretrained.MODELS[name][1]}() (configs/mnist.py)",
          "machine": f"{host.cpu_name()}, {platform.system()} {platform.machine()}",
          "n_samples": int(len(float_images)), "seed": int(config.seed),
          # what the evaluate stage measured of the float model besides the metrics above
          "float_evaluate": {k: v for k, v in evaluate.items() if k.startswith(
              ("memorization/", "classifier/confident", "classifier/heldout")) or k in (
              "seam_score", "n_samples", "n_reference")},
          "int8_vs_float": cmp, "verdict": verdict(cmp),
          **({"distilled": {"command": f"python -m rissole_jax.distill --workdir {workdir}",
                            "students": students}} if students else {})}
  float_sampler.save(tmp, weights="int8", provenance=prov)
  atomic_write_bytes(out, tmp.read_bytes())
  tmp.unlink()
  return prov


def main_cli(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m rissole_jax.pretrained.remake", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=sorted(pretrained.MODELS))
  p.add_argument("--workdir", required=True, type=Path,
                 help="where the main job runs (resumed if it has run before)")
  p.add_argument("--out", type=Path, help="default: the file shipped in the package")
  from rissole_jax.runtime import cache
  cache.add_flag(p)
  args = p.parse_args(argv)
  cache.enable_compilation_cache(args.no_compilation_cache)
  from rissole_jax.errors import RissoleError
  try:
    prov = remake(args.name, args.workdir, args.out,
                  "python -m rissole_jax.pretrained.remake " + " ".join(argv or sys.argv[1:]))
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(prov))
  return 0


if __name__ == "__main__":
  sys.exit(main_cli())
