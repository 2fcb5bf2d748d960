"""Candidate lowerings of two parts of the VQ-GAN step, each the same function
of the same parameters (equal to float tolerance, checked here), timed
against the form the stage runs, forward and backward, interleaved:

  python -m rissole_jax.benchmarks.vqgan_lowerings --config configs/mnist.py \
      [--steps 20]

upsample  the decoder's nearest x2 upsampling + SAME 3x3 conv (`up{level}_sample`)
          as models/vqgan.py writes it (repeat, then the conv at the doubled
          size), against the sub-pixel forms on the low-resolution map: four
          2x2 phase convolutions (an output pixel's 9 taps read only 4 distinct
          input pixels: 4/9 of the FLOPs) interleaved, or one 3x3 conv with
          4x the output channels (the same FLOPs, one wider conv) + depth-to-space.
discriminator  the discriminator update's loss as train/vqgan.py runs it (the
          discriminator applied to the real and the fake batch separately)
          against one call on both batches concatenated (GroupNorm and the
          convolutions act per image, so the logits are the same).
step      the whole train step (train/vqgan.make_train_step, not donating,
          from the same state and batch each call) as the stage runs it,
          against the same step with the upsampling layers in the phases form
          (swapped in by a flax method interceptor, so the model code is
          untouched; the interceptor takes the low-res map back from the
          upsampled one by a strided slice, which the stage's form would not
          need, so the gain is if anything understated).

Shapes are the config's (batch vqgan.train.batch_size). Each program runs once
untimed, then the programs alternate (A B C A B C ...) --steps times; the
medians are printed, with the largest relative difference from the stage's
form over the outputs and gradients.
"""
from __future__ import annotations

import statistics
import time

from absl import app, flags

# --config, --override and --steps (timed calls of each program) are
# throughput.py's flags.
from rissole_jax.benchmarks import markdown_table, throughput

# Which low-resolution offset (-1, 0, +1) each of a 3x3 kernel's taps reads,
# for the even (0) and odd (1) output rows of a nearest x2 upsampling: row
# 2i reads rows 2i-1, 2i, 2i+1 of the upsampled map = i-1, i, i; row 2i+1
# reads i, i, i+1. (The zero padding maps to the low-res padding.)
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1), (0, 0, 0)),
               ((0, 0, 0), (1, 1, 0), (0, 0, 1)))


def upsample_conv(x, kernel, bias, form: str):
  """nearest x2 upsampling of x (B, H, W, Cin), then a SAME 3x3 conv."""
  import jax
  import jax.numpy as jnp
  conv = lambda x, k, pad: jax.lax.conv_general_dilated(
      x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if form == "stage":
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(up, kernel, ((1, 1), (1, 1))) + bias
  m = jnp.asarray(_PHASE_TAPS, kernel.dtype)
  # phases[a, b]: the 3x3 low-res kernel of output phase (a, b).
  phases = jnp.einsum("aut,bvs,tsio->abuvio", m, m, kernel)
  b, h, w, _ = x.shape
  if form == "wide":
    k = jnp.moveaxis(phases, (0, 1), (4, 5)).reshape(3, 3, x.shape[-1], -1)
    y = conv(x, k, ((1, 1), (1, 1))).reshape(b, h, w, kernel.shape[-1], 2, 2)
    y = jnp.transpose(y, (0, 1, 4, 2, 5, 3))
  else:   # "phases": each phase reads 2x2 offsets: (-1, 0) when even, (0, 1) when odd
    rows = [[conv(x, phases[a, c, a:a + 2, c:c + 2], ((1 - a, a), (1 - c, c)))
             for c in (0, 1)] for a in (0, 1)]
    y = jnp.stack([jnp.stack(r, axis=3) for r in rows], axis=2)   # (B, H, 2, W, 2, C)
  return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1]) + bias


def _upsample_programs(shape, cout):
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  k = (rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  g = rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], cout)).astype(np.float32)

  def program(form):
    def f(x, k, bias):
      y, pull = jax.vjp(lambda *a: upsample_conv(*a, form), x, k, bias)
      return (y, *pull(g))
    return jax.jit(f).lower(x, k, bias).compile()
  return {f: program(f) for f in ("stage", "phases", "wide")}, (x, k, bias)


def _discriminator_programs(config):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from rissole_jax.models import vqgan as vq
  disc = vq.make_discriminator(config)
  b, s, c = config.vqgan.train.batch_size, config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  real, fake = (rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32) for _ in range(2))
  params = disc.init(jax.random.key(0), real[:1])["params"]

  def program(form):
    def loss(p, real, fake):
      if form == "stage":   # train/vqgan.discriminator_grads
        lr, lf = disc.apply({"params": p}, real), disc.apply({"params": p}, fake)
      else:
        lr, lf = jnp.split(disc.apply({"params": p}, jnp.concatenate([real, fake])), 2)
      return vq.hinge_d_loss(lr, lf)
    return jax.jit(jax.value_and_grad(loss)).lower(params, real, fake).compile()
  return {f: program(f) for f in ("stage", "concatenated")}, (params, real, fake)


def _phases_upsampling(next_fun, args, kwargs, context):
  """A flax interceptor: the decoder's up{level}_sample convs in the phases form."""
  import re

  import flax.linen as nn
  m = context.module
  if not (isinstance(m, nn.Conv) and context.method_name == "__call__"
          and re.fullmatch(r"up\d+_sample", m.name or "")):
    return next_fun(*args, **kwargs)
  low = args[0][:, ::2, ::2]   # the map before the nearest x2 upsampling
  p = m.variables["params"]
  return upsample_conv(low, p["kernel"], p["bias"], "phases")


def _step_programs(config):
  import flax.linen as nn
  import jax

  from rissole_jax.benchmarks import vqgan_step
  from rissole_jax.models import vqgan as vq
  from rissole_jax.train import vqgan
  s = vqgan_step.setup(config)
  g_tx, d_tx = vqgan.make_optimizers(config)
  step = vqgan.make_train_step(vq.make_model(config), vq.make_discriminator(config), g_tx, d_tx,
                               config)

  def phases_step(*args):
    with nn.intercept_methods(_phases_upsampling):
      return step(*args)
  args = (s.state, s.key, s.images)
  return ({form: jax.jit(f).lower(*args).compile()
           for form, f in (("stage", step), ("phases upsampling", phases_step))}, args)


def _interleaved(progs, args, calls):
  """Median seconds per program, and each one's largest relative difference
  from the first's outputs."""
  import jax
  import numpy as np
  args = jax.device_put(args)
  outs = {n: jax.block_until_ready(p(*args)) for n, p in progs.items()}
  ref = jax.tree.leaves(outs[next(iter(progs))])
  times = {n: [] for n in progs}
  for _ in range(calls):
    for n, p in progs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(p(*args))
      times[n].append(time.perf_counter() - t0)
  rows = []
  for n in progs:
    diff = max(float(np.max(np.abs(a - r)) / (np.max(np.abs(r)) + 1e-30))
               for a, r in zip(jax.tree.leaves(outs[n]), ref))
    rows.append({"form": n, "ms": 1e3 * statistics.median(times[n]), "max_rel_diff": diff})
  for r in rows:
    r["ratio"] = r["ms"] / rows[0]["ms"]
  return rows


def measure(config, calls: int = 20) -> list[dict]:
  """The rows: one per (part, form)."""
  v, b, s = config.vqgan, config.vqgan.train.batch_size, config.data.image_size
  rows = []
  # The decoder's upsampling layers: level l (from the lowest) doubles
  # s / 2**l to its level's size and goes to the next level's width.
  levels = len(v.ch_mult)
  for level in reversed(range(1, levels)):
    size = s // 2 ** level
    cin, cout = v.ch * v.ch_mult[level], v.ch * v.ch_mult[level - 1]
    progs, args = _upsample_programs((b, size, size, cin), cout)
    for r in _interleaved(progs, args, calls):
      rows.append(dict(r, part=f"up{level}_sample: {b}x{size}x{size}x{cin} -> "
                               f"{2 * size}x{2 * size}x{cout}"))
  progs, args = _discriminator_programs(config)
  for r in _interleaved(progs, args, calls):
    rows.append(dict(r, part=f"discriminator loss+grad, 2x{b} images "
                             f"(disc_ch={v.disc_ch}, layers={v.disc_layers})"))
  progs, args = _step_programs(config)
  for r in _interleaved(progs, args, calls):
    rows.append(dict(r, part=f"train step, {b} images (state and metrics)"))
  return rows


def main(argv):
  del argv
  import os
  F = flags.FLAGS
  for spec in F.config:
    config = throughput.load_config(spec, F.override)
    load = os.getloadavg()[0]
    rows = measure(config, F.steps)
    print(f"{spec}: load average {load:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"{F.steps} calls each\n")
    print(markdown_table(rows, [("part", "part"), ("form", "form"), ("ms", "ms (median)"),
                                ("ratio", "× stage's"), ("max_rel_diff", "max rel. diff")]))


if __name__ == "__main__":
  throughput.define_flags()
  app.run(main)
