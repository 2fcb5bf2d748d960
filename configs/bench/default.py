"""The default benchmark: RISSOLE against its baselines on the embedded data.

  python -m rissole_jax.benchmark --config configs/bench/default.py --out runs/bench.json

Each run is the main job's config plus overrides; runs that share upstream
stages (the VQ-GAN, the latents, the index) share their folders.
`:smoke` shrinks every run (the tests use it).
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  c.runs = [
      # name, {dotted config key: value}
      ("rissole", {}),
      ("full", {"model.variant": "full"}),
      ("blocks_only", {"model.variant": "blocks_only"}),
      ("rdm", {"model.variant": "rdm"}),
      ("rissole_grid4x4", {"blocks.grid": (4, 4)}),
      ("blocks_only_grid4x4", {"model.variant": "blocks_only", "blocks.grid": (4, 4)}),
      ("rissole_k1", {"retrieval.k": 1}),
      ("rissole_k5", {"retrieval.k": 5}),
      ("rissole_k20", {"retrieval.k": 20}),
      ("rissole_no_position", {"model.use_position": False}),
  ]
  # Sampling throughput is timed for each of these samplers (DDIM uses sample.steps).
  c.samplers = ("ddpm", "ddim")
  c.timing_batches = 3  # steady-state batches timed after the compile
  return c
