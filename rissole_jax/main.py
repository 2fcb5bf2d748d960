"""The one entry point: runs the configured stages in order.

  python -m rissole_jax.main --config configs/mnist.py[:variant] --workdir DIR \
      [--config.some.key=value ...] [--overwrite] [--only STAGE,...]

Stages whose outputs exist and match the config are skipped; an interrupted
stage resumes from its last checkpoint; a workdir made with another config is
refused unless --overwrite is given.
"""
from __future__ import annotations

import errno
import importlib
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rissole_jax.stages import workdir as wd
from rissole_jax.stages import STAGES, stage_records
from rissole_jax.stages.context import Context
from rissole_jax.errors import RissoleError

FLAGS = flags.FLAGS

# OSErrors that mean "the storage refused" (full, over quota, read-only, no
# permission, failing): reported as such, without a traceback.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def define_flags() -> None:
  """The CLI's flags (defined on demand, so other CLIs can import this module)."""
  config_flags.DEFINE_config_file("config", None, "Config file [:variant].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder.")
  flags.DEFINE_bool("overwrite", False, "Redo stages made with another config.")
  flags.DEFINE_list("only", [], "Run only these stages (their inputs must exist).")
  flags.DEFINE_bool("no_progress", False, "Hide progress bars.")
  flags.DEFINE_bool("no_compilation_cache", False,
                    "Do not keep compiled programs in ~/.cache/rissole_jax/jax ($RISSOLE_CACHE; "
                    "JAX_COMPILATION_CACHE_DIR, when set, is used instead).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")


def check_config(config) -> None:
  """Refuses an inconsistent config (e.g. a block grid that does not divide the
  latent) before any stage does work."""
  if "diffusion" in config.stages or "sample" in config.stages:
    from rissole_jax.train import diffusion
    diffusion.check_config(config, diffusion.expected_latent_shape(config))
  if "distill" in config.stages:
    from rissole_jax.train import distill
    distill.check_config(config)


def run(config, root: Path, overwrite: bool = False, only=(), progress: bool = True) -> dict:
  """Runs the stages; returns {stage: metrics}. Importable, for tests and notebooks."""
  from rissole_jax.runtime import parallel
  pidx, pcount = parallel.process_info()
  root = Path(root)
  check_config(config)
  records = stage_records(config, root)
  for rec in records:  # refuse a mismatched workdir before doing any work
    if not only or rec.name in only:
      # With --overwrite a mismatched stage is cleared; the fingerprints chain,
      # so every stage after it is redone too.
      rec.check(overwrite) if pidx == 0 else None
  parallel.sync("checked-workdir")
  results = {}
  for rec in records:
    if only and rec.name not in only:
      continue
    logger = wd.file_logger(rec.name, rec.directory / "log.txt", to_console=pidx == 0,
                            to_file=pidx == 0)
    if rec.is_done():
      logger.info("skipped: finished earlier with the same config (%s)", rec.directory)
      results[rec.name] = wd.read_metrics(rec.directory)
      continue
    if pidx == 0:
      rec.start()
    parallel.sync(f"start-{rec.name}")
    ctx = Context(config=config, root=root, stage=rec.name, logger=logger,
                  process_index=pidx, process_count=pcount, progress_bars=progress)
    module = importlib.import_module(STAGES[rec.name][0])
    t0 = time.time()
    logger.info("starting")
    metrics = module.run(ctx)
    seconds = time.time() - t0
    metrics = {**metrics, "seconds": seconds}
    if pidx == 0:
      rec.finish(metrics, seconds)
    parallel.sync(f"finish-{rec.name}")
    logger.info("finished in %.1fs: %s", seconds,
                ", ".join(f"{k}={v:.4g}" for k, v in wd.flat_numbers(metrics).items()))
    results[rec.name] = wd.flat_numbers(metrics)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("Both --config and --workdir are required.")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds chatter; our log is per stage
  from rissole_jax.runtime import cache
  cache.enable_compilation_cache(FLAGS.no_compilation_cache)   # before anything compiles
  from rissole_jax.runtime import parallel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  try:
    run(FLAGS.config, Path(FLAGS.workdir), FLAGS.overwrite, tuple(FLAGS.only),
        progress=not FLAGS.no_progress)
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    if e.errno not in STORAGE_ERRORS:
      raise
    # The machine, not the program: every artifact is written atomically, so
    # nothing half-written was left behind to load.
    print(f"error: {e.strerror or e} ({e.filename or 'a file in ' + str(FLAGS.workdir)}).\n"
          "Fix: free space or fix the permissions of the workdir, then rerun the same command: "
          "finished stages are kept and an interrupted one resumes from its last checkpoint.",
          file=sys.stderr)
    sys.exit(2)


def run_cli():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
