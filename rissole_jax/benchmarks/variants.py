"""Train-step and sampling-step speed of config variants, interleaved in one process.

  python -m rissole_jax.benchmarks.variants --config configs/mnist.py \
      --variant fold:model.block_map=fold --variant vmap:model.block_map=vmap \
      [--rounds 7] [--steps 8] [--out FILE.json]

Each variant is NAME:KEY=VALUE[,KEY=VALUE...] (dotted config keys, Python
literals) on top of --config. For each variant: the diffusion stage's own
jitted train call (diffusion.make_train_call: the device gather, donation,
`diffusion.train.steps_per_call` steps per call) on a random database of the
config's latent shape, and one sampling step (one denoiser evaluation of every
block of `batch` images, jitted, EMA weights). Both are compiled first (not
timed); then `rounds` rounds time every variant in turn (A B A B ...): `steps`
train steps, and `steps` sampling steps, each block_until_ready. Medians.
Speed only: a random database trains nothing meaningful.
"""
from __future__ import annotations

import ast
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rissole_jax import benchmark

from rissole_jax.runtime import parallel
from rissole_jax.data.pipeline import RowCount, TrainStream
from rissole_jax.models import unet
from rissole_jax.train import diffusion
from rissole_jax import files

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  config_flags.DEFINE_config_file("config", None, "Base config [:variant].")
  flags.DEFINE_multi_string("variant", [], "NAME:KEY=VALUE[,KEY=VALUE...]")
  flags.DEFINE_integer("rounds", 7, "Interleaved rounds (medians over them).")
  flags.DEFINE_integer("steps", 8, "Train steps and sampling steps per timing.")
  flags.DEFINE_integer("database", 2000, "Random database rows.")
  flags.DEFINE_string("out", None, "Also write the rows here (JSON).")


FLAGS = flags.FLAGS


def parse_variant(spec: str) -> tuple[str, dict]:
  name, _, rest = spec.partition(":")
  overrides = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return name, overrides


def setup(config, latents, table):
  """(train(state) -> state over `steps` steps, sample(params) -> x, state) of one config."""
  latent_shape, k = latents.shape[1:], table.shape[1]
  mesh = parallel.make_mesh(config.mesh)
  fns = diffusion.parts(config, latent_shape)
  *_, state, state_sh = diffusion.build(config, latent_shape, k, mesh, config.seed)
  t = config.diffusion.train
  stream = TrainStream(RowCount(len(latents)), t.batch_size, 0, 0, 1, cache=False)
  key = parallel.put_replicated(jax.random.PRNGKey(1), mesh)
  call, _ = diffusion.make_train_call(fns, t.gather, latents, None, table, stream, key,
                                      state_sh, mesh, config.mesh.logical_axis_rules)
  n_per = t.steps_per_call

  def train(state, steps):
    s = 0
    while s < steps:
      n = min(n_per, steps - s)
      state, m = call(state, s, n)
      s += n
    return jax.block_until_ready(state)

  B = t.batch_size
  ids = np.arange(B) % len(latents)
  x0, cond = unet.model_inputs(fns.model, latents[ids], latents[table[ids]])
  tt = np.full((x0.shape[0],), 500, np.int32)
  keep = ({"keep": np.ones((x0.shape[0],), bool)} if fns.model.retrieval and
          fns.model.learn_null else {})
  fwd = jax.jit(lambda p, x: fns.model.apply({"params": p}, x, tt, **cond, **keep))

  def sample(state, steps):
    x = x0
    for _ in range(steps):
      x = fwd(state["ema"], x)
    return jax.block_until_ready(x)
  return train, sample, state, unet.count_params(state["params"])


def main(argv):
  del argv
  base = FLAGS.config
  variants = [parse_variant(v) for v in FLAGS.variant] or [("base", {})]
  h, w, c = diffusion.expected_latent_shape(base)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((FLAGS.database, h, w, c)).astype(np.float32)
  k = base.retrieval.k
  table = (np.arange(FLAGS.database)[:, None] + 1 + np.arange(k)[None]) % FLAGS.database
  runs, steps = [], FLAGS.steps
  for name, ov in variants:
    config = benchmark.with_overrides(base, ov)
    train, sample, state, n_params = setup(config, latents, table)
    t0 = time.perf_counter()
    state = train(state, steps)      # compiles (a shorter last call too, if any)
    compile_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample(state, 1)
    compile_sample = time.perf_counter() - t0
    runs.append({"name": name, "overrides": ov, "params": n_params, "train": train,
                 "sample": sample, "state": state, "train_s": [], "sample_s": [],
                 "first_train_call_s": compile_train, "first_sample_call_s": compile_sample,
                 "batch": config.diffusion.train.batch_size})
  for _ in range(FLAGS.rounds):
    for r in runs:
      t0 = time.perf_counter()
      r["state"] = r["train"](r["state"], steps)
      r["train_s"].append((time.perf_counter() - t0) / steps)
      t0 = time.perf_counter()
      r["sample"](r["state"], steps)
      r["sample_s"].append((time.perf_counter() - t0) / steps)
  rows = []
  for r in runs:
    tr, sa = float(np.median(r["train_s"])), float(np.median(r["sample_s"]))
    rows.append({"name": r["name"], "overrides": r["overrides"], "params": r["params"],
                 "train_images_per_s": r["batch"] / tr, "sample_step_images_per_s": r["batch"] / sa,
                 "train_step_ms": 1e3 * tr, "sample_step_ms": 1e3 * sa,
                 "first_train_call_s": r["first_train_call_s"],
                 "first_sample_call_s": r["first_sample_call_s"],
                 "train_step_ms_all": [round(1e3 * x, 2) for x in r["train_s"]],
                 "sample_step_ms_all": [round(1e3 * x, 2) for x in r["sample_s"]]})
  env = {"cpu": platform.processor() or platform.machine(), "devices": str(jax.devices()),
         "load": os.getloadavg(), "rounds": FLAGS.rounds, "steps": steps}
  print(json.dumps(env))
  print("| variant | params | train img/s | sample-step img/s | train ms | sample ms | first train call s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['params']:,} | {r['train_images_per_s']:.1f} | "
          f"{r['sample_step_images_per_s']:.1f} | {r['train_step_ms']:.1f} | "
          f"{r['sample_step_ms']:.1f} | {r['first_train_call_s']:.1f} |")
  if FLAGS.out:
    files.atomic_write_json(FLAGS.out, {"env": env, "rows": rows})


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
