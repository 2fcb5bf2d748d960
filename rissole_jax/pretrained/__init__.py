"""Models shipped inside the package, made by the project's own pipeline.

  from rissole_jax import Sampler
  s = Sampler.pretrained("mnist")          # or: python -m rissole_jax.sample --model mnist ...

"mnist" is the default main job's model (`defaults.base_config()`, i.e.
configs/mnist.py, on the embedded 5,000 digits), stored with int8 kernels
(model file format 2: a quarter of the float bytes, read back as float32).
Its manifest says where it came from (`Sampler.pretrained("mnist").manifest
["provenance"]`: commit, command, the float model's metrics and the int8
file's difference from them); docs/pretrained.md shows them. REMAKE remakes
it; tests/test_pretrained.py fails with that command when the shipped file
falls out of step with the code (its format or the default config's model
fingerprint).
"""
from __future__ import annotations

from pathlib import Path

from rissole_jax.errors import ConfigError, DataError

# name -> (file inside this package, the config it is made from, as a
# `rissole_jax.defaults` function name)
MODELS = {"mnist": ("mnist.rissole", "base_config")}
REMAKE = "python -m rissole_jax.pretrained.remake {name} --workdir runs/pretrained_{name}"


def remake_command(name: str) -> str:
  return REMAKE.format(name=name)


def check_name(name: str) -> None:
  if name not in MODELS:
    raise ConfigError(f"no pretrained model {name!r}; shipped: {', '.join(MODELS)}. "
                      "Fix: use one of those, or load your own with Sampler.load(FILE).")


def path(name: str) -> Path:
  """The shipped model file of `name`, or an error naming the choices and the fix."""
  check_name(name)
  p = Path(__file__).with_name(MODELS[name][0])
  if not p.is_file():
    raise DataError(f"the pretrained model {name!r} is not installed ({p} is missing: the "
                    "package was installed without its data files, or the file was removed). "
                    f"Fix: reinstall rissole_jax (pip install .), or remake it: "
                    f"{remake_command(name)}")
  return p


def config(name: str):
  """The config `name` is made from."""
  from rissole_jax import defaults
  check_name(name)
  return getattr(defaults, MODELS[name][1])()
