"""The workdir: one folder per stage, each with a record of the config that
made it, its final metrics, a human-readable log and TensorBoard events.

A stage is skipped when its record says it finished with the same config
fingerprint (its own config sections plus its upstream stages' fingerprints);
a stage made with a different config is refused unless the caller overwrites.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import ml_collections as mlc

from rissole_jax.errors import DataError, WorkdirMismatch
from rissole_jax.files import atomic_write_json, read_json


def config_sections(config: mlc.ConfigDict, keys) -> dict:
  out = {}
  for k in keys:
    v = config.get(k)
    out[k] = v.to_dict() if isinstance(v, mlc.ConfigDict) else v
  return _without_inert(json.loads(json.dumps(out, sort_keys=True, default=str)))


# Keys that change nothing at these values (the behaviour before each key
# existed): left out of fingerprints, so older workdirs keep theirs.
INERT = {
    "model.lego.neighbours": "channels",      # LEGO: neighbours as input channels
    "model.block_map": "fold",                # blocks folded into the batch
    "sample.guidance_interval": [0.0, 1.0],   # guidance (if any) at every step
    "model.share_weights": True,
    "model.dtype": "float32",
    "diffusion.train.steps_per_call": 1,
    "diffusion.train.unroll_steps": False,
    "retrieval.reduce": "auto",               # the reduced embedding by size
    "retrieval.reduce_dim": 256,
    "retrieval.reduce_above_mb": 4096,
}


LOADER_KEYS = ("workers", "prefetch", "cache")


def _without_inert(sections: dict) -> dict:
  """Leaves out keys that change nothing at their values, so that workdirs made
  before the keys existed keep their fingerprints: INERT, the U-Net's keys at
  their first layout's values (defaults.LEGACY_MODEL), the LEGO settings of a
  U-Net model and the U-Net's layout knobs (LEGACY_MODEL's keys) of a LEGO
  model, whatever their values, LEGO brick skipping over no part of the trajectory, the
  encode shard size (the files' layout, not their content) and the loader's
  knobs (LOADER_KEYS: how fast the input is read, never what)."""
  from rissole_jax.defaults import LEGACY_MODEL
  m = sections.get("model")
  if isinstance(m, dict) and m.get("backbone", "unet") == "unet":
    m.pop("backbone", None)
    m.pop("lego", None)
  elif isinstance(m, dict):
    for k in LEGACY_MODEL:
      m.pop(k, None)
  e = sections.get("encode")
  if isinstance(e, dict):
    e.pop("shard_rows", None)
  d = sections.get("data")
  if isinstance(d, dict):  # how fast the input is read, never what (data/loader.py)
    for k in LOADER_KEYS:
      d.pop(k, None)
  legacy = {f"model.{k}": v for k, v in LEGACY_MODEL.items()}
  for dotted, value in {**INERT, **legacy}.items():
    *path, key = dotted.split(".")
    d = sections
    for part in path:
      d = d.get(part) if isinstance(d, dict) else None
    if isinstance(d, dict) and key in d and d[key] == value:
      d.pop(key)
  s = sections.get("sample")
  if isinstance(s, dict) and isinstance(s.get("skip"), dict) and not s["skip"].get("t_break"):
    s.pop("skip")
  return sections


def fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict, b: dict, prefix="") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


@dataclasses.dataclass
class StageRecord:
  """What one stage's `stage.json` holds."""
  name: str
  directory: Path
  fingerprint: str
  config: dict

  @property
  def path(self) -> Path:
    return self.directory / "stage.json"

  def load(self) -> dict | None:
    try:
      rec = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, UnicodeDecodeError) as e:
      rec = e
    if not isinstance(rec, dict):
      raise DataError(
          f"{self.path} is damaged ({rec}). Fix: delete it to redo the {self.name} stage "
          "(a training stage resumes from its checkpoints, if they were made with the same "
          "config), or pass --overwrite to redo it and the stages after it from scratch.")
    return rec

  def is_done(self) -> bool:
    rec = self.load()
    if not (rec and rec.get("done") and rec.get("fingerprint") == self.fingerprint):
      return False
    try:  # a finished stage whose metrics were lost or damaged is simply redone
      read_metrics(self.directory)
    except DataError:
      return False
    return True

  def check(self, overwrite: bool) -> None:
    """Refuses (or, with overwrite, clears) a stage made with another config."""
    try:
      rec = self.load()
    except DataError:
      if not overwrite:
        raise
      rec = {}
    if rec is None or rec.get("fingerprint") == self.fingerprint:
      return
    if overwrite:
      shutil.rmtree(self.directory)
      return
    changes = _diff(rec.get("config", {}), self.config) or ["(an upstream stage changed)"]
    raise WorkdirMismatch(
        f"{self.directory} was made with a different config:\n  " + "\n  ".join(changes[:20])
        + "\nFix: use another --workdir, or pass --overwrite to redo this stage and the ones after it.")

  def start(self) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    rec = self.load() or {}
    atomic_write_json(self.path, {"name": self.name, "fingerprint": self.fingerprint,
                                  "config": self.config, "done": False,
                                  "attempts": rec.get("attempts", 0) + 1})

  def finish(self, metrics: dict, seconds: float) -> None:
    atomic_write_json(self.directory / "metrics.json", flat_numbers(metrics))
    rec = self.load() or {}
    rec.update(done=True, seconds=seconds)
    atomic_write_json(self.path, rec)


def mark_unfinished(stage_dir: Path) -> None:
  """Marks a stage as not done (its outputs are kept), so that the next run
  redoes it: for a finished stage whose output turned out damaged."""
  path = Path(stage_dir) / "stage.json"
  rec = read_json(path, missing_ok=True)
  if rec and rec.get("done"):
    rec["done"] = False
    atomic_write_json(path, rec)


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
  """A flat {name: number} dict (nested dicts are joined with '/')."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      out.update(flat_numbers(v, f"{prefix}{k}/"))
    elif v is not None and not isinstance(v, str):
      out[f"{prefix}{k}"] = float(v) if not isinstance(v, bool) else bool(v)
  return out


def read_metrics(stage_dir: Path) -> dict:
  return read_json(Path(stage_dir) / "metrics.json")


def file_logger(name: str, path: Path, to_console: bool = True,
                to_file: bool = True) -> logging.Logger:
  """A logger writing to `path` (and the console) with timestamps. Processes
  other than the main one pass to_file=False: one log.txt, one writer."""
  logger = logging.getLogger(f"rissole.{name}")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
    h.close()
  fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
  if to_file:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    logger.addHandler(fh)
  else:
    logger.addHandler(logging.NullHandler())
  if to_console:
    sh = logging.StreamHandler()
    sh.setFormatter(fmt)
    logger.addHandler(sh)
  return logger
