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
stops with a `CheckpointError` that names the folder and the fix. The
verified reading is rissole_jax/store/checkpoints.py (re-exported here).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp

from rissole_jax.files import atomic_write_json
# The reading side (verified restores, for the later stages and sampling too).
from rissole_jax.store.checkpoints import (CHECKSUMS, DAMAGED, CheckpointError,  # noqa: F401
                                           check_files, file_sums, remake_fix, restore_final,
                                           restore_params, restore_step)


def manager(directory: Path, keep: int, every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                         create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


# ---------------------------------------------------------------------------
# Checksums.

def write_checksums(mngr: ocp.CheckpointManager) -> None:
  """Records the checksums of every finished step that has none yet. Call it
  only when no save is in progress (after wait_until_finished)."""
  if jax.process_index() != 0:
    return
  root = Path(mngr.directory)
  for step in mngr.all_steps():
    d = root / str(step)
    if d.is_dir() and not (d / CHECKSUMS).exists():
      atomic_write_json(d / CHECKSUMS, {"step": int(step), "files": file_sums(d)})


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
