"""Reading the training stages' orbax checkpoints, verified: what the later
stages and sampling need, without the training code (optimizers, train
steps). Writing them (periodic saves, checksums after each, resuming past a
damaged step) is rissole_jax/train/checkpoints.py.

On disk a stage keeps STAGE/checkpoints/STEP/ (orbax, the whole train state
as one tree: e.g. {"step", "g_params", "d_params", "g_opt", "d_opt", "ema"}
for the VQ-GAN, {"step", "params", "ema", "opt"} for the denoiser), with a
`checksums.json` of every file written once the save completed. Restoring
checks those sums, restores (catching any orbax/tensorstore error) and checks
that every restored array is finite.

A reader that needs one part of the state (the generator, the EMA denoiser)
restores that subtree only (`only=`, an orbax partial restore): the other
parts are not read, so their structure (the optimizer state) need not be
known.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from rissole_jax import files
from rissole_jax.errors import DataError

CHECKSUMS = "checksums.json"
DAMAGED = "checkpoints_damaged"  # sibling of the checkpoints folder


class CheckpointError(DataError):
  """A checkpoint is damaged or missing."""


# ---------------------------------------------------------------------------
# Checksums.

def file_sums(step_dir: Path) -> dict:
  """{relative path: {bytes, sha256}} of every file in a step folder."""
  out = {}
  for p in sorted(Path(step_dir).rglob("*")):
    if p.is_file() and p.name != CHECKSUMS:
      out[str(p.relative_to(step_dir))] = {"bytes": p.stat().st_size,
                                           "sha256": files.sha256_file(p)}
  return out


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

def check_finite(tree, step_dir) -> None:
  if jax.process_count() > 1:  # arrays span processes; the checksums still apply
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
      if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
        raise CheckpointError(f"{step_dir} holds non-finite values in "
                              f"{jax.tree_util.keystr(path)}.")


def restore_step(mngr: ocp.CheckpointManager, step: int, target, only: str | None = None):
  """The checkpoint at `step` restored into `target` (abstract arrays, or None
  for the saved layout), verified: checksums, restore, finite values. With
  `only`, `target` is the abstract tree of that top-level key of the saved
  state and just that subtree is read and returned.
  Raises CheckpointError naming the step folder and the cause."""
  step_dir = Path(mngr.directory) / str(step)
  check_files(step_dir)
  try:
    if only is None:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    else:
      restored = _restore_only(mngr, step, only, target)
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types here; all mean "unreadable".
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointError(f"{step_dir} cannot be read "
                          f"({type(e).__name__}: {first[:300]})") from None
  check_finite(restored, step_dir)
  return restored


def _restore_only(mngr, step: int, key: str, like):
  """The subtree `key` of the saved state, restored into `like` (abstract
  arrays with shardings); nothing else is read."""
  target = {key: like}
  args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  restored = mngr.restore(step, args=args)[key]
  # A key the checkpoint lacks comes back as the abstract target itself.
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(restored)):
    raise CheckpointError(f"{Path(mngr.directory) / str(step)} holds no {key!r}: not a "
                          "checkpoint of this stage.")
  return restored


def restore_final(stage_dir: Path, stage: str, step: int | None, like=None,
                  missing_fix: str = "", only: str | None = None):
  """The checkpoint at `step` (None: the latest) of the training stage in
  `stage_dir`, verified, for downstream stages (`only`: one top-level key of
  it, `like` its abstract tree; see restore_step). Missing: CheckpointError
  with `missing_fix`. Damaged: the stage is marked unfinished (nothing is
  deleted) and the CheckpointError says how a rerun remakes it."""
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
    return restore_step(mngr, step, target, only)
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
