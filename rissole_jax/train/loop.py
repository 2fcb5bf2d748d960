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
from typing import Any

from rissole_jax.train import checkpoints


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
