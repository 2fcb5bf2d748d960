"""The config of a trained model: read back from a workdir's stage records
(`workdir_config`), or from a config file (`config_file`, as main's --config
takes it); `load_config` is the one loader the CLIs and benchmarks call."""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

from rissole_jax.errors import ConfigError, DataError


def config_file(spec: str, overrides=()):
  """FILE[:ARG] -> the ConfigDict its get_config(ARG) returns, with KEY=VALUE
  overrides (dotted keys; values as Python literals, else strings)."""
  path, _, arg = str(spec).partition(":")
  if not Path(path).is_file():
    raise ConfigError(f"--config {path}: no such config file.")
  mod_spec = importlib.util.spec_from_file_location("rissole_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return apply_overrides(mod.get_config(arg), overrides)


def apply_overrides(config, overrides=()):
  """KEY=VALUE overrides (dotted keys; values as Python literals, else
  strings) set into `config`, which is returned."""
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, last = key.strip().split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value
  return config


def workdir_config(root):
  """The config a workdir was made with: the defaults, overridden by every
  stage record's config sections (each stage records the sections it reads)."""
  from rissole_jax import defaults
  from rissole_jax.stages import STAGES
  root = Path(root)
  first = root / "vqgan" / "stage.json"
  if not root.is_dir():
    raise DataError(f"{root} is not a folder. Fix: pass the --workdir of a finished run.")
  if not first.exists():
    raise DataError(f"{root} has no finished 'vqgan' stage ({first} is missing): it is not a "
                    "rissole_jax workdir, or nothing has run there yet. Fix: "
                    f"python -m rissole_jax.main --config CONFIG --workdir {root}")
  config = defaults.recorded_base()   # a model key a record lacks: its first value
  for name in STAGES:
    path = root / name / "stage.json"
    if path.exists():
      try:
        sections = json.loads(path.read_text())["config"]
      except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is damaged ({e}). Fix: re-run that stage with --overwrite, "
                        f"or restore the file.") from e
      merge_config(config, sections)
  return config


def load_config(workdir=None, spec: str | None = None):
  """The config file `spec` where given, else the config `workdir` was made with."""
  if spec:
    return config_file(spec)
  if workdir is None:
    raise ConfigError("no config: pass --config FILE or the --workdir of a finished run.")
  return workdir_config(workdir)


def merge_config(config, values: dict) -> None:
  """Sets `values` (nested dicts, as JSON gives them: lists for tuples) into an
  ml_collections config, in place; keys the defaults lack are added."""
  import ml_collections as mlc
  with config.unlocked():
    for k, v in values.items():
      if isinstance(v, dict) and isinstance(config.get(k), mlc.ConfigDict):
        merge_config(config[k], v)
      else:
        config[k] = _tuples(v)


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v
