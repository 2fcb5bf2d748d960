"""The per-layer int8 sensitivity of a trained denoiser (the library is
rissole_jax/inference/quantize.py).

  python -m rissole_jax.quantize --workdir DIR --out FILE.json [--mode int8_weights|int8]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rissole_jax.inference import quantize as qz


def main(argv=None) -> int:
  """python -m rissole_jax.quantize --workdir DIR --out FILE.json [--mode int8_weights|int8]
  [--config FILE] [--num 64]: each layer's solo quantization error, worst first."""
  import argparse
  from rissole_jax.diffusion.latents import normalise
  from rissole_jax.files import atomic_write_json
  from rissole_jax.inference.configs import load_config
  from rissole_jax.inference.loading import load_workdir
  p = argparse.ArgumentParser(description="Per-layer int8 sensitivity of a trained denoiser.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--config", default=None,
                 help="config FILE[:ARG] (default: the one the workdir was made with)")
  p.add_argument("--mode", default="int8_weights", choices=qz.MODES[1:])
  p.add_argument("--num", type=int, default=64)
  a = p.parse_args(argv)
  parts = load_workdir(a.workdir, load_config(a.workdir, a.config))
  lat = normalise(np.asarray(parts.db.latents, np.float32), parts.stats).astype(np.float32)
  calib = qz.calibration_inputs(parts.model, parts.schedule, lat, parts.db.neighbours, a.num)
  sens = qz.layer_sensitivity(parts.model, parts.params, calib, a.mode)
  sizes = {l: int(np.prod(np.shape(qz.get_path(parts.params, l)["kernel"]))) for l in sens}
  rows = sorted(({"layer": l, "relative_error": v, "kernel_params": sizes[l]} for l, v in sens.items()),
                key=lambda r: -r["relative_error"])
  atomic_write_json(Path(a.out), {"mode": a.mode, "calibration_images": a.num, "rows": rows})
  for r in rows[:10]:
    print(f"{r['layer']:40s} {r['relative_error']:.3e} ({r['kernel_params']} weights)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
