"""Does a host keep up? The training input (data/loader.py) measured alone
and feeding the default VQ-GAN step, against data.workers, on the embedded
digits, a folder of generated 256x256 JPEGs and tfds array_record of the
same JPEGs; then, from the paper-scale configs' FLOPs and published chip
peaks, the images/s a TPU v5e host and a GPU host would need, against the
per-core decode rate measured here.

  python -m rissole_jax.benchmarks.input --config configs/bench/input.py \
      --out runs/input.json

Settings are interleaved over `rounds` and medians reported; loader start-up
and the step's compile are outside the timed span (loader.WARMUP elements
first). Writes the JSON and a markdown table next to it (docs/performance.md
has the table and the arithmetic).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rissole_jax.benchmarks.input_data import BENCH_TFDS, PHOTO_SIZES, make_data
from rissole_jax.data import loader, sources
from rissole_jax.data.pipeline import TrainStream
from rissole_jax.files import atomic_write_bytes, atomic_write_json
from rissole_jax.runtime.host import cpu_name

# Hosts for the estimates (Google Cloud machine types): TPU v5e hosts carry
# 4 chips and 112 vCPUs (ct5lp-hightpu-4t) or 8 chips and 224 vCPUs (-8t);
# an 8-GPU H100 host has 208 vCPUs (a3-highgpu-8g). Peaks: benchmarks/peaks.py.
HOSTS = {"TPU v5e host (4 chips, 112 vCPUs)": ("TPU v5 lite", 4, 112),
         "GPU host (8 H100, 208 vCPUs)": ("H100", 8, 208)}


def train_source(cfg, name: str, where: dict):
  """The training split of a dataset at the base config's image size."""
  d = cfg.base.data
  if name == "embedded":
    return sources.load_source(d, "train")
  if name == "folder":
    return sources.FolderSource(where["folder"], "train", d.image_size, d.channels, 0.0)
  if name == "array_record":
    return sources.TfdsSource(BENCH_TFDS, "train", str(where["tfds"]), d.image_size, d.channels)
  raise ValueError(f"unknown dataset {name!r} (embedded, folder, array_record)")


# ---------------------------------------------------------------------------
# Measures.

def _elements(read, count: int, workers, prefetch: int, put=None):
  """(iterator, stats function, loader or None) for a setting; "sync" reads
  in the loop (the stages' loop before the loader)."""
  if workers == "sync":
    waits = []

    def gen():
      for k in range(count):
        t0 = time.perf_counter()
        el = read(k)
        el = put(el) if put else el
        waits.append(time.perf_counter() - t0)
        yield el
    return gen(), lambda span: {"input_wait_share": sum(waits[loader.WARMUP + 1:]) / span}, None
  it = loader.Loader(read, count, int(workers), prefetch, put)
  return it, lambda span: it.stats(), it


def measure_loader(stream: TrainStream, workers, batches: int, prefetch: int = 2) -> dict:
  """Images/s of the loader alone over `batches` batches after the warm-up."""
  it, _, closer = _elements(loader.StreamBatches(stream), loader.WARMUP + 1 + batches,
                            workers, prefetch)
  try:
    for i, _ in enumerate(it):
      if i == loader.WARMUP:
        t0 = time.perf_counter()
    span = time.perf_counter() - t0
  finally:
    if closer:
      closer.close()
  return {"images_per_second": batches * stream.global_batch / span}


def measure_step(setup, stream: TrainStream, workers, batches: int, mesh, rules,
                 prefetch: int = 2) -> dict:
  """Images/s and input_wait_share of the loader feeding the VQ-GAN step."""
  import jax

  from rissole_jax.runtime import parallel
  put = (lambda el: parallel.put_batch(el["image"], mesh, rules))
  it, stats, closer = _elements(loader.StreamBatches(stream), loader.WARMUP + 1 + batches,
                                workers, prefetch, put)
  state = setup.state
  try:
    for i, images in enumerate(it):
      if i == loader.WARMUP:
        jax.block_until_ready(state)
        t0 = time.perf_counter()
      state, metrics = setup.trainer.step(state, setup.key, images)
      if closer:
        closer.busy_until(metrics["rec_loss"])
    jax.block_until_ready(state)
    span = time.perf_counter() - t0
  finally:
    if closer:
      closer.close()
  setup.state = state
  return {"images_per_second": batches * stream.global_batch / span,
          "input_wait_share": float(stats(span)["input_wait_share"])}


def measure_ceiling(setup, batches: int) -> float:
  """Images/s of the step fed one device batch over and over: no input at
  all, the most any loader can give."""
  import jax
  state = setup.state
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(batches):
    state, _ = setup.trainer.step(state, setup.key, setup.images)
  jax.block_until_ready(state)
  setup.state = state
  return batches * setup.batch / (time.perf_counter() - t0)


def decode_rates(cfg, where: dict) -> dict:
  """Images/s one core decodes at the paper-scale configs' 64x64x3: each
  photo size as the config reads it (CelebA's face crop, then resize;
  ImageNet at the JPEG draft scale, then resize)."""
  out = {}
  for name in PHOTO_SIZES:
    files = sorted(where[name].rglob("*.jpg"))
    crop = sources.CATALOGUE["celeb_a"]["crop"] if name.startswith("celeba") else None
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      for p in files:
        sources.decode_image(p, 64, 3, crop)
      times.append((time.perf_counter() - t0) / len(files))
    out[name] = 1.0 / statistics.median(times)
  return out


def step_flops(spec: str) -> dict:
  """FLOPs per image of a config's VQ-GAN train step and of its encoder
  (the encode stage), from XLA's cost analysis of the lowered programs."""
  import jax
  import jax.numpy as jnp

  from rissole_jax.benchmarks import throughput
  from rissole_jax.models import vqgan as vq
  from rissole_jax.train import vqgan
  from rissole_jax.runtime import parallel
  config = throughput.load_config(spec, [])
  b, s, c = 8, config.data.image_size, config.data.channels
  trainer = vqgan.build(config, parallel.make_mesh(config.mesh))
  images = jax.ShapeDtypeStruct((b, s, s, c), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  train = _flops(trainer.step.lower(trainer.abstract_state, key, images))
  enc = jax.jit(lambda p, x: trainer.model.apply({"params": p}, x, method=vq.VQModel.encode))
  encode = _flops(enc.lower(trainer.abstract_state["g_params"], images))
  return {"train_flops_per_image": train / b, "encode_flops_per_image": encode / b,
          "image_size": s, "batch_size": int(config.vqgan.train.batch_size)}


def _flops(lowered) -> float:
  ca = lowered.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def estimates(cfg, rates: dict, utilisation: float = 0.4) -> list[dict]:
  """Images/s per host the paper-scale VQ-GAN training would consume at
  `utilisation` of the chips' bf16 peak, and the vCPUs the measured decode
  rate needs for it."""
  from rissole_jax.benchmarks.peaks import peak_tflops
  rows = []
  for spec in cfg.estimate_configs:
    f = step_flops(spec)
    rate = rates["celeba-like 178x218" if "celeba" in spec else "imagenet-like 500x375"]
    for host, (kind, chips, vcpus) in HOSTS.items():
      peak = peak_tflops(kind, "bfloat16") * 1e12
      for stage, flops in (("vqgan train", f["train_flops_per_image"]),
                           ("encode", f["encode_flops_per_image"])):
        need = chips * peak * utilisation / flops
        rows.append({"config": spec, "host": host, "stage": stage,
                     "gflops_per_image": flops / 1e9, "needed_images_per_second": need,
                     "decode_per_core": rate, "cores_needed": need / rate, "vcpus": vcpus,
                     "keeps_up": need / rate <= vcpus - 2})
  return rows


def run(cfg, out: Path | None = None) -> dict:
  import jax

  from rissole_jax.benchmarks import vqgan_step
  tmp = None
  if cfg.data_dir:
    root = Path(os.path.expanduser(cfg.data_dir))
  else:
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
  t0 = time.perf_counter()
  where = make_data(cfg, root)
  made_s = time.perf_counter() - t0
  d, b = cfg.base.data, cfg.base.vqgan.train.batch_size
  mesh_setup = vqgan_step.setup(cfg.base)
  mesh, rules = mesh_setup.trainer.mesh, cfg.base.mesh.logical_axis_rules
  # Compile outside every timed span.
  mesh_setup.state, _ = mesh_setup.trainer.step(mesh_setup.state, mesh_setup.key, mesh_setup.images)
  jax.block_until_ready(mesh_setup.state)
  streams = {}
  for name in cfg.datasets:
    src = train_source(cfg, name, where)
    streams[name] = TrainStream(src, b, cfg.base.seed, cache=loader.cache_for("auto", src))
  raw, ceiling = {}, []
  for r in range(cfg.rounds):
    ceiling.append(measure_ceiling(mesh_setup, cfg.step_batches))
    print(f"round {r + 1}/{cfg.rounds} no input: {ceiling[-1]:.0f} images/s", flush=True)
    for name, stream in streams.items():
      for w in cfg.workers:
        if stream.cached and w not in ("sync", 0):
          continue  # in memory: no decode to spread over workers
        key = f"{name}|{w}"
        a = measure_loader(stream, w, cfg.loader_batches)
        s = measure_step(mesh_setup, stream, w, cfg.step_batches, mesh, rules)
        raw.setdefault(key, []).append({"loader": a["images_per_second"],
                                        "step": s["images_per_second"],
                                        "wait": s["input_wait_share"]})
        print(f"round {r + 1}/{cfg.rounds} {key}: loader {a['images_per_second']:.0f} images/s, "
              f"with the step {s['images_per_second']:.0f} images/s, "
              f"wait share {s['input_wait_share']:.3f}", flush=True)
  rows = []
  for key, runs in raw.items():
    name, w = key.split("|")
    rows.append({"dataset": name, "workers": w, "in_memory": streams[name].cached,
                 "loader_images_per_second": statistics.median(x["loader"] for x in runs),
                 "step_images_per_second": statistics.median(x["step"] for x in runs),
                 "input_wait_share": statistics.median(x["wait"] for x in runs),
                 "runs": runs})
  top = statistics.median(ceiling)
  for row in rows:  # against one synchronous reader of the same data, and no input
    sync = next((x for x in rows if x["dataset"] == row["dataset"] and x["workers"] == "sync"), None)
    if sync:
      row["loader_vs_sync"] = row["loader_images_per_second"] / sync["loader_images_per_second"]
    row["step_vs_no_input"] = row["step_images_per_second"] / top
  rates = decode_rates(cfg, where)
  result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jpegs": cfg.jpegs,
            "jpeg_size": cfg.jpeg_size, "image": f"{d.image_size}x{d.image_size}x{d.channels}",
            "batch": b, "rounds": cfg.rounds, "data_made_seconds": made_s,
            "no_input_images_per_second": top, "no_input_runs": ceiling, "rows": rows,
            "decode_per_core_64x64x3": rates, "estimates": estimates(cfg, rates)}
  if out is not None:
    atomic_write_json(out, result)
    atomic_write_bytes(out.with_suffix(".md"), table(result).encode())
  if tmp is not None:
    tmp.cleanup()
  return result


def table(result: dict) -> str:
  lines = [f"Input pipeline, {result['cpu']} ({result['cpu_count']} cores), "
           f"{result['devices']} {result['device_kind']} device(s); batches of "
           f"{result['batch']} at {result['image']}; medians of {result['rounds']} interleaved rounds.",
           f"The VQ-GAN step fed one batch over and over (no input): "
           f"{result['no_input_images_per_second']:.0f} images/s.",
           "", "| data | workers | loader images/s | × sync | with the VQ-GAN step, images/s "
           "| × no input | input_wait_share |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    data = r["dataset"] + (" (in memory)" if r["in_memory"] else "")
    lines.append(f"| {data} | {r['workers']} | {r['loader_images_per_second']:.0f} | "
                 f"{r.get('loader_vs_sync', float('nan')):.2f} | "
                 f"{r['step_images_per_second']:.0f} | {r['step_vs_no_input']:.2f} | "
                 f"{r['input_wait_share']:.3f} |")
  lines += ["", "Decode, one core, to 64x64x3: " + ", ".join(
      f"{k} {v:.0f} images/s" for k, v in result["decode_per_core_64x64x3"].items())]
  if result["estimates"]:
    lines += ["", "| config | host | stage | GFLOP/image | images/s needed at 40% of bf16 peak "
              "| cores to decode it | vCPUs | keeps up |", "|---|---|---|---|---|---|---|---|"]
    for e in result["estimates"]:
      lines.append(f"| {e['config']} | {e['host']} | {e['stage']} | {e['gflops_per_image']:.2f} | "
                   f"{e['needed_images_per_second']:,.0f} | {e['cores_needed']:.1f} | "
                   f"{e['vcpus']} | {'yes' if e['keeps_up'] else 'no'} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  out = Path(flags.FLAGS.out) if flags.FLAGS.out else None
  result = run(flags.FLAGS.config, out)
  print(table(result))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/bench/input.py", "Benchmark config.")
  flags.DEFINE_string("out", None, "Write the JSON here (and a .md table beside it).")
  app.run(main)
