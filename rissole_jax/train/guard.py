"""Non-finite losses: found without a per-step host sync, never checkpointed.

Inside the jitted step, `finite_step` computes one flag per step (loss,
gradient norms and the updated parameters all finite) and, under
nan_policy="skip_step", keeps the old state where the flag is false (the
update is dropped: parameters, optimizer moments, EMA, codebook alike). The
host reads the flags only where it fetches metrics anyway (log steps) and
before every checkpoint save, so a broken state is never saved:

  stop       the first non-finite step stops the stage with NonFiniteError
  skip_step  skipped steps are counted; max_skipped_steps in a row stop it
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.errors import ConfigError, RissoleError, check_choice

POLICIES = ("stop", "skip_step")
FLAG = "finite"  # the per-step metric: 1.0 when the step's values were finite


class NonFiniteError(RissoleError):
  """The loss or gradients became NaN or infinite."""


def check_config(train_cfg, section: str) -> None:
  check_choice(f"{section}.nan_policy", train_cfg.nan_policy, POLICIES)
  if train_cfg.max_skipped_steps < 1:
    raise ConfigError(f"{section}.max_skipped_steps={train_cfg.max_skipped_steps} must be at least 1.")


def all_finite(*trees) -> jax.Array:
  """One boolean: every inexact leaf of every tree is finite."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def finite_step(policy: str, old, new, metrics: dict, *checked):
  """(state, metrics) of one step: `metrics` gains the FLAG; with skip_step
  the old state is kept (its step counter still advances, so the batch and
  the randomness move on) where any of `checked` is not finite."""
  ok = all_finite(*checked)
  if policy == "skip_step":
    counter = new["step"]
    # One conditional over the whole state, not a select per leaf: XLA:CPU
    # took minutes to compile the selects (fused into the backward pass); the
    # branches only pass values through, so they cost nothing at run time.
    new = jax.lax.cond(ok, lambda n, o: n, lambda n, o: o, new, old)
    new = {**new, "step": counter}
  return new, {**metrics, FLAG: ok.astype(jnp.float32)}


def mean_finite(window: list[dict]) -> dict:
  """The mean of each metric over the window's finite steps (all NaN if none),
  plus skipped_steps: how many were not finite. An entry holds one step's
  scalars, or several steps' (n,) arrays (several steps per jitted call)."""
  steps = lambda n: np.concatenate([np.atleast_1d(np.asarray(m[n], np.float64)) for m in window])
  flags = steps(FLAG) > 0
  out = {}
  for n in window[0]:
    if n == FLAG:
      continue
    vals = steps(n)
    out[n] = float(np.mean(vals[flags])) if flags.any() else float("nan")
  out["skipped_steps"] = float(np.sum(~flags))
  return out


class Guard:
  """Host side: reads the flags of the steps since the last look, at most once
  per step, and stops the stage when the policy says so."""

  def __init__(self, stage: str, train_cfg, hints: dict, ckpt_dir):
    self.stage, self.policy = stage, train_cfg.nan_policy
    self.max_skipped, self.hints, self.ckpt_dir = train_cfg.max_skipped_steps, hints, ckpt_dir
    self.skipped = self.in_a_row = 0
    self._pending: list[tuple[int, dict]] = []  # (step number after the update, metrics)

  def add(self, step: int, metrics: dict) -> None:
    """The metrics of the step that ended at `step`, or of the n steps up to
    `step` as (n,) arrays (several steps per jitted call)."""
    self._pending.append((step, metrics))

  def check(self, last_good: int | None) -> None:
    """Looks at the pending steps (one host sync); raises NonFiniteError."""
    for step, m in self._each_step():
      if float(m[FLAG]) > 0:
        self.in_a_row = 0
        continue
      self.skipped += 1
      self.in_a_row += 1
      if self.policy == "stop" or self.in_a_row >= self.max_skipped:
        self._pending = []
        raise NonFiniteError(self._message(step, m, last_good))
    self._pending = []

  def _each_step(self):
    for last, m in self._pending:
      host = {n: np.atleast_1d(np.asarray(v)) for n, v in m.items()}
      count = len(host[FLAG])
      for j in range(count):
        yield last - count + 1 + j, {n: v[j] for n, v in host.items()}

  def _message(self, step: int, m: dict, last_good: int | None) -> str:
    values = ", ".join(f"{n}={float(v):.4g}" for n, v in m.items() if n != FLAG)
    if self.policy == "stop":
      what = f"{self.stage}: a non-finite value at step {step} ({values})."
      other = f"set {self.stage}.train.nan_policy=skip_step to drop such steps"
    else:
      what = (f"{self.stage}: {self.in_a_row} steps in a row were non-finite and skipped, "
              f"up to step {step} ({values}); {self.skipped} skipped in all.")
      other = f"raise {self.stage}.train.max_skipped_steps (now {self.max_skipped})"
    good = (f"{self.ckpt_dir}/{last_good}" if last_good else "none yet (no checkpoint was saved)")
    hints = ", ".join(f"{k}={v}" for k, v in self.hints.items())
    return (f"{what}\nThis state was not saved. Last good checkpoint: {good}.\n"
            f"Settings most likely at fault: {hints}.\n"
            f"Fix: lower the learning rate (or raise the warm-up, or clip gradients harder), "
            f"or {other}; a rerun with the same settings resumes from the last good "
            "checkpoint and is likely to diverge again.")

