"""Writes a trained model to one file that holds everything sampling needs.

  python -m rissole_jax.export --workdir DIR --out FILE

The file (see rissole_jax/modelfile.py) loads with `Sampler.load(FILE)` or
`python -m rissole_jax.sample --model FILE`, on any machine with rissole_jax.
"""
from __future__ import annotations

import argparse
import sys


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rissole_jax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True,
                 help="a finished run's folder (stages vqgan, encode, index, diffusion done)")
  p.add_argument("--out", required=True, help="the model file to write (e.g. mnist.rissole)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  from rissole_jax.errors import RissoleError
  from rissole_jax.sampler import Sampler
  try:
    sizes = Sampler.from_workdir(args.workdir).save(args.out)
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  mib = lambda b: f"{b / 2**20:.2f} MiB"
  print(f"wrote {args.out}: {mib(sizes['total'])}")
  for name, size in sizes.items():
    if name not in ("total", "database_as_float32_latents"):
      print(f"  {name:28s} {mib(size)}")
  codes = sizes["database/codes.npy"]
  print(f"  the database as codes: {mib(codes)}, as float32 latents it would be "
        f"{mib(sizes['database_as_float32_latents'])} ({sizes['database_as_float32_latents'] / codes:.1f}x)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
