"""Optimizers from a config's `train` section (optax schedules)."""
from __future__ import annotations

import optax

from rissole_jax.errors import check_choice


def learning_rate(lr: float, warmup_steps: int, total_steps: int, schedule: str):
  warmup = max(warmup_steps, 1)
  if schedule == "constant":
    return optax.warmup_constant_schedule(0.0, lr, warmup)
  if schedule == "cosine":  # decays to lr/10 at total_steps (at least one step after warm-up)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * 0.1)
  check_choice("learning-rate schedule", schedule, ("cosine", "constant"), ValueError)


def adam(train_cfg, lr: float | None = None, b1: float = 0.9, b2: float = 0.99,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AdamW with warm-up, a schedule and global-norm clipping."""
  sched = learning_rate(lr if lr is not None else train_cfg.lr, train_cfg.warmup_steps,
                        train_cfg.steps, train_cfg.schedule)
  parts = []
  if train_cfg.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)
