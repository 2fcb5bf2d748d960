"""The end of a stage's training loop, written once for every stage.

  with loop.ending(mngr, t.steps, nan_guard, bar, writer) as end:
    for s in ...:
      ...                      # steps, checks, saves, logs
    end.state = jax.block_until_ready(state)

An error inside the block (a NaN stop, an interrupt) finishes the pending
checkpoint save, which holds a good state, and closes the manager
(checkpoints.abandon) before it propagates. A normal end checks the steps
since the last look (a broken state is never saved), saves `end.state` at the
last step whatever the save interval says, waits for every write, records
checksums (checkpoints.finish), then closes the progress bar and writer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax

from rissole_jax.train import checkpoints, guard


@dataclasses.dataclass
class End:
  state: Any = None   # the trained state, set as the block's last statement


@contextlib.contextmanager
def ending(mngr, steps: int, nan_guard, *closing):
  """See the module docstring; `closing`: what to .close() after a normal end."""
  end = End()
  try:
    yield end
    if end.state is None:
      raise RuntimeError("loop.ending: the block ended without setting end.state.")
    nan_guard.check(mngr.latest_step())
  except BaseException:
    checkpoints.abandon(mngr)
    raise
  checkpoints.finish(mngr, steps, end.state)
  for c in closing:
    c.close()


@dataclasses.dataclass
class Ran:
  """What `run_steps` reports: the trained state, the mean metrics of the
  last log window, the steps per second after the first call (which
  compiles) and that first call's seconds."""
  state: Any
  last: dict
  steps_per_sec: float
  first_call_seconds: float


def run_steps(call, state, start: int, t, mngr, nan_guard, bar, writer, log, name: str) -> Ran:
  """Steps start..t.steps-1 of `call(state, s, n) -> (state, metrics)`,
  t.steps_per_call at a time (the last call may be shorter): the host looks,
  logs and saves between calls only, so a multiple of t.log_every or
  t.ckpt_every inside a call is acted on at the call's end. The steps since
  the last look are checked before every save: a broken state is never saved."""
  crossed = lambda a, b, every: b // max(every, 1) > a // max(every, 1)
  window, last, t_first, timed_from = [], {}, None, start
  first_seconds, t_start = 0.0, time.time()
  with ending(mngr, t.steps, nan_guard, bar, writer) as end:
    s = start
    while s < t.steps:
      n = min(t.get("steps_per_call", 1), t.steps - s)
      state, m = call(state, s, n)
      window.append(m)
      nan_guard.add(s + n, m)
      if s == start:  # the first call compiles: time the rest
        jax.block_until_ready(m)
        t_first, timed_from = time.time(), s + n
        first_seconds = t_first - t_start
      s0, s = s, s + n
      if crossed(s0, s, t.ckpt_every):
        nan_guard.check(mngr.latest_step())
        checkpoints.save(mngr, s, state, force=True)  # also off the interval's multiples
      if crossed(s0, s, t.log_every) or s == t.steps:
        nan_guard.check(mngr.latest_step())
        last = guard.mean_finite(window)
        window = []
        writer.scalars(s, last)
        log("%s step %d/%d: %s", name, s, t.steps,
            ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items(), key=lambda kv: kv[0] != "loss")
                      if k != guard.FLAG))
        bar.set_postfix(loss=f"{last['loss']:.4f}")
      bar.update(n)
    end.state = state = jax.block_until_ready(state)
    elapsed = time.time() - t_first if t_first else 0.0
    steps_timed = t.steps - timed_from
    rate = steps_timed / elapsed if elapsed > 0 and steps_timed else 0.0
  return Ran(state, last or {"loss": float("nan")}, rate, first_seconds)
