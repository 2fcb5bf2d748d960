"""Issue 26's curve: quality against network calls per image, for the
default model's teacher (DDIM eta=0 on the trailing grid, DPM-Solver++ 2M)
and each round of its progressive distillation (16 -> 8 -> 4 -> 2 -> 1).

  python -m rissole_jax.benchmark --config configs/bench/distill.py \
      --out runs/distill.json --config.base.evaluate.inception=off

Every row samples the same trained model (the runner links its stages: run
the main job into runs/distill.d/default first, or link its folders there);
the distilled rows share one distill stage. The baseline is the default
sampler (DDIM eta=1, 20 steps).
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config

DISTILL_STAGES = ("vqgan", "encode", "index", "diffusion", "distill", "sample", "evaluate")


def teacher(n: int) -> dict:
  """The undistilled model's ODE on the students' grid: DDIM eta=0, trailing."""
  return {"sample.eta": 0.0, "sample.steps": n, "sample.spacing": "trailing"}


def dpm(n: int) -> dict:
  return {"sample.sampler": "dpmpp", "sample.order": 2, "sample.eta": 0.0, "sample.steps": n,
          "sample.spacing": "logsnr"}


def student(n: int, eta: float = 0.0) -> dict:
  return {"stages": DISTILL_STAGES, "sample.sampler": "distilled", "sample.steps": n,
          "sample.eta": eta}


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.baseline = "default"
  c.runs = [("default", {})]
  c.runs += [(f"ddim0_{n}", teacher(n)) for n in (64, 32, 16, 8, 4, 2, 1)]
  c.runs += [(f"dpm_{n}", dpm(n)) for n in (8, 4)]
  c.runs += [(f"distilled_{n}", student(n)) for n in (8, 4, 2, 1)]
  # The student's x-estimate in an ancestral step (eta=1), as the default
  # sampler runs the teacher: the ODE's KID gap is the teacher's.
  c.runs += [(f"distilled_{n}_eta1", student(n, 1.0)) for n in (8, 4, 2)]
  c.runs += [("distilled_4_eta0.5", student(4, 0.5))]
  # Twice the training per round (to 4 steps only: 16 -> 8 -> 4 at 1.8x the
  # teacher's training time): does the last metric's gap close?
  c.runs += [(f"distilled_4_long{tag}", {**student(4, eta), "distill.train.steps": 600,
                                         "distill.min_steps": 4})
             for tag, eta in (("", 1.0), ("_eta0", 0.0))]
  c.samplers = ()      # quality rows: no separate timing runs
  c.timing_batch = 32
  c.timing_batches = 1
  return c
