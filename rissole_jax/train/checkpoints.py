"""Orbax checkpointing: periodic, keeps the last N, restores exactly.

Orbax writes each step to a temporary folder and renames it when complete,
so an interrupted save never leaves a checkpoint that restores. Restoring
goes into the abstract (shape, dtype, sharding) target of a freshly built
state, so the arrays come back already laid out on the mesh.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


def manager(directory: Path, keep: int, every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                         create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def restore_latest(mngr: ocp.CheckpointManager, state):
  """(state, step): the latest checkpoint restored into `state`'s layout, or
  `state` itself and step 0 if there is none."""
  step = mngr.latest_step()
  if step is None:
    return state, 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  return restored, step


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_params(directory: Path, like=None):
  """The latest checkpoint under `directory` (for downstream stages), as saved."""
  mngr = ocp.CheckpointManager(Path(directory).absolute())
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {directory}")
  args = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
                                  if like is not None else None)
  out = mngr.restore(step, args=args)
  mngr.close()
  return out


def finish(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves the final `state` at `step` (whatever the save interval says),
  waits for every pending write, and closes the manager."""
  if mngr.latest_step() != step:
    save(mngr, step, state, force=True)
  mngr.wait_until_finished()
  mngr.close()
