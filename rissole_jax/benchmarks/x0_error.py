"""How good is a trained denoiser's estimate of x0 at each timestep, and how
large do its deterministic samples come out? (Issue 26's diagnosis of the
probability-flow ODE.)

  python -m rissole_jax.benchmarks.x0_error --workdir DIR [--workdir DIR2 ...] \
      [--num 256] [--out FILE.json]

For each finished workdir: `num` held-out digits are encoded and their k
neighbours retrieved from the database (what a real image would be
conditioned on), normalised as in training; at timesteps spread over the
schedule, x_t = q_sample(x0, t, noise) with one fixed noise, and the
network's output is converted to (eps, x0) as the samplers convert it. Per
timestep: the relative x0 error E|x0_hat - x0|^2 / E|x0|^2, the relative eps
error E|eps_hat - eps|^2 (eps has unit variance), and std(x0_hat)/std(x0).
Then `num` samples of the same neighbours drawn by DDIM eta=1 and eta=0 (20
steps) and DPM-Solver++ 2M (10 steps): the std of the sampled latents
(normalised; the data's is 1 per channel by construction) says whether
deterministic samples come out too large.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

TIMESTEP_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
SAMPLERS = {"ddim_eta1_20": dict(sampler="ddim", eta=1.0, steps=20),
            "ddim_eta0_20": dict(sampler="ddim", eta=0.0, steps=20),
            "dpmpp2m_10": dict(sampler="dpmpp", order=2, eta=0.0, steps=10)}


def heldout_condition(s, num: int):
  """(normalised held-out latents (num, h, w, c), their neighbour ids (num, k))."""
  from rissole_jax.data import HELDOUT, load_source
  from rissole_jax.diffusion.latents import normalise
  src = load_source(s.config.data, HELDOUT)
  images = src.get(np.arange(min(num, len(src))))[0]
  z = s.encode_images(images)
  return normalise(z, s.stats).astype(np.float32), s.retrieve(z)


def x0_errors(s, z0: np.ndarray, ids: np.ndarray, seed: int = 0) -> list[dict]:
  """Per timestep (TIMESTEP_FRACTIONS of T): rel_x0, rel_eps, x0_scale."""
  import jax
  import jax.numpy as jnp
  from rissole_jax.diffusion import solvers
  from rissole_jax.diffusion.latents import normalise
  from rissole_jax.models import rows
  sched, pred = s.schedule, s.config.diffusion.prediction
  nb = jnp.asarray(normalise(s.db.latents[ids], s.stats).astype(np.float32))
  x0, cond = rows.model_inputs(s.model, jnp.asarray(z0), nb)
  noise = solvers.normal(jax.random.PRNGKey(seed), x0.shape)

  @jax.jit
  def at(params, t):
    tt = jnp.full((x0.shape[0],), t, jnp.int32)
    xt = sched.q_sample(x0, tt, noise)
    eps_hat, x0_hat = sched.to_eps_x0(pred, xt, tt, s.model.apply({"params": params}, xt, tt,
                                                                   **cond))
    return (jnp.mean(jnp.square(x0_hat - x0)) / jnp.mean(jnp.square(x0)),
            jnp.mean(jnp.square(eps_hat - noise)), jnp.std(x0_hat) / jnp.std(x0))
  out = []
  for f in TIMESTEP_FRACTIONS:
    t = min(int(round(f * sched.T)), sched.T - 1)
    rx, re, sc = (float(v) for v in at(s.params, t))
    out.append({"t": t, "rel_x0": rx, "rel_eps": re, "x0_scale": sc})
  return out


def sample_scales(s, ids: np.ndarray, seed: int = 0) -> dict:
  """{sampler: std of the sampled normalised latents} for the neighbour rows ids."""
  from rissole_jax.diffusion.latents import normalise
  out = {}
  for name, kw in SAMPLERS.items():
    settings = s.settings(**kw)
    _, z = s.generate(ids, seed=seed, settings=settings, progress=False, return_latents=True)
    out[name] = float(np.std(normalise(z, s.stats)))
  return out


def run(workdir: Path, num: int, seed: int) -> dict:
  from rissole_jax.inference.sampler import Sampler
  s = Sampler.from_workdir(workdir)
  z0, ids = heldout_condition(s, num)
  d = s.config.diffusion
  return {"workdir": str(workdir), "prediction": d.prediction, "schedule": d.schedule,
          "num": int(len(z0)), "seed": seed, "cpu": platform.processor() or platform.machine(),
          "per_timestep": x0_errors(s, z0, ids, seed), "sample_std": sample_scales(s, ids, seed)}


def table(results: list[dict]) -> str:
  head = "| t | " + " | ".join(f"{r['prediction']}/{r['schedule']} rel. x0 err, eps err, "
                                 "x0 scale" for r in results) + " |"
  lines = [head, "|---" * (len(results) + 1) + "|"]
  for i, row in enumerate(results[0]["per_timestep"]):
    cells = [f"{r['per_timestep'][i]['rel_x0']:.3g}, {r['per_timestep'][i]['rel_eps']:.3g}, "
             f"{r['per_timestep'][i]['x0_scale']:.3g}" for r in results]
    lines.append(f"| {row['t']} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("| sampled latents' std (data: 1) | " + " | ".join(
      f"{r['prediction']}/{r['schedule']}" for r in results) + " |")
  lines.append("|---" * (len(results) + 1) + "|")
  for name in SAMPLERS:
    lines.append(f"| {name} | " + " | ".join(f"{r['sample_std'][name]:.3g}" for r in results)
                 + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", action="append", required=True)
  ap.add_argument("--num", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  results = [run(Path(w), a.num, a.seed) for w in a.workdir]
  if a.out:
    from rissole_jax.files import atomic_write_json
    atomic_write_json(Path(a.out), results)
  print(table(results))
  print(json.dumps([{k: r[k] for k in ("workdir", "prediction", "schedule", "num")}
                    for r in results]))


if __name__ == "__main__":
  main()
