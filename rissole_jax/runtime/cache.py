"""The user cache directory, and JAX's persistent compilation cache in it.

One place knows where the user cache is: $RISSOLE_CACHE, else
~/.cache/rissole_jax. It holds databases encoded for sampling, evaluation
classifiers and reference statistics, and (for the command-line tools) XLA's
compiled programs under `jax/`, so that a second run of the same config skips
most compiling (measured in docs/performance.md).

The CLIs (`python -m rissole_jax.main`, `rissole_jax.sample`,
`rissole_jax.export`) turn the compilation cache on; a user's own
JAX_COMPILATION_CACHE_DIR is left alone (JAX reads it), and
RISSOLE_NO_COMPILATION_CACHE=1 (or the CLIs' --no_compilation_cache) turns it off.
"""
from __future__ import annotations

import os
from pathlib import Path

OFF_ENV = "RISSOLE_NO_COMPILATION_CACHE"
# Programs that compile faster than this are not written (JAX's default is 1 s;
# the diffusion and VQ-GAN steps take tens of seconds on a CPU, the many small
# programs of sampling and evaluation a fraction of a second each).
MIN_COMPILE_SECONDS = 0.5


def user_cache_dir(configured: str | None = None) -> Path:
  """`configured` (a config's cache_dir), else $RISSOLE_CACHE, else ~/.cache/rissole_jax."""
  return Path(os.path.expanduser(configured or os.environ.get("RISSOLE_CACHE")
                                 or "~/.cache/rissole_jax"))


def enable_compilation_cache(disabled: bool = False) -> Path | None:
  """Turns on JAX's persistent compilation cache in user_cache_dir()/jax, before
  any compile; returns the folder in use (None when off). A user's
  JAX_COMPILATION_CACHE_DIR wins (returned, not changed); `disabled` or
  $RISSOLE_NO_COMPILATION_CACHE (not "" or "0") turn it off."""
  import jax
  if disabled or os.environ.get(OFF_ENV, "") not in ("", "0"):
    return None
  own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if own:
    return Path(own)
  directory = user_cache_dir() / "jax"
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory


def add_flag(parser) -> None:
  """The argparse CLIs' switch for the cache (main.py has its absl flag)."""
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help="do not keep compiled programs in ~/.cache/rissole_jax/jax")
