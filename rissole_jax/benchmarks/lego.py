"""LEGO brick skipping: quality, FLOPs and sampling time against t_break.

  python -m rissole_jax.benchmarks.lego --config configs/mnist.py:lego_pg \
      --run DIR --out docs/lego/skip_pg.json [--t_breaks 0,0.2,0.4,0.6,0.8,1] \
      [--config.X=... as the run was trained]

DIR is a workdir whose diffusion stage trained a LEGO denoiser (give the same
config overrides it was trained with, or the workdir check refuses). For each
t_break, DIR/skip/t<t_break>/ links DIR's upstream stages and runs the sample
and evaluate stages with config.sample.skip.t_break set (the bricks and the
end come from the config: lego_pg skips the full-canvas brick at the
low-noise end, lego_pr its local brick at the high-noise end). Rows: the
sampler's network FLOPs (XLA cost analysis per compiled model x steps),
sample stage timing (first batch compiles and is not timed), classifier FD
and the other evaluate metrics. `--plot` also draws them (PNG).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  config_flags.DEFINE_config_file("config", None, "Config file [:variant].")
  flags.DEFINE_string("run", None, "Workdir of the trained LEGO model.")
  flags.DEFINE_string("out", None, "JSON file for the rows.")
  flags.DEFINE_list("t_breaks", ["0", "0.2", "0.4", "0.6", "0.8", "1.0"], "t_break values.")
  flags.DEFINE_list("canvas", [], "Instead of the sweep: sample a larger canvas "
                    "(latent rows,cols, e.g. 16,16) to --out (a folder).")
  flags.DEFINE_integer("timing", 0, "Instead of the sweep: time the compiled latent "
                       "sampler for every t_break, interleaved, this many rounds (median).")
  flags.DEFINE_string("plot", None, "Also draw every JSON given here (comma-separated) to this PNG.")


FLAGS = flags.FLAGS

UPSTREAM = ("vqgan", "encode", "index", "diffusion")


def flops_of(config, root: Path) -> dict:
  """Network FLOPs of the config's sampler for one sample batch."""
  import jax.numpy as jnp
  from rissole_jax.inference.loading import load_denoiser
  from rissole_jax.models import lego, unet
  model, params, stats = load_denoiser(config, root)
  B, k = int(config.sample.batch_size), int(stats["k"])
  nb = jnp.zeros((B, k, *stats["latent_shape"]), jnp.float32)
  x, cond = unet.model_inputs(model, nb[:, 0], nb)
  return lego.sampler_flops(model, params, config, x, cond)


def sweep(config, run: Path, t_breaks, out: Path) -> list[dict]:
  """Rows for each t_break, written to `out` after each one; rows already in
  `out` are kept and their t_breaks not redone (so a sweep can be resumed,
  or continued with other evaluate settings, e.g. Inception off)."""
  from rissole_jax import main
  name = f"{config.model.variant} LEGO-{config.model.lego.preset.upper()}"
  rows = json.loads(out.read_text())["rows"] if out.exists() else []
  for tb in t_breaks:
    if any(r["t_break"] == float(tb) for r in rows):
      continue
    root = run / "skip" / f"t{tb:g}"
    root.mkdir(parents=True, exist_ok=True)
    for s in UPSTREAM:
      if not (root / s).exists():
        os.symlink(run / s, root / s)
    c = config.copy_and_resolve_references()
    c.sample.skip.t_break = float(tb)
    res = main.run(c, root, only=("sample", "evaluate"), progress=False)
    f = flops_of(c, root)
    s, e = res["sample"], res["evaluate"]
    rows.append({"t_break": float(tb), "skip_bricks": list(c.sample.skip.bricks),
                 "skip_end": c.sample.skip.end, "gflops_per_batch": f["flops"] / 1e9,
                 "steps_reduced": 0 if tb <= 0 else (f["steps_low"] if c.sample.skip.end == "low"
                                                     else f["steps_high"]),
                 "seconds_per_batch": s["seconds_per_batch"], "samples_per_sec": s["samples_per_sec"],
                 "batch": int(c.sample.batch_size), "num": int(c.sample.num),
                 **{k: v for k, v in e.items() if not isinstance(v, str)}})
    print(json.dumps(rows[-1]))
    rows.sort(key=lambda r: r["t_break"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"name": name, "run": str(run), "rows": rows}, indent=1))
  return rows


def larger_canvas(config, run: Path, hw, out: Path, num: int = 64) -> dict:
  """Samples on a latent canvas `hw` larger than the training one (docs/lego.md
  says how blocks beyond the training grid get their position and neighbours),
  decoded by the (convolutional) VQ-GAN; a grid PNG and the seam scores."""
  import jax
  import jax.numpy as jnp
  from rissole_jax.data.pipeline import to_uint8
  from rissole_jax.diffusion.schedule import make_schedule
  from rissole_jax.metrics import seams
  from rissole_jax.models import lego
  from rissole_jax import retrieval
  from rissole_jax.diffusion.latents import denormalise, normalise
  from rissole_jax.inference import pictures
  from rissole_jax.inference.loading import load_denoiser
  from rissole_jax.inference.program import latents_fn
  from rissole_jax.inference.queries import pseudo_queries, query_neighbours
  from rissole_jax.models.autoencoder import load_autoencoder
  ae = load_autoencoder(config, run / "vqgan")
  model, params, stats = load_denoiser(config, run)
  db = retrieval.load_database(config, run, mmap=True)
  big = lego.for_canvas(model, hw, stats["latent_shape"][:2])
  queries = pseudo_queries(db.neighbours, num, "uniform", config.seed)
  latents = normalise(np.asarray(db.latents, np.float32), stats).astype(np.float32)
  nb = jnp.asarray(latents[query_neighbours(db.neighbours, queries)])
  nb_big = lego.canvas_neighbours(nb, hw)
  schedule = make_schedule(config.diffusion)
  fn = jax.jit(lambda p, nb, key: latents_fn(big, schedule, config)(p, nb, key))
  z = np.asarray(fn(params, nb_big, jax.random.PRNGKey(config.seed + 7)))
  images = to_uint8(ae.decode(denormalise(z, stats)))
  # Reference for the seam score: held-out reconstructions, bilinearly scaled
  # to the larger image size (their boundary ratio on the larger grid).
  held = np.asarray(ae.decode(np.asarray(db.heldout_latents[:256], np.float32)))
  real = to_uint8(np.asarray(jax.image.resize(held, (held.shape[0], *images.shape[1:]), "linear")))
  # Seams: of the blocks, or for `full` of the largest regions (a brick's
  # attention does not cross them).
  rmax = max(b[0][0] for b in big.bricks), max(b[0][1] for b in big.bricks)
  grid = big.grid if big.blocks else (hw[0] // rmax[0], hw[1] // rmax[1])
  out.mkdir(parents=True, exist_ok=True)
  pictures.save_png(out / "samples.png", pictures.tile(images, 8))
  row = {"canvas_latent": list(hw), "image": list(images.shape[1:3]), "grid": list(grid),
         "num": int(num), "seam_score": seams.seam_score(images, real, grid),
         "boundary_ratio": seams.boundary_ratio(images, grid),
         "boundary_ratio_real_scaled": seams.boundary_ratio(real, grid)}
  (out / "canvas.json").write_text(json.dumps(row, indent=1))
  np.save(out / "samples.npy", images)
  print(json.dumps(row))
  return row


def plot(paths, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for p in paths:
    rows = json.loads(Path(p).read_text())["rows"]
    name = json.loads(Path(p).read_text())["name"]
    tb = [r["t_break"] for r in rows]
    axes[0].plot(tb, [r["classifier/fd"] for r in rows], "o-", label=name)
    axes[1].plot(tb, [r["seconds_per_batch"] for r in rows], "o-", label=name)
    axes[2].plot(tb, [r["gflops_per_batch"] for r in rows], "o-", label=name)
  for ax, title in zip(axes, ("classifier FD (lower is better)", "seconds per batch",
                              "sampler GFLOP per batch")):
    ax.set_xlabel("t_break (fraction of the trajectory with bricks skipped)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def timing(config, run: Path, t_breaks, rounds: int, batch: int = 16) -> list[dict]:
  """Median seconds of the compiled latent sampler (no decode) per t_break.
  The t_breaks are timed in turn, `rounds` times, so that load changes on a
  shared machine spread over all of them instead of biasing one."""
  import time
  import jax
  from rissole_jax.diffusion.schedule import make_schedule
  from rissole_jax.inference.loading import load_denoiser
  from rissole_jax.inference.program import latents_fn
  from rissole_jax.models import unet
  model, params, stats = load_denoiser(config, run)
  schedule = make_schedule(config.diffusion)
  nb = jax.random.normal(jax.random.PRNGKey(0), (batch, stats["k"], *stats["latent_shape"]))
  fns, flops = {}, {}
  for tb in t_breaks:
    c = config.copy_and_resolve_references()
    c.sample.skip.t_break = float(tb)
    fns[tb] = jax.jit(lambda p, nb, k, c=c: latents_fn(model, schedule, c)(p, nb, k))
    jax.block_until_ready(fns[tb](params, nb, jax.random.PRNGKey(1)))   # compile
    x, cond = unet.model_inputs(model, nb[:, 0], nb)
    flops[tb] = lego_flops(model, params, c, x, cond)
  times = {tb: [] for tb in t_breaks}
  for r in range(rounds):
    for tb in t_breaks:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[tb](params, nb, jax.random.PRNGKey(2 + r)))
      times[tb].append(time.perf_counter() - t0)
  rows = [{"t_break": float(tb), "batch": batch, "rounds": rounds,
           "seconds_median": float(np.median(times[tb])), "seconds_min": float(np.min(times[tb])),
           "seconds": times[tb],
           "gflops": flops[tb] / 1e9} for tb in t_breaks]
  for r in rows:
    print(json.dumps(r))
  return rows


def lego_flops(model, params, config, x, cond) -> float:
  from rissole_jax.models import lego
  return lego.sampler_flops(model, params, config, x, cond)["flops"]


def table(paths) -> str:
  """Markdown rows of sweep JSONs: one per (model, t_break)."""
  cols = [("t_break", "t_break", "{:g}"), ("GFLOP/batch", "gflops_per_batch", "{:.1f}"),
          ("s/batch", "seconds_per_batch", "{:.1f}"), ("img/s", "samples_per_sec", "{:.2f}"),
          ("classifier FD", "classifier/fd", "{:.2f}"), ("FID", "inception/fid", "{:.2f}"),
          ("precision", "classifier/precision", "{:.3f}"), ("recall", "classifier/recall", "{:.3f}"),
          ("confident", "classifier/confident_fraction", "{:.3f}"),
          ("seam", "seam_score", "{:.3f}"), ("memorisation", "memorization/median_ratio", "{:.3f}")]
  lines = ["| model | " + " | ".join(c[0] for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for p in paths:
    d = json.loads(Path(p).read_text())
    for r in d["rows"]:
      vals = [f.format(r[k]) if k in r else "–" for _, k, f in cols]
      lines.append(f"| {d['name']} | " + " | ".join(vals) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.plot is None and FLAGS.run is None and FLAGS.out:
    print(table(FLAGS.out.split(",")))
    return
  if FLAGS.plot and not FLAGS.run:
    plot(FLAGS.out.split(","), FLAGS.plot)
    return
  config = FLAGS.config
  if FLAGS.timing:
    rows = timing(config, Path(FLAGS.run), [float(t) for t in FLAGS.t_breaks], FLAGS.timing)
    Path(FLAGS.out).write_text(json.dumps({"run": FLAGS.run, "rows": rows}, indent=1))
    return
  if FLAGS.canvas:
    larger_canvas(config, Path(FLAGS.run), tuple(int(v) for v in FLAGS.canvas), Path(FLAGS.out))
    return
  out = Path(FLAGS.out)
  sweep(config, Path(FLAGS.run), [float(t) for t in FLAGS.t_breaks], out)
  if FLAGS.plot:
    plot([str(out)], FLAGS.plot)


if __name__ == "__main__":
  define_flags()
  app.run(main)
