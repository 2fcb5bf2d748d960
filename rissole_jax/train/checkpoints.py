"""Orbax checkpointing: periodic, keeps the last N, restores exactly, and
never trusts a checkpoint it has not verified.

Orbax writes each step to a temporary folder and renames it when complete,
so an interrupted save never leaves a checkpoint that restores. Restoring
goes into the abstract (shape, dtype, sharding) target of a freshly built
state, so the arrays come back already laid out on the mesh.

Storage can still damage a finished checkpoint (a flipped byte, a lost file).
Once a save has completed, a `checksums.json` of every file in its folder is
written beside it; restoring checks those sums, then restores (catching any
orbax/tensorstore error) and checks that every restored array is finite. A
training stage skips a damaged step (it moves it to `checkpoints_damaged/`,
never deletes it) and resumes from the newest intact one; a downstream stage
stops with a `CheckpointError` that names the folder and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp

from rissole_jax.errors import DataError
from rissole_jax.files import atomic_write_json
from rissole_jax import files

CHECKSUMS = "checksums.json"
DAMAGED = "checkpoints_damaged"  # sibling of the checkpoints folder


class CheckpointError(DataError):
  """A checkpoint is damaged or missing."""


def manager(directory: Path, keep: int, every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                         create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


# ---------------------------------------------------------------------------
# Checksums.

def _file_sums(step_dir: Path) -> dict:
  out = {}
  for p in sorted(step_dir.rglob("*")):
    if p.is_file() and p.name != CHECKSUMS:
      out[str(p.relative_to(step_dir))] = {"bytes": p.stat().st_size, "sha256": files.sha256_file(p)}
  return out


def write_checksums(mngr: ocp.CheckpointManager) -> None:
  """Records the checksums of every finished step that has none yet. Call it
  only when no save is in progress (after wait_until_finished)."""
  if jax.process_index() != 0:
    return
  root = Path(mngr.directory)
  for step in mngr.all_steps():
    d = root / str(step)
    if d.is_dir() and not (d / CHECKSUMS).exists():
      atomic_write_json(d / CHECKSUMS, {"step": int(step), "files": _file_sums(d)})


def check_files(step_dir: Path) -> None:
  """Raises CheckpointError when a file differs from its recorded checksum or
  is missing. A step without checksums (the run was killed between the save
  and writing them) passes here: restoring it is its check."""
  path = Path(step_dir) / CHECKSUMS
  if not Path(step_dir).is_dir():
    raise CheckpointError(f"{step_dir} is missing.")
  if not path.exists():
    return
  try:
    recorded = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is damaged ({e}).") from None
  for name, want in recorded.items():
    p = Path(step_dir) / name
    if not p.is_file():
      raise CheckpointError(f"{p} is missing.")
    if p.stat().st_size != want["bytes"]:
      raise CheckpointError(f"{p} is truncated or changed ({p.stat().st_size} bytes, "
                            f"{want['bytes']} when saved).")
    if files.sha256_file(p) != want["sha256"]:
      raise CheckpointError(f"{p} is damaged: its checksum differs from the one recorded "
                            "when it was saved.")


# ---------------------------------------------------------------------------
# Verified restoring.

def _check_finite(tree, step_dir) -> None:
  if jax.process_count() > 1:  # arrays span processes; the checksums still apply
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
      if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
        raise CheckpointError(f"{step_dir} holds non-finite values in "
                              f"{jax.tree_util.keystr(path)}.")


def restore_step(mngr: ocp.CheckpointManager, step: int, target):
  """The checkpoint at `step` restored into `target` (abstract arrays, or None
  for the saved layout), verified: checksums, restore, finite values.
  Raises CheckpointError naming the step folder and the cause."""
  step_dir = Path(mngr.directory) / str(step)
  check_files(step_dir)
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax/tensorstore raise many types here; all mean "unreadable".
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointError(f"{step_dir} cannot be read ({type(e).__name__}: {first[:300]})") from None
  _check_finite(restored, step_dir)
  return restored


def quarantine(mngr: ocp.CheckpointManager, step: int) -> Path:
  """Moves a damaged step folder out of orbax's sight (to checkpoints_damaged/
  beside it), so that training can save that step again; nothing is deleted."""
  src = Path(mngr.directory) / str(step)
  dst_root = Path(mngr.directory).parent / DAMAGED
  dst = dst_root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    dst_root.mkdir(parents=True, exist_ok=True)
    n = 1
    while dst.exists():
      dst, n = dst_root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{n}", n + 1
    os.replace(src, dst)
  from rissole_jax.runtime import parallel
  parallel.sync(f"quarantine-{mngr.directory}-{step}")
  mngr.reload()
  return dst


def restore_latest(mngr: ocp.CheckpointManager, state, log: Callable[..., None] | None = None):
  """(state, step): the newest intact checkpoint restored into `state`'s
  layout, or `state` itself and step 0 if there is none. Damaged steps are
  reported through `log` and moved to checkpoints_damaged/."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  say = log or (lambda *a: None)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore_step(mngr, step, abstract), step
    except CheckpointError as e:
      moved = quarantine(mngr, step)
      older = [s for s in mngr.all_steps() if s < step]
      say("checkpoint step %d is damaged: %s. Moved it to %s; %s.", step, e, moved,
          f"resuming from step {max(older)}" if older else "no older checkpoint: starting over")
  return state, 0


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  """Saves `state` at `step` (asynchronously); first records the checksums of
  the steps finished since the last save."""
  mngr.wait_until_finished()  # the previous save: it had a whole interval to finish
  write_checksums(mngr)
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_final(stage_dir: Path, stage: str, step: int | None, like=None,
                  missing_fix: str = ""):
  """The checkpoint at `step` (None: the latest) of the training stage in
  `stage_dir`, verified, for downstream stages. Missing: CheckpointError with
  `missing_fix`. Damaged: the stage is marked unfinished (nothing is deleted)
  and the CheckpointError says how a rerun remakes it."""
  stage_dir = Path(stage_dir)
  directory = stage_dir / "checkpoints"
  found, mngr = [], None
  if directory.is_dir():
    mngr = ocp.CheckpointManager(directory.absolute())
    found = sorted(mngr.all_steps())
  if not found or (step is not None and step not in found):
    if mngr is not None:
      mngr.close()
    want = f"step {step} ({stage}.train.steps)" if step is not None else "a checkpoint"
    raise CheckpointError(f"No finished {stage} checkpoint in {directory}: need {want}, "
                          f"found {found or 'none'}. {missing_fix}")
  step = found[-1] if step is None else step
  target = (jax.tree.map(ocp.utils.to_shape_dtype_struct, like) if like is not None else None)
  try:
    return restore_step(mngr, step, target)
  except CheckpointError as e:
    raise CheckpointError(f"The final {stage} checkpoint is damaged: {e}\n"
                          + remake_fix(stage_dir, stage)) from None
  finally:
    mngr.close()


def restore_params(directory: Path, like=None):
  """The latest checkpoint under `directory`, verified, as saved (or into `like`)."""
  return restore_final(Path(directory).parent, Path(directory).parent.name, None, like)


def remake_fix(stage_dir: Path, stage: str) -> str:
  """Marks the training stage in `stage_dir` unfinished and says how to remake it."""
  from rissole_jax.stages import workdir as wd
  if jax.process_index() == 0:
    wd.mark_unfinished(stage_dir)
  return (f"The {stage} stage in {stage_dir} is now marked unfinished. Fix: rerun the "
          f"pipeline (python -m rissole_jax.main --config <your config> --workdir "
          f"{stage_dir.parent}, with --only {stage},... if you use --only): the {stage} stage "
          f"moves the damaged step to {stage_dir / DAMAGED}, resumes from its newest intact "
          "checkpoint (or from the start) and remakes the same result; then the later stages run.")


def abandon(mngr: ocp.CheckpointManager) -> None:
  """On an error mid-training (e.g. a NaN): the pending save holds a good
  state, so it is finished and checksummed, not lost; then the manager closes."""
  try:
    mngr.wait_until_finished()
    write_checksums(mngr)
  finally:
    mngr.close()


def finish(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves the final `state` at `step` (whatever the save interval says),
  waits for every pending write, records checksums and closes the manager."""
  if mngr.latest_step() != step:
    save(mngr, step, state, force=True)
  mngr.wait_until_finished()
  write_checksums(mngr)
  mngr.close()
