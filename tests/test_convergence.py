"""The convergence benchmark: classifier FD per kept diffusion checkpoint."""
import json

import numpy as np

from rissole_jax.benchmarks import convergence


def test_fd_per_checkpoint(smoke_workdir, tmp_path):
  steps = convergence.checkpoint_steps(smoke_workdir)
  assert steps == [2, 4]          # smoke: 4 steps, a checkpoint every 2, two kept
  rows = convergence.fd_curve("smoke", smoke_workdir, num=8, seed=0, done=set())
  assert [r["step"] for r in rows] == steps
  assert all(np.isfinite(r["classifier_fd"]) and 0 <= r["near_copies"] <= 1 for r in rows)
  # each checkpoint's own EMA weights sample: the scores differ between steps
  assert rows[0]["classifier_fd"] != rows[1]["classifier_fd"]
  # resuming: steps already measured are not redone
  assert [r["step"] for r in convergence.fd_curve("smoke", smoke_workdir, 8, 0, {2})] == [4]
  out = tmp_path / "c.png"
  convergence.plot(rows, str(out), {"smoke": smoke_workdir / "diffusion" / "log.txt"})
  assert out.stat().st_size > 0
  json.dumps(rows)                # rows are plain JSON
