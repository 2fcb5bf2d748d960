"""Convergence: sample quality against training steps, for any backbone.

  python -m rissole_jax.benchmarks.convergence \
      --runs "U-Net=runs/unet,LEGO-PG=runs/lego_pg" --out docs/lego/convergence_fd.json \
      [--num 256] [--plot docs/lego/convergence_fd.png] [--losses]

Each run is a workdir whose diffusion stage kept several checkpoints (train
with e.g. --config.diffusion.train.ckpt_every=200
--config.diffusion.train.keep_checkpoints=7). For every kept checkpoint the
EMA denoiser samples `num` images with the workdir's own sampling settings
(the Sampler, same seed for every checkpoint) and the evaluate stage's
classifier scores them against its reference (metrics/protocol.py; with the
real-data floor's FD at that n): classifier FD, KID, precision, recall,
density and coverage per step, each with its 95% bootstrap interval,
with the memorisation figures (median nearest-training-image distance
ratio, near-copy fraction), since fast convergence can also mean copying.
Rows already in --out are kept, so an interrupted run resumes. `--losses`
adds the training-loss curve from each run's diffusion log to the plot.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from absl import app, flags

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  flags.DEFINE_list("runs", [], "NAME=WORKDIR pairs.")
  flags.DEFINE_string("out", None, "JSON file for the rows.")
  flags.DEFINE_integer("num", 256, "Samples per checkpoint.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every checkpoint).")
  flags.DEFINE_string("plot", None, "Draw the rows of --out to this PNG.")
  flags.DEFINE_bool("losses", False, "Add the training-loss panel to the plot.")


FLAGS = flags.FLAGS


def checkpoint_steps(root: Path) -> list[int]:
  d = Path(root) / "diffusion" / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def instrument(config):
  """The evaluate stage's protocol (metrics/protocol.py) for this config."""
  from rissole_jax.metrics.protocol import Protocol
  return Protocol(config)


def fd_curve(name: str, root: Path, num: int, seed: int, done: set) -> list[dict]:
  """Rows (step, classifier FD, ...) for each kept checkpoint of `root` not in `done`."""
  from rissole_jax.inference import loading
  from rissole_jax.inference.sampler import Sampler
  from rissole_jax.metrics import memorization
  from rissole_jax.store import checkpoints
  root = Path(root)
  s = Sampler.from_workdir(root)      # checks the stages; holds the final EMA
  proto = instrument(s.config)
  n = proto.scored_n(num)
  floor_fd = proto.floor(n)["fd"]["mean"]
  like = loading.abstract_denoiser_params(s.model, s.config, s.stats["latent_shape"],
                                          s.stats["k"], s.mesh)
  rows = []
  for step in checkpoint_steps(root):
    if step in done:
      continue
    s.params = checkpoints.restore_final(root / "diffusion", "diffusion", step, like, only="ema")
    images = s.sample(num, seed=seed, progress=False)
    m, _ = proto.score(images, seed)   # with 95% bootstrap intervals
    row = {"name": name, "run": str(root), "step": step, "num": num, "seed": seed,
           "sampler": s.config.sample.sampler, "steps": int(s.config.sample.steps),
           "n_scored": n, "floor_fd": floor_fd, "classifier_fd": m["fd"],
           "classifier_fd_lo": m["fd_lo"], "classifier_fd_hi": m["fd_hi"]}
    for k in ("kid", "precision", "recall", "density", "coverage"):
      row.update({k: m[k], f"{k}_lo": m[f"{k}_lo"], f"{k}_hi": m[f"{k}_hi"]})
    # Fast convergence could also mean copying the neighbours: say how close
    # the samples sit to their nearest training images.
    mem = memorization.memorization_metrics(images, proto.train, proto.held,
                                            s.config.evaluate.near_copy)
    row.update(memorisation_ratio=mem["median_ratio"], near_copies=mem["near_copy_fraction"])
    if proto.clf.task == "labels":
      row["confident"] = float((proto.clf.probs(images).max(-1) > s.config.evaluate.confidence).mean())
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def loss_curve(log: Path) -> tuple[list[int], list[float]]:
  """(steps, losses) from a diffusion stage's log.txt ("step N/M: ... loss X")."""
  pts = [(int(m[1]), float(m[2])) for m in
         re.finditer(r"step (\d+)/\d+: (?:[^\n]*? )?loss ([0-9.]+)", Path(log).read_text())]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(rows: list[dict], out: str, losses: dict[str, Path] | None = None) -> None:
  """Classifier FD against training steps (and, given logs, training loss)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = 2 if losses else 1
  fig, axes = plt.subplots(1, n, figsize=(6 * n, 3.8), squeeze=False)
  ax = axes[0][0]
  for name in dict.fromkeys(r["name"] for r in rows):
    pts = sorted((r["step"], r["classifier_fd"]) for r in rows if r["name"] == name)
    ax.plot(*zip(*pts), "o-", ms=4, label=name)
  ax.set_xlabel("training step (64 images)")
  ax.set_ylabel("classifier FD (lower is better)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  if losses:
    ax = axes[0][1]
    for name, log in losses.items():
      ax.plot(*loss_curve(log), "-", lw=1, label=name)
    ax.set_xlabel("training step (64 images)")
    ax.set_ylabel("training loss (the target's MSE; LEGO: mean over bricks)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def main(argv):
  del argv
  out = Path(FLAGS.out)
  rows = json.loads(out.read_text())["rows"] if out.exists() else []
  runs = dict(p.split("=", 1) for p in FLAGS.runs)
  for name, root in runs.items():
    done = {r["step"] for r in rows if r["name"] == name}
    for row in fd_curve(name, Path(root), FLAGS.num, FLAGS.seed, done):
      rows.append(row)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps({"rows": rows}, indent=1))
  if FLAGS.plot:
    runs = runs or {r["name"]: r["run"] for r in rows}
    logs = ({n: Path(r) / "diffusion" / "log.txt" for n, r in runs.items()}
            if FLAGS.losses else None)
    plot(rows, FLAGS.plot, logs)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("out")
  app.run(main)
