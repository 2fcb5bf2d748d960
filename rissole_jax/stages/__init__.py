"""The pipeline: each stage is stages/<name>.py with run(ctx) -> metrics, run in
order by main.run over a workdir (stages/workdir.py) in a Context
(stages/context.py); the training machinery they use is in train/.

This module is the registry: which stages exist, which config sections each
reads, and their chained fingerprints. It imports no stage, so reading a
workdir's config (inference) does not load training code."""
from __future__ import annotations

from pathlib import Path

from rissole_jax.errors import check_choice
from rissole_jax.stages import workdir as wd

# name -> (module with `run(ctx) -> metrics`, config sections it reads, or a
# function of the config giving them).
# Each stage's fingerprint also covers its upstream stages (the ones before it).
STAGES = {
    "vqgan": ("rissole_jax.stages.vqgan", ("seed", "data", "vqgan")),
    "encode": ("rissole_jax.stages.encode", ("encode",)),
    # The first-block embedding depends on the grid; the full one does not.
    "index": ("rissole_jax.stages.index",
              lambda c: ("retrieval", "blocks") if c.retrieval.embedding == "first_block"
              else ("retrieval",)),
    "diffusion": ("rissole_jax.stages.diffusion", ("blocks", "model", "diffusion")),
    "sample": ("rissole_jax.stages.sample", ("sample",)),
    "evaluate": ("rissole_jax.stages.evaluate", ("evaluate",)),
}


def stage_records(config, root: Path) -> list[wd.StageRecord]:
  """One record per configured stage, fingerprints chained through upstream ones."""
  for s in config.stages:
    check_choice("stage", s, STAGES, ValueError, hint="(in config.stages)")
  records, upstream = [], ""
  for name in config.stages:
    keys = STAGES[name][1]
    sections = wd.config_sections(config, keys(config) if callable(keys) else keys)
    fp = wd.fingerprint({"stage": name, "config": sections, "upstream": upstream})
    records.append(wd.StageRecord(name, root / name, fp, sections))
    upstream = fp
  return records
