"""bfloat16 activations (`model.dtype`) against float32, under the evaluation
protocol: the same default model trained both ways.

  python -m rissole_jax.benchmark --config configs/bench/bf16.py \
      --out runs/bf16.json --config.base.evaluate.inception=off

The baseline row `default` is the default main job (link its workdir's
stages into runs/bf16.d/default to reuse it); the bf16 row retrains the
denoiser on the same VQ-GAN, latents and index (the runner links them).
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.baseline = "default"
  c.runs = [("default", {}), ("bf16", {"model.dtype": "bfloat16"})]
  c.samplers = ()
  c.timing_batch = 32
  c.timing_batches = 1
  return c
