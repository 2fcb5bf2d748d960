"""The default benchmark: RISSOLE against its baselines on the embedded data.

  python -m rissole_jax.benchmark --config configs/bench/default.py --out runs/bench.json

Each run is the main job's config plus overrides; runs that share upstream
stages (the VQ-GAN, the latents, the index) share their folders, so the
matrix trains one VQ-GAN and one index per k.

Budget: every denoiser trains exactly as the main job does (1,200 steps of
64 images), so the `rissole` row is the main job itself (link its workdir
as `<out>.d/rissole` and it is reused). On a quiet 2-core CPU a run takes
about 10-13 minutes, the matrix about 2.5 hours: `--runs a,b` picks some.
(At half the budget the samples are much worse: classifier FD 101 against
28, so a shorter default would compare undertrained models.) `:smoke`
shrinks every run (the tests use it); variants combine with commas.

`full` is the plain latent diffusion model of the paper's comparison: one
U-Net on the whole latent, about 5x rissole's parameters (one more
resolution level, three residual blocks per level), so that the claim
"rissole with at most a quarter of full's parameters comes within 10% of
its FID" is tested as stated. `full_same_size` is the same design at
rissole's size.
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config


def get_config(arg: str = ""):
  names = [a for a in (arg or "").split(",") if a]
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), arg)
  # The row every other row is compared with, beyond the noise (docs/metrics.md).
  c.baseline = "rissole"
  c.runs = [
      # name, {dotted config key: value}
      ("rissole", {}),
      ("full", {"model.variant": "full", "model.ch_mult": (1, 2, 4), "model.num_res_blocks": 3}),
      ("blocks_only", {"model.variant": "blocks_only"}),
      ("rdm", {"model.variant": "rdm"}),
      ("rissole_grid4x4", {"blocks.grid": (4, 4)}),
      ("blocks_only_grid4x4", {"model.variant": "blocks_only", "blocks.grid": (4, 4)}),
      ("rissole_k1", {"retrieval.k": 1}),
      ("rissole_k5", {"retrieval.k": 5}),
      ("rissole_k20", {"retrieval.k": 20}),
      ("rissole_no_position", {"model.use_position": False}),
      ("full_same_size", {"model.variant": "full"}),
      # What sharing one set of weights over the blocks saves: one set per
      # block position (models/mapped.py), 4 x rissole's parameters (3,079,952
      # for the 2x2 grid) at the same FLOPs per example; docs/performance.md
      # has its quality (FD 19.65 vs 20.26 shared).
      ("rissole_per_position", {"model.block_map": "vmap", "model.share_weights": False}),
  ]
  # LEGO bricks (docs/lego.md) at their U-Net rows' parameter budgets:
  # rissole ~1.03M (presets at width 96/92: 1.03-1.09M), full ~5.15M
  # (width 184, 8 DiT blocks: 5.12M; U width 172, 9 blocks: 5.1M).
  for p, rw, fw, fd in (("pg", 96, 184, 8), ("pr", 96, 184, 8), ("u", 92, 172, 9)):
    lego = {"model.backbone": "lego", "model.lego.preset": p}
    c.runs.append((f"rissole_lego_{p}", {**lego, "model.lego.width": rw,
                                         "model.lego.emb_dim": rw}))
    c.runs.append((f"full_lego_{p}", {**lego, "model.variant": "full", "model.lego.width": fw,
                                      "model.lego.emb_dim": fw, "model.lego.depth": fd}))
  if "smoke" in names:  # the smoke denoiser has one level: keep `full` valid
    c.runs[1] = ("full", {"model.variant": "full", "model.num_res_blocks": 2})
  # Sampling throughput: for each sampler, a separate sample stage of
  # (timing_batches + 1) batches of timing_batch images on the same denoiser;
  # the first batch compiles and is not timed. DDIM uses sample.steps.
  c.samplers = ("ddpm", "ddim")
  c.timing_batch = 32
  c.timing_batches = 1
  return c
