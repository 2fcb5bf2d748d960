"""Writes a trained model for use elsewhere.

  python -m rissole_jax.export --workdir DIR --out FILE [--weights int8]
      one file with everything sampling needs (rissole_jax/inference/modelfile.py); load
      it with Sampler.load(FILE) or python -m rissole_jax.sample --model FILE
  python -m rissole_jax.export --format stablehlo --workdir DIR --out EXPORT_DIR
      [--quantize int8] [--sampler ddim --steps 10 ...] [--platforms cpu,cuda,tpu]
      the whole sampler as a jax.export program with its parameters and
      database (rissole_jax/inference/stablehlo.py); python EXPORT_DIR/run.py EXPORT_DIR
      runs it with only jax and numpy (docs/deploy.md)
"""
from __future__ import annotations

import argparse
import sys

_SETTINGS = (("sampler", str), ("steps", int), ("eta", float), ("guidance_scale", float),
             ("order", int), ("spacing", str))


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rissole_jax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a finished run's folder (stages vqgan, encode, index, "
                                     "diffusion done)")
  src.add_argument("--model", help="a model file (for --format stablehlo)")
  p.add_argument("--out", required=True,
                 help="the model file (e.g. mnist.rissole), or the export folder for stablehlo")
  p.add_argument("--format", choices=("model", "stablehlo"), default="model")
  p.add_argument("--weights", choices=("float32", "int8"), default="float32",
                 help="model file: how the weights are stored; int8 keeps every conv/dense "
                      "kernel as int8 with a float32 scale per output channel (a quarter of "
                      "the bytes, read back as float32; docs/pretrained.md measures the cost)")
  p.add_argument("--quantize", choices=("none", "int8_weights", "int8"),
                 help="stablehlo: int8 parameters (default: the config's sample.quantize)")
  p.add_argument("--platforms",
                 help="stablehlo: platforms to lower for, e.g. cpu,cuda; each one given must "
                      "lower, or the export fails saying why (default: try cpu, cuda and tpu "
                      "and skip, naming them, those JAX cannot lower for here)")
  for name, kind in _SETTINGS:
    p.add_argument(f"--{name}", type=kind,
                   help=f"stablehlo: sample.{name} baked into the program (default: the config's)")
  from rissole_jax.runtime import cache
  cache.add_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  from rissole_jax.runtime import cache
  cache.enable_compilation_cache(args.no_compilation_cache)
  from rissole_jax.errors import RissoleError
  from rissole_jax.inference.sampler import Sampler
  try:
    if args.format == "model" and not args.workdir:
      raise RissoleError("--format model needs --workdir (a model file is already one).")
    s = Sampler.from_workdir(args.workdir) if args.workdir else Sampler.load(args.model)
    if args.format == "stablehlo":
      return _stablehlo(s, args)
    sizes = s.save(args.out, weights=args.weights)
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


def _stablehlo(s, args) -> int:
  import json
  from rissole_jax.inference import stablehlo
  with s.config.unlocked():
    for name, _ in _SETTINGS:
      if getattr(args, name) is not None:
        s.config.sample[name] = getattr(args, name)
  platforms = None if args.platforms is None else tuple(
      p.strip().lower() for p in args.platforms.split(",") if p.strip())
  m = stablehlo.export_stablehlo(s, args.out, quantize=args.quantize, platforms=platforms)
  print(f"wrote {args.out}/ (run: python {args.out}/run.py {args.out} --num 8 --out pngs/)")
  print(json.dumps({k: m[k] for k in ("platforms", "quantize", "bytes", "nfe_per_image")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
