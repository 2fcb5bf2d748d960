"""Deployment figures: on-device footprint, peak memory and time per image of
the exported sampler (rissole_jax/inference/stablehlo.py), run by its standalone
runner on ONE CPU thread at batch 1, for each quantization mode.

  python -m rissole_jax.benchmarks.deploy --config configs/mnist.py \
      --workdir /work/runs/default --out docs/solvers/deploy.json \
      --set sampler=ddim --set steps=10 --set eta=1 [--baseline full]

--versus "sampler=distilled,steps=4" (repeatable) also measures the same
model with those sample settings, in the same sitting, interleaved with the
--set ones (a distilled student beside the default sampler: issue 26).

--baseline VARIANT also measures that denoiser variant (e.g. `full`, with the
architecture of the benchmark's `full` run: configs/bench/default.py) with the
same sampler, decoder and database; its weights are random (time and memory
do not depend on their values), so its quality comes from its own trained
run (docs/RESULTS.md), not from here.

Each measurement is a fresh process pinned to one core
(XLA_FLAGS=--xla_cpu_multi_thread_eigen=false, taskset where available)
that loads the exported directory, draws one image (compiling), then times
--repeats more; peak memory is that process's maximum resident set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])

def hwm():
  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a
  # child of a big parent would report the parent's peak.
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024

import run as runner
t0 = time.perf_counter()
exported, params, db, m = runner.load(sys.argv[1])
nb, seeds, _ = runner.inputs(db, 1 + int(sys.argv[2]), 0)
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
runner.generate(exported, params, nb[:1], seeds[:1])
t_first = time.perf_counter() - t0
times = []
for i in range(1, len(nb)):
  t0 = time.perf_counter()
  runner.generate(exported, params, nb[i:i + 1], seeds[i:i + 1])
  times.append(time.perf_counter() - t0)
print(json.dumps({"load_s": t_load, "first_image_s": t_first,
                  "seconds_per_image": sorted(times)[len(times) // 2],
                  "peak_rss_mib": hwm()}))
"""


# The architectures of the benchmark's baseline runs (configs/bench/default.py).
BASELINES = {"full": {"ch_mult": (1, 2, 4), "num_res_blocks": 3}}


def one_thread_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # measure a cold start, as on a device
  return env


def measure(export_dir: Path, repeats: int) -> dict:
  cmd = [sys.executable, "-c", MEASURE, str(export_dir), str(repeats)]
  if shutil.which("taskset"):
    cmd = ["taskset", "-c", "0"] + cmd
  r = subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, timeout=3600)
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def random_variant(parts, variant: str):
  """parts with the denoiser replaced by `variant`'s architecture, random weights."""
  import jax
  import flax.linen as nn
  from rissole_jax.defaults import VARIANTS
  from rissole_jax.models import make_denoiser, unet
  c = parts.config.copy_and_resolve_references()
  VARIANTS[variant](c)
  c.model.update(**BASELINES.get(variant, {}))
  shape = tuple(parts.stats["latent_shape"])
  model = make_denoiser(c, shape)
  x, t, cond = unet.init_inputs(model, shape, int(parts.stats["k"]), 1)
  params = nn.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, t, **cond))()["params"])
  return dataclasses.replace(parts, config=c, model=model, params=params)


def set_sample(config, items) -> None:
  """KEY=VALUE sample settings into config.sample, typed as the defaults are."""
  with config.unlocked():
    for item in items:
      key, _, value = item.partition("=")
      old = config.sample[key]
      config.sample[key] = (value.lower() == "true") if isinstance(old, bool) else type(old)(value)


def run(parts, out: Path, modes, repeats: int, baseline: str | None, say=print,
        versus=()) -> dict:
  from rissole_jax.inference import quantize as qz
  from rissole_jax.inference import stablehlo
  rows = []
  others = []
  for v in versus:
    c = parts.config.copy_and_resolve_references()
    set_sample(c, [x for x in v.split(",") if x])
    others.append(dataclasses.replace(parts, config=c))
  # interleaved: each mode for the --set settings, then for each --versus
  todo = [(parts.config.model.variant, p, m) for m in modes for p in (parts, *others)]
  if baseline:
    todo.append((baseline, random_variant(parts, baseline), "none"))
  for name, p, mode in todo:
    with tempfile.TemporaryDirectory() as d:
      m = stablehlo.export_stablehlo(p, d, quantize=mode, platforms=("cpu",), say=say)
      row = {"model": name, "quantize": mode, "sampler": m["sampler"],
             "nfe_per_image": m["nfe_per_image"],
             "denoiser_mb": m["bytes"]["denoiser"] / 1e6, "decoder_mb": m["bytes"]["decoder"] / 1e6,
             "database_mb": m["bytes"]["database"] / 1e6, "program_mb": m["bytes"]["program"] / 1e6,
             "denoiser_float32_mb": qz.param_bytes(p.params) / 1e6,
             "decoder_float32_mb": qz.param_bytes(qz.decoder_params(p.ae.params)) / 1e6,
             **measure(Path(d), repeats)}
    rows.append(row)
    say(json.dumps(row))
    from rissole_jax.files import atomic_write_json
    atomic_write_json(out, {"rows": rows})
  return {"rows": rows}


def main(argv=None) -> int:
  from rissole_jax.inference.configs import load_config
  from rissole_jax.inference.loading import load_workdir
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--config", default=None,
                 help="config FILE[:ARG] (default: the one the workdir was made with)")
  p.add_argument("--modes", default="none,int8_weights,int8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--baseline", default=None)
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--versus", action="append", default=[],
                 help="other sample settings measured beside, e.g. sampler=distilled,steps=4")
  a = p.parse_args(argv)
  config = load_config(a.workdir, a.config)
  set_sample(config, a.set)
  run(load_workdir(a.workdir, config), Path(a.out), a.modes.split(","), a.repeats, a.baseline,
      versus=a.versus)
  return 0


if __name__ == "__main__":
  sys.exit(main())
