"""Scale-out benchmark: the diffusion train step on meshes of 1 and N devices.

  python -m rissole_jax.benchmarks.parallel --config configs/mnist.py \
      --meshes 1:1x1,8:8x1,8:2x4,8:1x8 [--steps 20] [--json runs/parallel.json]

Each entry DEVICES:MESH runs in a fresh subprocess (on CPU, DEVICES host
devices are simulated with XLA_FLAGS, which must be set before jax starts;
on an accelerator DEVICES must not exceed the real count). For each it
reports: compile seconds (lower + compile of the jitted, sharded, donating
train step with neighbour blocks gathered on the devices), the median of
--steps steady-state step times (each blocked until ready; the compile and
--warmup steps are not timed), images per second, the largest per-device
bytes of the parameters and of the whole train state (parameters, EMA, Adam
moments), and the step's FLOPs from XLA's cost analysis. With a GPU/TPU and
--peak_tflops (or a known device kind) it adds model FLOP utilisation.

Simulated CPU devices share the same cores, so 8 devices show the overhead
of partitioning, not a speed-up. The database is synthetic (Gaussian latents
and a random neighbour table of the config's shapes): timing does not depend
on the values.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from rissole_jax.benchmarks import markdown_table
from rissole_jax.benchmarks.peaks import peak_tflops as known_peak

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file [:variant].")
  flags.DEFINE_list("meshes", ["1:1x1", "8:8x1", "8:2x4", "8:1x8"],
                    "DEVICES:MESH_SHAPE entries (mesh axes from the config).")
  flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after the compile.")
  flags.DEFINE_integer("database", 4096, "Rows of the synthetic latent database.")
  flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device for MFU "
                     "(0: from the device kind when known).")
  flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
  flags.DEFINE_string("_child", None, "internal: DEVICES:MESH of one measurement")


FLAGS = flags.FLAGS


def measure(config, devices: int, shape: tuple[int, ...], steps: int, warmup: int,
            n_db: int, peak_tflops: float) -> dict:
  """One row: the train step on a `shape` mesh of the first `devices` devices."""
  import jax
  import numpy as np

  from rissole_jax.runtime import parallel
  from rissole_jax.train import diffusion

  config = config.copy_and_resolve_references()
  config.mesh.shape = shape
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:devices])
  rules = config.mesh.logical_axis_rules
  latent_shape = diffusion.expected_latent_shape(config)
  k, batch = int(config.retrieval.k), int(config.diffusion.train.batch_size)
  fns = diffusion.parts(config, latent_shape)
  _, _, _, state, state_sh = diffusion.build(config, latent_shape, k, mesh, config.seed)

  rng = np.random.default_rng(0)
  latents = rng.standard_normal((n_db, *latent_shape), np.float32)
  table = (np.arange(n_db)[:, None] + rng.integers(1, n_db, (n_db, k))) % n_db
  repl = parallel.replicated(mesh)
  db_lat = parallel.put_replicated(latents, mesh)
  db_nbr = parallel.put_replicated(table.astype(np.int32), mesh)
  key = parallel.put_replicated(jax.random.PRNGKey(1), mesh)
  ids_sh = parallel.batch_sharding(mesh, rules, 1)
  jstep = jax.jit(fns.gather_step, donate_argnums=(0,),
                  in_shardings=(state_sh, repl, repl, repl, ids_sh),
                  out_shardings=(state_sh, repl))
  ids = [parallel.put_batch(rng.integers(0, n_db, batch).astype(np.int32), mesh, rules)
         for _ in range(steps + warmup)]

  t0 = time.perf_counter()
  compiled = jstep.lower(state, key, db_lat, db_nbr, ids[0]).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0))

  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = compiled(state, key, db_lat, db_nbr, ids[i])
    jax.block_until_ready((state, m))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)

  def total(tree):
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  kind = jax.devices()[0].device_kind
  # The peak of the compute dtype: bfloat16 runs against the bfloat16 peak.
  peak = peak_tflops or known_peak(kind, config.model.dtype)
  row = {
      "devices": devices, "mesh": "x".join(map(str, shape)), "platform": jax.default_backend(),
      "device_kind": kind, "batch": batch,
      "compile_s": compile_s, "step_s_median": step_s,
      "step_s_min": min(times), "step_s_max": max(times),
      "images_per_sec": batch / step_s,
      "param_bytes_total": total(state["params"]),
      "param_bytes_per_device_max": max(parallel.bytes_per_device(state["params"]).values()),
      "state_bytes_total": total(state),
      "state_bytes_per_device_max": max(parallel.bytes_per_device(state).values()),
      # XLA's count for the partitioned program of one device.
      "flops_per_step_per_device": flops,
  }
  if peak and jax.default_backend() != "cpu":
    row["mfu"] = flops / step_s / (peak * 1e12)
  return row


def _run_child(entry: str, argv_rest: list[str]) -> dict:
  devices, _ = entry.split(":")
  env = dict(os.environ)
  if int(devices) > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  out = subprocess.run([sys.executable, "-m", "rissole_jax.benchmarks.parallel",
                        f"--_child={entry}", *argv_rest], env=env, check=True,
                       stdout=subprocess.PIPE, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
  cols = [("devices", "devices"), ("mesh", "mesh"), ("compile_s", "compile s"),
          ("step_s_median", "step s (median)"), ("images_per_sec", "img/s"),
          ("param_mib", "param MiB/device"), ("param_share", "share of params"),
          ("state_mib", "state MiB/device"),
          ("flops_per_step_per_device", "GFLOP/step/device"), ("mfu", "MFU")]
  return markdown_table([dict(r, param_share=r["param_bytes_per_device_max"] / r["param_bytes_total"],
                              param_mib=r["param_bytes_per_device_max"] / 2**20,
                              state_mib=r["state_bytes_per_device_max"] / 2**20,
                              flops_per_step_per_device=r["flops_per_step_per_device"] / 1e9)
                         for r in rows], cols)


def passthrough(args: list[str]) -> list[str]:
  """The command line less --meshes, --json and --_child (in either the
  --flag=value or the --flag value form): what the children get."""
  drop, out, skip = {"--meshes", "--json", "--_child"}, [], False
  for a in args:
    if skip:
      skip = False
      continue
    name = a.split("=", 1)[0]
    if name in drop:
      skip = "=" not in a
      continue
    out.append(a)
  return out


def main(argv):
  # Flags other than --meshes/--json travel to the children unchanged.
  rest = passthrough(sys.argv[1:])
  if FLAGS["_child"].value:
    devices, shape = FLAGS["_child"].value.split(":")
    row = measure(FLAGS.config, int(devices), tuple(int(s) for s in shape.split("x")),
                  FLAGS.steps, FLAGS.warmup, FLAGS.database, FLAGS.peak_tflops)
    print(json.dumps(row))
    return
  del argv
  rows = []
  for entry in FLAGS.meshes:
    rows.append(_run_child(entry, rest))
    print(json.dumps(rows[-1]), file=sys.stderr)
  if FLAGS.json:
    from rissole_jax import files
    files.atomic_write_json(FLAGS.json, rows)
  print(markdown(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
