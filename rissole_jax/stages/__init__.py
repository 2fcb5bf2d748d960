"""The pipeline: each stage is stages/<name>.py with run(ctx) -> metrics, run in
order by main.run over a workdir (stages/workdir.py) in a Context
(stages/context.py); the training machinery they use is in train/.

This module is the registry: which stages exist, which config sections each
reads, and their chained fingerprints. It imports no stage, so reading a
workdir's config (inference) does not load training code."""
from __future__ import annotations

from pathlib import Path

from rissole_jax.errors import ConfigError, check_choice
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
    # Not in the default main job (python -m rissole_jax.distill runs it); when
    # listed, it comes right after diffusion, so its fingerprint is the same
    # wherever it is computed from (distill_record).
    "distill": ("rissole_jax.stages.distill", ("distill",)),
    "sample": ("rissole_jax.stages.sample", ("sample",)),
    "evaluate": ("rissole_jax.stages.evaluate", ("evaluate",)),
}


def stage_records(config, root: Path, names=None) -> list[wd.StageRecord]:
  """One record per configured stage (or per stage in `names`), fingerprints
  chained through upstream ones."""
  names = tuple(config.stages if names is None else names)
  for s in names:
    check_choice("stage", s, STAGES, ValueError, hint="(in config.stages)")
  i = names.index("distill") if "distill" in names else None
  if i is not None and (i == 0 or names[i - 1] != "diffusion"):
    raise ConfigError(f"config.stages={names}: 'distill' must come right after 'diffusion'.")
  records, upstream = [], ""
  for name in names:
    keys = STAGES[name][1]
    sections = wd.config_sections(config, keys(config) if callable(keys) else keys)
    fp = wd.fingerprint({"stage": name, "config": sections, "upstream": upstream})
    records.append(wd.StageRecord(name, root / name, fp, sections))
    upstream = fp
  return records


def distill_stages(config) -> tuple[str, ...]:
  """The configured stages up to diffusion, then distill: the pipeline that
  makes (and fingerprints) the distilled students."""
  names = tuple(config.stages)
  if "diffusion" not in names:
    raise ConfigError(f"config.stages={names} has no 'diffusion' stage to distill.")
  return names[:names.index("diffusion") + 1] + ("distill",)


def distill_record(config, root: Path) -> wd.StageRecord:
  """The distill stage's record, whether or not config.stages lists it."""
  return stage_records(config, root, distill_stages(config))[-1]
