"""The sampling findings: one trained default model, sampled each way.

  python -m rissole_jax.benchmark --config configs/bench/sampling.py \
      --out runs/sampling.json

Every row is the main job's default config with sample-stage overrides only,
so the VQ-GAN, latents, index and denoiser fingerprints are the baseline's and
every row links them: only the sample and evaluate stages run (measured on a
2-core AVX2 CPU: 1.4 minutes at 20 steps quiet, 3.3 at 100 steps on a shared
CPU; tests/test_quality.py checks that the rows share the baseline's
upstream stages). Link the
main job's workdir as `<out>.d/ddim20` (the baseline row *is* the main job) and
nothing is trained. The evaluate stage scores each row's 2,000 samples with
intervals and the real-data floor, and the table marks which rows differ from
the baseline beyond the noise (docs/metrics.md).

`ddim3` is a deliberately damaged setting: the instrument must tell it apart.
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.baseline = "ddim20"
  c.runs = [
      ("ddim20", {}),                                    # the default: DDIM eta=1, 20 steps
      ("ddim10", {"sample.steps": 10}),
      ("ddim50", {"sample.steps": 50}),
      ("ddim100", {"sample.steps": 100}),
      ("ddim3", {"sample.steps": 3}),
      ("ddim20_eta0", {"sample.eta": 0.0}),
      ("dpmpp2_20", {"sample.sampler": "dpmpp", "sample.order": 2, "sample.eta": 0.0}),
      ("dpmpp2_10", {"sample.sampler": "dpmpp", "sample.order": 2, "sample.eta": 0.0,
                     "sample.steps": 10}),
      ("int8_weights", {"sample.quantize": "int8_weights"}),
      ("int8", {"sample.quantize": "int8"}),
  ]
  # Sampler throughput is the solvers and deploy benchmarks' business; these
  # rows compare quality, so no separate timing runs by default.
  c.samplers = ()
  c.timing_batch = 32
  c.timing_batches = 1
  return c
