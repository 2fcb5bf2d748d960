"""Steps against quality: DDIM and DPM-Solver++ (and quantized models) on a
trained workdir, read only.

  python -m rissole_jax.benchmarks.solvers --config configs/mnist.py \
      --workdir /work/runs/default --out docs/solvers \
      [--steps 5,10,20,50,100] [--num 256] [--solvers ddim:eta=1,dpmpp:order=2] \
      [--quantize none,int8_weights,int8] [--inception]

For each solver, step count and quantization mode it samples --num images from
the same pseudo-queries and starting keys as the sample stage, scores them
with the evaluate stage's protocol (classifier FD, precision, recall with
95% intervals and the real-data floor; Inception FID with --inception),
and times the sampler after compiling it (images/s on all cores). Rows are
saved to OUT/solvers.json after each one, so an interrupted run resumes;
OUT/solvers.md (a table) and OUT/solvers.png (FD against network
evaluations) are rewritten at the end.

A solver is NAME[:key=value;...]: ddim (eta), dpmpp (order, spacing,
lower_order_final), ddpm (steps ignored).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rissole_jax.files import atomic_write_bytes, atomic_write_json
from rissole_jax.runtime import host

DEFAULT_SOLVERS = ("ddim:eta=0", "ddim:eta=1", "dpmpp:order=2;spacing=logsnr",
                   "dpmpp:order=2;spacing=time_uniform", "dpmpp:order=3;spacing=logsnr")
# The target: at most this many network evaluations ...
TARGET_NFE = 20
# ... within this fraction of the reference's classifier FD.
TARGET_REL = 0.10
REFERENCE = ("ddim:eta=1", 100, "none")   # today's default


def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define --config and --out too, and may be imported with this one)."""
  config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file [:variant].")
  flags.DEFINE_string("workdir", None, "A trained workdir (read only).")
  flags.DEFINE_string("out", "docs/solvers", "Where the JSON, table and plot go.")
  flags.DEFINE_list("steps", ["5", "10", "20", "50", "100"], "Step counts.")
  flags.DEFINE_list("solvers", list(DEFAULT_SOLVERS), "Solvers (see the docstring).")
  flags.DEFINE_list("quantize", ["none"], "Quantization modes.")
  flags.DEFINE_list("quantize_at", [], "Only these 'solver@steps' get the quantized "
                    "modes (default: every row).")
  flags.DEFINE_integer("num", 256, "Images per row.")
  flags.DEFINE_integer("batch", 128, "Images per sampler call.")
  flags.DEFINE_bool("inception", False, "Also Inception FID (slow on a CPU).")


# ---------------------------------------------------------------------------
# The sampler's program, over a row's settings.

def make_sample_fn(model, schedule, config, decode_fn, stats):
  """fn(params, ae_params, nb, key) -> (latents, images) with config.sample's
  settings: the Sampler's program (rissole_jax/inference/program.py)."""
  from rissole_jax.inference import program
  settings = program.Settings.from_config(config.sample)
  fn = program.make_sample_fn(model, schedule, config.diffusion.prediction, settings, decode_fn,
                              stats, program.skip_plan(model, config, settings))
  return lambda params, ae_params, nb, key: fn(params, ae_params, nb, key, 0)


def parse_solver(spec: str) -> dict:
  """'dpmpp:order=2;spacing=logsnr' -> {'sampler': 'dpmpp', 'order': 2, ...}."""
  name, _, rest = spec.partition(":")
  out: dict = {"sampler": name}
  for item in filter(None, rest.split(";")):
    k, _, v = item.partition("=")
    out[k] = v if k == "spacing" else (v.lower() == "true" if k == "lower_order_final" else
                                       float(v) if k in ("eta", "clip_x0") else int(v))
  return out


def sample_config(config, spec: str, steps: int, quantize: str = "none"):
  c = config.copy_and_resolve_references()
  c.sample.update(steps=int(steps), quantize=quantize, **parse_solver(spec))
  return c


# ---------------------------------------------------------------------------
# One row.

def generate(parts, config, nb_lat, batch: int, key):
  """uint8 images for normalised neighbour latents nb_lat (n, k, h, w, c), and
  (compile seconds, sampling seconds)."""
  from rissole_jax.data.pipeline import to_uint8
  from rissole_jax.diffusion import solvers
  solvers.check_config(config.sample, config.diffusion.timesteps)
  from rissole_jax.inference import quantize as qz
  model, params, decode_fn, ae_params = parts.model, parts.params, parts.ae.decode_fn, parts.ae.params
  t0 = time.perf_counter()
  if config.sample.quantize != "none":
    q = qz.quantize_parts(parts, config.sample.quantize)
    model, params, decode_fn, ae_params = q.model, q.params, q.decode_fn, q.ae_params
  else:
    ae_params = qz.decoder_params(ae_params)   # what the sampler stores: the decoder only
  sizes = {"denoiser_mb": qz.param_bytes(params) / 1e6, "decoder_mb": qz.param_bytes(ae_params) / 1e6,
           "quantize_seconds": time.perf_counter() - t0}
  fn = make_sample_fn(model, parts.schedule, config, decode_fn, parts.stats)
  n = len(nb_lat)
  bs = min(batch, n)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, ae_params, nb_lat[:bs], key).compile()
  t_compile = time.perf_counter() - t0
  images, t_run = [], 0.0
  for b, s in enumerate(range(0, n, bs)):
    ids = np.arange(s, s + bs) % n   # static shape; the tail wraps
    t0 = time.perf_counter()
    _, img = compiled(params, ae_params, nb_lat[ids], jax.random.fold_in(key, b))
    img = np.asarray(img)
    t_run += time.perf_counter() - t0
    images.append(img[:min(bs, n - s)])
  return to_uint8(np.concatenate(images)), t_compile, t_run, sizes


class Scorer:
  """A row's quality with the evaluate stage's protocol (metrics/protocol.py):
  classifier FD, precision and recall against the fixed reference, with
  their 95% intervals and the real-data floor at the row's n; Inception FID
  against the same reference with --inception."""

  def __init__(self, config, inception: bool):
    from rissole_jax.metrics.protocol import Protocol
    self.protocol = Protocol(config)
    self.seed = int(config.seed)
    self.net = None
    if inception:
      from rissole_jax.metrics import inception as inc
      ev = config.evaluate
      self.net = inc.InceptionFeatures(inc.find_weights(ev.get("inception_weights")),
                                       ev.inception_batch)
      self.i_ref = self.net(self.protocol.reference_images)

  def __call__(self, images) -> dict:
    from rissole_jax.metrics import frechet
    m, _ = self.protocol.score(images, self.seed)
    out = {"n_scored": self.protocol.scored_n(len(images))}
    for key in ("fd", "precision", "recall"):
      out.update({f"classifier_{key}{s}": m[key + s] for s in ("", "_lo", "_hi") if key + s in m})
      out[f"floor_{key}"] = m["floor"][key]["mean"]
    if self.net is not None:
      out["inception_fid"] = frechet.frechet_distance_features(self.i_ref, self.net(images))
    return out


def row_key(spec: str, steps: int, quantize: str) -> str:
  return f"{spec}@{steps}#{quantize}"


def nfe(config, model) -> int:
  from rissole_jax.inference import program
  return program.nfe(program.Settings.from_config(config.sample), config, model)


# ---------------------------------------------------------------------------
# Table and plot.

def reference_fd(rows: list[dict]) -> float | None:
  spec, steps, q = REFERENCE
  for r in rows:
    if (r["solver"], r["steps"], r["quantize"]) == (spec, steps, q):
      return r["classifier_fd"]
  return None


def meets_target(rows: list[dict]) -> list[dict]:
  """Float rows at <= TARGET_NFE network evaluations within TARGET_REL of the
  reference's classifier FD, fastest first."""
  ref = reference_fd(rows)
  if ref is None:
    return []
  ok = [r for r in rows if r["quantize"] == "none" and r["nfe"] <= TARGET_NFE
        and r["classifier_fd"] <= ref * (1 + TARGET_REL)]
  return sorted(ok, key=lambda r: -r["images_per_sec"])


def markdown(rows: list[dict], meta: dict) -> str:
  ref = reference_fd(rows)
  has_fid = any("inception_fid" in r for r in rows)
  head = ["solver", "steps", "NFE", "quantize", "classifier FD [95%]", "recall [95%]"]
  head += ["vs DDIM-100 η=1"] if ref else []
  head += ["Inception FID"] if has_fid else []
  head += ["images/s", "compile s", "denoiser MB", "decoder MB"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in sorted(rows, key=lambda r: (r["quantize"], r["solver"], r["steps"])):
    cells = [r["solver"].replace("|", "/"), str(r["steps"]), str(r["nfe"]), r["quantize"],
             _with_interval(r, "classifier_fd"), _with_interval(r, "classifier_recall")]
    if ref:
      cells.append(f"{100 * (r['classifier_fd'] / ref - 1):+.1f}%")
    if has_fid:
      cells.append(f"{r['inception_fid']:.2f}" if "inception_fid" in r else "")
    cells += [f"{r['images_per_sec']:.1f}", f"{r['compile_seconds']:.1f}",
              f"{r['denoiser_mb']:.3f}" if "denoiser_mb" in r else "",
              f"{r['decoder_mb']:.3f}" if "decoder_mb" in r else ""]
    lines.append("| " + " | ".join(cells) + " |")
  ok = meets_target(rows)
  verdict = (f"\nMeets the target (≤{TARGET_NFE} NFE, classifier FD within "
             f"{int(100 * TARGET_REL)}% of DDIM-100 η=1 = {ref:.3f}): "
             + (", ".join(f"{r['solver']} @ {r['steps']}" for r in ok) or "none") + "\n"
             if ref else "")
  floors = next((r for r in rows if "floor_fd" in r), None)
  info = ((f"\nReal-data floor at this n: classifier FD {floors['floor_fd']:.3f}, recall "
           f"{floors['floor_recall']:.3f}.\n" if floors else "")
          + f"\n{meta.get('num')} images per row, batch {meta.get('batch')}, "
          f"{meta.get('devices')} ({meta.get('cpu')}).\n")
  return "\n".join(lines) + "\n" + verdict + info


def _with_interval(r: dict, key: str) -> str:
  if key not in r:
    return ""
  if f"{key}_lo" not in r:
    return f"{r[key]:.3f}"
  return f"{r[key]:.3f} [{r[key + '_lo']:.3f}, {r[key + '_hi']:.3f}]"


def plot(rows: list[dict], path: Path) -> None:
  import io

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for spec in sorted({r["solver"] for r in rows if r["quantize"] == "none"}):
    rs = sorted((r for r in rows if r["solver"] == spec and r["quantize"] == "none"),
                key=lambda r: r["nfe"])
    a.plot([r["nfe"] for r in rs], [r["classifier_fd"] for r in rs], "o-", label=spec)
    b.plot([r["nfe"] for r in rs], [r["images_per_sec"] for r in rs], "o-", label=spec)
  ref = reference_fd(rows)
  if ref:
    a.axhline(ref * (1 + TARGET_REL), color="k", ls="--", lw=0.8,
              label=f"target: DDIM-100 η=1 +{int(100 * TARGET_REL)}%")
    a.axvline(TARGET_NFE, color="grey", ls=":", lw=0.8)
  for ax, y in ((a, "classifier FD (lower is better)"), (b, "images / s (CPU)")):
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
  a.set_yscale("log")
  a.legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------

def run(config, workdir, out: Path, solvers, steps_list, quant_modes, num: int, batch: int,
        inception: bool = False, quantize_at=(), say=print) -> list[dict]:
  from rissole_jax.diffusion.latents import normalise
  from rissole_jax.inference.loading import load_workdir
  from rissole_jax.inference.queries import pseudo_queries, query_neighbours
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "solvers.json"
  rows = json.loads(path.read_text())["rows"] if path.exists() else []
  done = {row_key(r["solver"], r["steps"], r["quantize"]) for r in rows}
  parts = load_workdir(workdir, config)
  queries = pseudo_queries(parts.db.neighbours, num, config.sample.pseudo_query, config.seed)
  nb_ids = query_neighbours(parts.db.neighbours, queries)
  latents = normalise(np.asarray(parts.db.latents, np.float32), parts.stats).astype(np.float32)
  nb_lat = latents[nb_ids]
  key = jax.random.PRNGKey(config.seed + 2)   # the sample stage's
  scorer = Scorer(config, inception)
  meta = {"num": num, "batch": batch, "devices": str(jax.devices()[0].platform),
          "cpu": host.cpu_name(), "workdir": str(workdir)}
  for spec in solvers:
    for steps in steps_list:
      for q in quant_modes:
        if q != "none" and quantize_at and f"{spec}@{steps}" not in quantize_at:
          continue
        k = row_key(spec, steps, q)
        if k in done or (spec.startswith("ddpm") and steps != steps_list[0]):
          continue
        c = sample_config(config, spec, steps, q)
        images, t_c, t_r, sizes = generate(parts, c, nb_lat, batch, key)
        row = {"solver": spec, "steps": int(steps), "quantize": q, "nfe": nfe(c, parts.model),
               "images_per_sec": num / t_r, "seconds_per_image": t_r / num,
               "compile_seconds": t_c, **sizes, **scorer(images)}
        rows.append(row)
        done.add(k)
        atomic_write_json(path, {"meta": meta, "rows": rows})
        say(json.dumps(row))
  atomic_write_bytes(out / "solvers.md", markdown(rows, meta).encode())
  plot(rows, out / "solvers.png")
  return rows


def main(argv):
  del argv
  F = flags.FLAGS
  if not F.workdir:
    raise app.UsageError("--workdir is required (a workdir whose vqgan, encode, index and "
                         "diffusion stages have finished).")
  run(F.config, F.workdir, Path(F.out), F.solvers, [int(s) for s in F.steps], F.quantize,
      F.num, F.batch, F.inception, tuple(F.quantize_at))


if __name__ == "__main__":
  define_flags()
  app.run(main)
