"""Throughput benchmark: the denoiser's train step and sampling on one device.

  python -m rissole_jax.benchmarks.throughput --config configs/mnist.py \
      [--config configs/celeba64.py:paper] [--steps 10] [--json runs/throughput.json]

For each config (FILE[:variants], repeatable; --override KEY=VALUE applies to
every config) it reports, on whatever device JAX finds first:
  train         the jitted, donating diffusion train step (neighbour blocks
                gathered on the device, forward, backward, Adam, EMA) on
                diffusion.train.batch_size images;
  sample_step   one DDIM step over all blocks of --sample_batch images (0: the
                train batch), with the per-row noise the sampler draws;
  sample_ddim   a whole DDIM sample of --sample_steps steps (one jitted call).
Each row: the compute dtype (model.dtype), compile seconds (lower + compile;
the persistent compilation cache is off here), the median of --steps calls
(each blocked until ready, after --warmup untimed ones), images/s, the FLOPs
XLA's cost analysis counts for the program (a sampling loop's body counts
once, so sample_ddim's FLOPs are sample_step's times the steps), achieved
FLOP/s and, where the device's peak for the dtype is known (benchmarks/peaks.py,
or --peak_tflops), that peak and the fraction of it.

The database is synthetic (Gaussian latents of the config's latent shape and
a random neighbour table): timings do not depend on the values, and no data
or trained model is needed.

Comparing code trees (e.g. before/after a change), interleaved:

  python -m rissole_jax.benchmarks.throughput --config configs/mnist.py \
      --trees /path/to/old/checkout,/path/to/new/checkout --rounds 3

runs this file in a fresh process per (round, tree), alternating the trees (A B
A B ...), each with PYTHONPATH set to the tree, so each tree's own code and
defaults (its XLA flags too) are measured; the table gives per-tree medians
over the rounds and the ratios to the first tree. A tree may carry environment
settings for its runs: PATH@NAME=VALUE (e.g. /new@RISSOLE_XLA_FLAGS=0, the new
code without its default XLA flags). The measuring code below
uses only functions that trees since commit 5c3a3a5 have.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

# No rissole_jax import at module level: with --trees this file runs against
# other trees' packages (back to 5c3a3a5), which lack newer modules.

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  flags.DEFINE_multi_string("config", ["configs/mnist.py"], "Config FILE[:variants].")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE set in every config "
                            "(e.g. model.upsample='conv_transpose').")
  flags.DEFINE_integer("steps", 10, "Timed calls per program (median reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after the compile.")
  flags.DEFINE_integer("sample_batch", 0, "Images per sampling call (0: the "
                       "train batch size).")
  flags.DEFINE_integer("sample_steps", 20, "DDIM steps of the whole sample "
                       "(0: skip it).")
  flags.DEFINE_integer("database", 2048, "Rows of the synthetic latent database.")
  flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of the device (0: from the "
                     "device kind when known).")
  flags.DEFINE_list("trees", [], "Code trees to compare, interleaved (see above).")
  flags.DEFINE_integer("rounds", 3, "With --trees: rounds of A B ... runs.")
  flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
  flags.DEFINE_bool("compilation_cache", False, "Let the persistent compilation cache "
                    "serve the compiles (compile seconds then mean reading it).")
  flags.DEFINE_bool("_child", False, "internal: measure and print JSON rows")


FLAGS = flags.FLAGS

PROGRAMS = ("train", "sample_step", "sample_ddim")


def load_config(spec: str, overrides=()):
  """FILE[:variants] -> the config, with KEY=VALUE overrides (values as Python literals)."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_throughput_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  for item in overrides:
    key, _, value = item.partition("=")
    *path_, last = key.strip().split(".")
    node = config
    for p in path_:
      node = node[p]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value
  return config


def _latents_fn(model, schedule, config):
  """fn(params, nb, key) -> normalised latents: the sampler without the decode."""
  try:
    from rissole_jax.inference.program import latents_fn
  except ImportError:  # older trees (compared with --trees): where it was then
    try:
      from rissole_jax.inference.sampler import latents_fn
    except ImportError:  # before rissole_jax.inference.sampler (5c3a3a5)
      from rissole_jax.stages.sample import sample_latents
      return lambda params, nb, key: sample_latents(model, params, schedule, config, nb, key)
  return latents_fn(model, schedule, config)


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _time(compiled, args, steps: int, warmup: int, donate: bool = False):
  """Median seconds of `steps` calls; a donating program is fed its own output."""
  import jax
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    if donate:
      args = (out[0],) + tuple(args[1:])
  return statistics.median(times)


def measure(config, steps: int, warmup: int, sample_batch: int, sample_steps: int,
            n_db: int, peak_tflops: float = 0.0, compilation_cache: bool = False) -> list[dict]:
  """The rows (train, sample_step, sample_ddim) of one config; without
  compilation_cache, compile seconds mean compiling, not reading a cache."""
  import jax
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", compilation_cache and was)
  try:
    return _measure(config, steps, warmup, sample_batch, sample_steps, n_db, peak_tflops)
  finally:
    jax.config.update("jax_enable_compilation_cache", was)


@dataclasses.dataclass
class Setup:
  """What the programs of one config run on: the train state, a copy of its
  EMA parameters (the train step donates the state), a synthetic database
  and the row fields that name the config."""
  config: object
  fns: object
  state: dict
  ema: dict
  latents: object
  table: object
  ids: object
  nb: object
  key: object
  batch: int
  sample_batch: int
  base: dict


def setup(config, sample_batch: int = 0, n_db: int = 2048) -> Setup:
  """The train state, synthetic database and inputs of one config on the
  first device (sample_batch 0: the train batch)."""
  import jax
  import numpy as np

  from rissole_jax.runtime import parallel
  from rissole_jax.models import unet
  from rissole_jax.train import diffusion

  config = config.copy_and_resolve_references()
  config.mesh.shape = (1, 1)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  latent_shape = diffusion.expected_latent_shape(config)
  k, batch = int(config.retrieval.k), int(config.diffusion.train.batch_size)
  sample_batch = sample_batch or batch
  fns = diffusion.parts(config, latent_shape)
  _, _, _, state, _ = diffusion.build(config, latent_shape, k, mesh, config.seed)

  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  latents = jax.device_put(rng.standard_normal((n_db, *latent_shape), np.float32), dev)
  table = (np.arange(n_db)[:, None] + rng.integers(1, n_db, (n_db, k))) % n_db
  table = jax.device_put(table.astype(np.int32), dev)
  ids = jax.device_put(rng.integers(0, n_db, batch).astype(np.int32), dev)
  nb = latents[table[rng.integers(0, n_db, sample_batch)]]
  base = {"config": config_name(config), "platform": jax.default_backend(),
          "device_kind": dev.device_kind, "params": unet.count_params(state["params"]),
          "latent_shape": list(latent_shape), "k": k,
          "dtype": config.model.get("dtype", "float32")}
  ema = jax.tree.map(lambda x: x.copy(), state["ema"])
  return Setup(config, fns, state, ema, latents, table, ids, nb, jax.random.PRNGKey(1),
               batch, sample_batch, base)


def train_program(s: Setup):
  """(jitted, args) of the donating train step: feed it its own state back
  (`_time(..., donate=True)`); s.state is invalid after the first call."""
  import jax
  return (jax.jit(s.fns.gather_step, donate_argnums=(0,)),
          (s.state, s.key, s.latents, s.table, s.ids))


def sample_program(s: Setup, steps: int):
  """(jitted, args) of a whole DDIM sample of `steps` steps over all blocks."""
  import jax
  c = s.config.copy_and_resolve_references()
  c.sample.update(sampler="ddim", steps=steps)
  return jax.jit(_latents_fn(s.fns.model, s.fns.schedule, c)), (s.ema, s.nb, s.key)


def _known_peak(kind: str, dtype: str) -> float:
  """benchmarks/peaks.py's peak for the compute dtype (0 in trees without it;
  trees before the bf16 table know only float32)."""
  try:
    from rissole_jax.benchmarks.peaks import peak_tflops
  except ImportError:  # trees before benchmarks/peaks.py
    return 0.0
  try:
    return peak_tflops(kind, dtype)
  except TypeError:
    return peak_tflops(kind) if dtype == "float32" else 0.0


def _measure(config, steps, warmup, sample_batch, sample_steps, n_db, peak_tflops):
  s = setup(config, sample_batch, n_db)
  peak = peak_tflops or _known_peak(s.base["device_kind"], s.base["dtype"])

  def row(program, images, jitted, args, donate=False, flops=None):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled) if flops is None else flops
    step_s = _time(compiled, args, steps, warmup, donate)
    r = dict(s.base, program=program, batch=images, compile_s=compile_s, step_s=step_s,
             images_per_sec=images / step_s, flops=flops, flops_per_sec=flops / step_s)
    if peak:
      r.update(peak_tflops=peak, peak_fraction=flops / step_s / (peak * 1e12))
    return r

  rows = [row("train", s.batch, *train_program(s), donate=True)]
  s.state = None
  rows.append(row("sample_step", s.sample_batch, *sample_program(s, 1)))
  if sample_steps:   # a sampling loop's body counts once in XLA's cost analysis
    rows.append(row("sample_ddim", s.sample_batch, *sample_program(s, sample_steps),
                    flops=rows[-1]["flops"] * sample_steps))
    rows[-1]["steps"] = sample_steps
  return rows


def config_name(config) -> str:
  m = config.model
  return (f"{config.data.name} {m.variant} ch={m.ch} ch_mult={tuple(m.ch_mult)} "
          f"grid={tuple(config.blocks.grid)} k={config.retrieval.k}")


# ---------------------------------------------------------------------------
# Output.

def markdown(rows: list[dict]) -> str:
  from rissole_jax.benchmarks import markdown_table
  cols = [("tree", "tree"), ("config", "config"), ("dtype", "dtype"), ("params", "params"),
          ("program", "program"),
          ("batch", "images"), ("compile_s", "compile s"), ("step_ms", "ms/call"),
          ("images_per_sec", "img/s"), ("ratio", "× first tree"), ("gflop", "GFLOP/call"),
          ("gflops", "GFLOP/s"), ("peak_fraction", "of peak")]
  if not any("tree" in r for r in rows):
    cols = [c for c in cols if c[0] not in ("tree", "ratio")]
  return markdown_table([dict(r, step_ms=r["step_s"] * 1e3, gflop=r["flops"] / 1e9,
                              gflops=r["flops_per_sec"] / 1e9) for r in rows], cols)


def compare(trees: list[str], rounds: int, argv_rest: list[str]) -> list[dict]:
  """Median rows per tree over `rounds` interleaved runs (A B A B ...)."""
  runs: dict[str, list[list[dict]]] = {t: [] for t in trees}
  for r in range(rounds):
    for tree in trees:
      path, *settings = tree.split("@")
      env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
      env.update(kv.split("=", 1) for kv in settings)
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", *argv_rest],
                           env=env, check=True, stdout=subprocess.PIPE, text=True)
      rows = json.loads(out.stdout.strip().splitlines()[-1])
      runs[tree].append(rows)
      print(f"round {r + 1} {tree}: " + ", ".join(
          f"{x['program']} {x['images_per_sec']:.1f} img/s" for x in rows), file=sys.stderr)
  merged = []
  for tree in trees:
    for i, first in enumerate(runs[tree][0]):
      per = [rows[i] for rows in runs[tree]]
      med = dict(first, tree=tree, rounds=len(per))
      for key in ("compile_s", "step_s"):
        med[key] = statistics.median(p[key] for p in per)
      med["images_per_sec"] = med["batch"] / med["step_s"]
      med["flops_per_sec"] = med["flops"] / med["step_s"]
      med["images_per_sec_all"] = [p["images_per_sec"] for p in per]
      merged.append(med)
  firsts = {(r["config"], r["program"]): r["images_per_sec"] for r in merged
            if r["tree"] == trees[0]}
  for r in merged:
    base = firsts.get((r["config"], r["program"]))
    if base:
      r["ratio"] = r["images_per_sec"] / base
  return merged


def passthrough(args: list[str]) -> list[str]:
  """The command line less --trees, --rounds and --json (either form)."""
  drop, out, skip = {"--trees", "--rounds", "--json"}, [], False
  for a in args:
    if skip:
      skip = False
      continue
    if a.split("=", 1)[0] in drop:
      skip = "=" not in a
      continue
    out.append(a)
  return out


def main(argv):
  del argv
  if FLAGS.trees and not FLAGS["_child"].value:
    rows = compare(FLAGS.trees, FLAGS.rounds, passthrough(sys.argv[1:]))
  else:
    rows = []
    for spec in FLAGS.config:
      config = load_config(spec, FLAGS.override)
      rows += measure(config, FLAGS.steps, FLAGS.warmup, FLAGS.sample_batch, FLAGS.sample_steps,
                      FLAGS.database, FLAGS.peak_tflops, FLAGS.compilation_cache)
      for r in rows:
        r.setdefault("spec", spec)
    if FLAGS["_child"].value:
      print(json.dumps(rows))
      return
  if FLAGS.json:
    from rissole_jax import files
    files.atomic_write_json(FLAGS.json, rows)
  print(markdown(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
