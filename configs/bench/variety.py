"""Screening the levers of the samples' variety (issue 24; the diagnosis is
`python -m rissole_jax.benchmarks.variety`, docs/RESULTS.md "Where the
variety goes"): the default main job against rows that change one lever.

  python -m rissole_jax.benchmark --config configs/bench/variety.py \
      --out runs/variety.json --config.base.evaluate.inception=off

Link the main job's workdir as `<out>.d/rissole` (the baseline row is the main
job). The condition-dropout rows share one trained denoiser (the runner links
it): `dropout` samples it unguided, the `dropout_g*` rows with classifier-free
guidance below 1 (towards the unconditional model: more variety) and above
1 (less). `steps2400` trains twice as long (the loss still falls at 1,200);
the `pp_` rows add per-position weights (the matrix's other recall lever).
Each row trains at most one denoiser; the VQ-GAN, latents and index are the
baseline's.
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config

DROPOUT = {"diffusion.cond_dropout": 0.1}
PER_POSITION = {"model.block_map": "vmap", "model.share_weights": False}


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.baseline = "rissole"
  c.runs = [
      ("rissole", {}),
      ("dropout", DROPOUT),
      ("dropout_g0.5", {**DROPOUT, "sample.guidance_scale": 0.5}),
      ("dropout_g0.8", {**DROPOUT, "sample.guidance_scale": 0.8}),
      ("dropout_g1.5", {**DROPOUT, "sample.guidance_scale": 1.5}),
      ("dropout_g2", {**DROPOUT, "sample.guidance_scale": 2.0}),
      ("dropout_g3", {**DROPOUT, "sample.guidance_scale": 3.0}),
      # Guidance in half the trajectory (sample.guidance_interval): the
      # high-noise half (t/T >= 0.5, where the layout is decided) or the
      # low-noise half; one pass at the other steps.
      *[(f"dropout_g{g}_{half}", {**DROPOUT, "sample.guidance_scale": g,
                                  "sample.guidance_interval": interval})
        for g in (1.5, 2, 3) for half, interval in (("hi", (0.5, 1.0)), ("lo", (0.0, 0.5)))],
      # The high-noise side won: where it should start, and how strong.
      *[(f"dropout_g{g}_from{lo}", {**DROPOUT, "sample.guidance_scale": g,
                                    "sample.guidance_interval": (lo, 1.0)})
        for g, lo in ((3, 0.3), (3, 0.7), (4, 0.5), (6, 0.5), (4, 0.7))],
      ("steps2400", {"diffusion.train.steps": 2400}),
      # The two recall levers together: per-position weights and guidance 1.5.
      ("pp_dropout", {**PER_POSITION, **DROPOUT}),
      ("pp_dropout_g1.5", {**PER_POSITION, **DROPOUT, "sample.guidance_scale": 1.5}),
  ]
  c.samplers = ()      # quality rows: no separate timing runs
  c.timing_batch = 32
  c.timing_batches = 1
  return c
