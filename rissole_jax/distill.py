"""Distils a trained model's denoiser to few sampling steps (progressive
distillation; rissole_jax/train/distill.py, stage rissole_jax/stages/distill.py).

  python -m rissole_jax.distill --workdir W [--config FILE[:variant]]
      [--set distill.train.steps=600 ...] [--overwrite]

The model is the one in W (its config read back from W unless --config is
given). Each round halves the steps, distill.teacher_steps -> ... ->
distill.min_steps, and writes its student to W/distill/; an interrupted run
resumes where it stopped. Then sample with the student:

  Sampler.from_workdir(W).sample(64, sampler="distilled", steps=4)
  python -m rissole_jax.sample --workdir W --sampler distilled --steps 4 --out OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rissole_jax.distill", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a finished run's folder (diffusion done)")
  p.add_argument("--config", help="the config file it was made with (default: read back "
                                  "from the workdir)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override, e.g. distill.train.steps=600 (repeatable)")
  p.add_argument("--overwrite", action="store_true",
                 help="redo a distill stage made with other distill settings")
  p.add_argument("--no_progress", action="store_true", help="hide progress bars")
  from rissole_jax.runtime import cache
  cache.add_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  from rissole_jax.runtime import cache
  cache.enable_compilation_cache(args.no_compilation_cache)
  from rissole_jax import main as pipeline
  from rissole_jax.errors import RissoleError
  from rissole_jax.inference.configs import apply_overrides, load_config
  from rissole_jax.stages import distill_stages
  try:
    config = apply_overrides(load_config(args.workdir, args.config), args.set)
    with config.unlocked():
      config.stages = distill_stages(config)
    pipeline.run(config, Path(args.workdir), args.overwrite, ("distill",),
                 progress=not args.no_progress)
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from rissole_jax.inference.loading import read_students_index
  from rissole_jax.stages import workdir as wd
  m = wd.read_metrics(Path(args.workdir) / "distill")
  steps = sorted((int(n) for n in read_students_index(Path(args.workdir) / "distill")), reverse=True)
  print(f"distilled students in {args.workdir}/distill: {steps} steps"
        + (f"; cost {m['cost_vs_teacher_training']:.2f}x the teacher's training"
           if "cost_vs_teacher_training" in m else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
