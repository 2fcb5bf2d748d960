"""One 3x3 convolution, forward and both gradients: XLA's convolution against
the two other lowerings of models/layers.py, interleaved: the tiny-map
matmul (`small_map_conv`, the kernel spread over the whole map) and kh*kw
slices + one dot (`batched_kernels`, im2col).

  python -m rissole_jax.benchmarks.small_map [--conv_shape 512,4,4,512] \
      [--conv_shape 512,8,8,256] [--calls 3]

`MATMUL_CONV_MAX_PIXELS` decides which convolutions take the matmul form;
this measures whether raising it (or slicing) would pay at a given map size
and width
(docs/performance.md, "The profile"). Each --conv_shape is B,H,W,C (C in
and out); the programs run alternately (A B C A B C ...) after one untimed
call each, and the medians are printed.
"""
from __future__ import annotations

import statistics
import time

from absl import app, flags

from rissole_jax.benchmarks import markdown_table

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  flags.DEFINE_multi_string("conv_shape", ["512,4,4,512", "512,8,8,256"],
                            "B,H,W,C of the input (C in and out).")
  flags.DEFINE_integer("calls", 3, "Timed calls of each program (median).")


FLAGS = flags.FLAGS


def program(shape, matmul: bool, sliced: bool = False):
  """(compiled fwd+bwd of one SAME 3x3 conv, args): XLA's convolution, the
  matmul, or (sliced) kh*kw slices + one dot."""
  import jax
  import jax.numpy as jnp

  from rissole_jax.models import layers
  keep = layers.MATMUL_CONV_MAX_PIXELS
  layers.MATMUL_CONV_MAX_PIXELS = shape[1] * shape[2] if matmul else 0
  layers.tap_index.cache_clear()
  try:
    w_shape = (3, 3, shape[-1], shape[-1])
    dn = jax.lax.conv_dimension_numbers(shape, w_shape, ("NHWC", "HWIO", "NHWC"))

    def loss(x, w):
      y = layers.small_map_conv(x, w, (1, 1), "SAME", dimension_numbers=dn)
      return (y * y).sum()

    args = (jnp.full(shape, 0.01), jnp.full(w_shape, 0.01))
    with layers.batched_kernels(sliced):
      return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile(), args
  finally:
    layers.MATMUL_CONV_MAX_PIXELS = keep
    layers.tap_index.cache_clear()


def measure(shape, rounds: int) -> dict:
  import jax
  progs = {"conv": program(shape, False), "matmul": program(shape, True),
           "sliced": program(shape, False, sliced=True)}
  times = {k: [] for k in progs}
  for f, args in progs.values():
    jax.block_until_ready(f(*args))
  for _ in range(rounds):
    for k, (f, args) in progs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t0)
  conv, mm, sl = (statistics.median(times[k]) * 1e3 for k in ("conv", "matmul", "sliced"))
  return {"shape": "×".join(map(str, shape)), "conv_ms": conv, "matmul_ms": mm,
          "ratio": mm / conv, "sliced_ms": sl, "sliced_ratio": sl / conv}


def main(argv):
  del argv
  rows = [measure(tuple(int(v) for v in s.split(",")), FLAGS.calls) for s in FLAGS.conv_shape]
  print(markdown_table(rows, [("shape", "input B×H×W×C"), ("conv_ms", "convolution ms"),
                              ("matmul_ms", "matmul ms"), ("ratio", "matmul / conv"),
                              ("sliced_ms", "slices + dot ms"),
                              ("sliced_ratio", "slices + dot / conv")]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
