"""LEGO brick skipping (sample.skip.t_break) on one trained LEGO model, with
the evaluate stage's protocol: `:pg` skips PG's full-canvas brick over the
low-noise end of the trajectory, `:pr` PR's local brick over the high-noise
end (docs/lego.md).

  python -m rissole_jax.benchmark --config configs/bench/lego_skip.py:pg \
      --out runs/lego_skip_pg.json --config.base.evaluate.inception=off

Only the sample and evaluate stages run per row: link the trained LEGO
model's workdir (the bench matrix's `rissole_lego_pg` / `_pr` row) as
`<out>.d/t0`, the baseline row (no skipping). t_break = 1 skips the brick
over the whole trajectory.
"""
import ml_collections as mlc

from rissole_jax.defaults import apply_variants, base_config

T_BREAKS = (0.5, 1.0)


def get_config(arg: str = "pg"):
  preset = (arg or "pg").strip()
  if preset not in ("pg", "pr"):
    raise ValueError(f"configs/bench/lego_skip.py:{arg}: use :pg or :pr")
  c = mlc.ConfigDict()
  c.base = apply_variants(base_config(), f"lego_{preset}")
  c.baseline = "t0"
  c.runs = [("t0", {})] + [(f"t{t:g}", {"sample.skip.t_break": t}) for t in T_BREAKS]
  c.samplers = ()      # quality rows; the skipping's speed is docs/RESULTS.md's interleaved timing
  c.timing_batch = 32
  c.timing_batches = 1
  return c
