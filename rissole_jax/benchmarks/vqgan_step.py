"""Time of one VQ-GAN train step (generator + discriminator, Adam) on a random
batch, compile excluded: the VQ-GAN stage's own speed, e.g. to compare
XLA flags, which are read once per process, so alternate processes:

  for r in 1 2 3 4 5; do for f in 1 0; do
    RISSOLE_XLA_FLAGS=$f python -m rissole_jax.benchmarks.vqgan_step \
        --config configs/mnist.py --steps 30
  done; done

Prints one JSON row: XLA_FLAGS, batch, first-call seconds, median step ms,
images/s, load average. `setup` is also the VQ-GAN program of
benchmarks/profile.py (--what vqgan).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

from absl import app, flags

# --config, --override, --steps and --warmup are throughput.py's flags (one
# definition each). Importing rissole_jax applies the XLA:CPU flags (or not:
# RISSOLE_XLA_FLAGS=0) before jax starts.
from rissole_jax.benchmarks import throughput


@dataclasses.dataclass
class Setup:
  """The stage's jitted, donating step and what it runs on."""
  trainer: Any      # train/vqgan.py's Trainer (its .step is the stage's)
  state: dict       # donated by the step: feed it the state it returns
  key: Any
  images: Any
  batch: int
  params: int       # generator + discriminator parameters


def setup(config, step: int | None = None) -> Setup:
  """The stage's train step (train/vqgan.build on the config's mesh), its
  initial state with the step counter at `step` (None: vqgan.disc_start, so
  the GAN terms are on, as over the stage's last steps) and a random batch."""
  import jax
  import numpy as np

  from rissole_jax.runtime import parallel
  from rissole_jax.train import vqgan
  mesh = parallel.make_mesh(config.mesh)
  trainer = vqgan.build(config, mesh)
  init_key, step_key = vqgan.keys(config.seed)
  state = trainer.init_state(init_key)
  step = config.vqgan.disc_start if step is None else step
  state["step"] = jax.device_put(np.int32(step), trainer.state_shardings["step"])
  b, s, c = config.vqgan.train.batch_size, config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  images = parallel.put_batch(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32), mesh,
                              config.mesh.logical_axis_rules)
  params = sum(x.size for k in ("g_params", "d_params")
               for x in jax.tree.leaves(trainer.abstract_state[k]))
  return Setup(trainer, state, parallel.put_replicated(step_key, mesh), images, b, params)


def gan_status(config, metrics) -> str:
  """Whether the GAN terms acted in a step, from its metrics."""
  on = float(metrics["d_weight"]) > 0 or float(metrics["d_loss"]) != 0
  return (f"GAN terms {'on' if on else 'off'} (vqgan.disc_start={config.vqgan.disc_start}; "
          f"d_weight {float(metrics['d_weight']):.3g}, d_loss {float(metrics['d_loss']):.3g})")


def config_name(config) -> str:
  v, d = config.vqgan, config.data
  return (f"{d.name} VQ-GAN {d.image_size}x{d.image_size}x{d.channels} ch={v.ch} "
          f"ch_mult={tuple(v.ch_mult)} disc_ch={v.disc_ch} batch={v.train.batch_size}")


def measure(config, steps: int = 15, warmup: int = 2) -> dict:
  import jax
  s = setup(config)
  state, times = s.state, []
  for i in range(1 + warmup + steps):   # the first call compiles; then warm-up, then timed
    t0 = time.perf_counter()
    state, metrics = s.trainer.step(state, s.key, s.images)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1 + warmup:])
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": s.batch,
          "first_call_s": round(times[0], 2), "step_ms_median": round(1e3 * step_s, 1),
          "images_per_sec": round(s.batch / step_s, 1), "load": os.getloadavg()[0],
          "gan": gan_status(config, metrics)}


def main(argv):
  del argv
  F = flags.FLAGS
  for spec in F.config:
    config = throughput.load_config(spec, F.override)
    print(json.dumps(dict(measure(config, F.steps, F.warmup), config=spec)))


if __name__ == "__main__":
  throughput.define_flags()
  app.run(main)
