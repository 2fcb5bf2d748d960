"""Issue 26's first question: why do the deterministic samplers fail on the
default model, and which training target gives a probability-flow ODE good
enough for DDIM eta=0 at 20 steps and DPM-Solver++ 2M at 10 steps?

  python -m rissole_jax.benchmark --config configs/bench/ode.py \
      --out runs/ode.json --config.base.evaluate.inception=off

Each prediction target (eps: the default until this benchmark; v: the
default since; x0; v on the cosine schedule)
trains one denoiser, sampled three ways: DDIM eta=1 at 20 steps (the default
sampler), DDIM eta=0 at 20 steps and DPM-Solver++ 2M at 10 steps. The rows
that share a target share its trained denoiser (the runner links it); the
VQ-GAN, latents and index are the main job's. The baseline is the eps model
sampled as the default sampled it (DDIM eta=1, 20 steps): issue 26's
yardstick. The per-timestep x0
error behind the findings: `python -m rissole_jax.benchmarks.x0_error`.
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config

DDIM0 = {"sample.eta": 0.0}
DPM10 = {"sample.sampler": "dpmpp", "sample.order": 2, "sample.eta": 0.0, "sample.steps": 10}
TARGETS = {"eps": {"diffusion.prediction": "eps"}, "v": {"diffusion.prediction": "v"},
           "cosv": {"diffusion.prediction": "v", "diffusion.schedule": "cosine"},
           "x0": {"diffusion.prediction": "x0"}}


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.baseline = "eps_ddim1"
  c.runs = [(f"{name}_{how}", {**target, **extra}) for name, target in TARGETS.items()
            for how, extra in (("ddim1", {}), ("ddim0", DDIM0), ("dpm10", DPM10))]
  # DPM-Solver++ 2M at 10 steps lost fidelity (KID): uniform-in-logSNR steps
  # (the DPM-Solver authors' advice for unguided sampling) and 15 steps.
  c.runs += [
      ("v_dpm10_logsnr", {**TARGETS["v"], **DPM10, "sample.spacing": "logsnr"}),
      ("cosv_dpm10_logsnr", {**TARGETS["cosv"], **DPM10, "sample.spacing": "logsnr"}),
      ("v_dpm15", {**TARGETS["v"], **DPM10, "sample.steps": 15}),
  ]
  c.samplers = ()      # quality rows: no separate timing runs
  c.timing_batch = 32
  c.timing_batches = 1
  return c
