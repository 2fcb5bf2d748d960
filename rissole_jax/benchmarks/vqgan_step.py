"""Time of one VQ-GAN train step (generator + discriminator, Adam) on a random
batch, compile excluded: the VQ-GAN stage's own speed, e.g. to compare
XLA flags, which are read once per process, so alternate processes:

  for r in 1 2 3 4 5; do for f in 1 0; do
    RISSOLE_XLA_FLAGS=$f python -m rissole_jax.benchmarks.vqgan_step \
        --config configs/mnist.py --steps 30
  done; done

Prints one JSON row: XLA_FLAGS, batch, first-call seconds, median step ms,
images/s, load average.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import app

# --config, --override, --steps and --warmup are throughput.py's flags (one
# definition each). Importing rissole_jax applies the XLA:CPU flags (or not:
# RISSOLE_XLA_FLAGS=0) before jax starts.
from rissole_jax.benchmarks import throughput


def measure(config, steps: int = 15, warmup: int = 2) -> dict:
  import jax
  import numpy as np

  from rissole_jax import parallel
  from rissole_jax.train import vqgan
  mesh = parallel.make_mesh(config.mesh)
  trainer = vqgan.build(config, mesh)
  init_key, step_key = vqgan.keys(config.seed)
  state = trainer.init_state(init_key)
  b, s, c = config.vqgan.train.batch_size, config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  images = parallel.put_batch(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32), mesh,
                              config.mesh.logical_axis_rules)
  key = parallel.put_replicated(step_key, mesh)
  times = []
  for i in range(1 + warmup + steps):   # the first call compiles; then warm-up, then timed
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, key, images)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1 + warmup:])
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": b,
          "first_call_s": round(times[0], 2), "step_ms_median": round(1e3 * step_s, 1),
          "images_per_sec": round(b / step_s, 1), "load": os.getloadavg()[0]}


def main(argv):
  del argv
  for spec in throughput._CONFIG.value:
    config = throughput.load_config(spec, throughput._OVERRIDE.value)
    print(json.dumps(dict(measure(config, throughput._STEPS.value, throughput._WARMUP.value),
                          config=spec)))


if __name__ == "__main__":
  app.run(main)
