"""Samples a trained model into PNG files.

  python -m rissole_jax.sample --workdir DIR --num 64 --out OUT
  python -m rissole_jax.sample --model FILE --num 64 --out OUT --sampler ddim --steps 50
  python -m rissole_jax.sample --workdir DIR --sampler distilled --steps 4 --out OUT   (after python -m rissole_jax.distill)
  python -m rissole_jax.sample --model FILE --variations me.png cat.jpg --num 8 --out OUT
  python -m rissole_jax.sample --model FILE --database folder:~/photos --out OUT
  python -m rissole_jax.sample --model FILE --inpaint digit.png --keep top --num 8 --out OUT
  python -m rissole_jax.sample --model mnist --outpaint digit.png --canvas 2,3 --at 0,0 --out OUT

--model takes a model file or the name of a model shipped in the package
("mnist": the default main job's; rissole_jax/pretrained); an existing file
of that name wins, and the command says which it loaded.

Writes one PNG per image (OUT/sample_00000.png, or OUT/variation_III_JJ.png
for variations of input III, OUT/inpaint_III_JJ.png for completions,
OUT/outpaint_JJ.png for outpaintings) and a grid (OUT/grid.png; for
inpainting each row is input | mask | completions; for outpainting, the
input on its canvas (grey: to generate) | outpaintings), and prints where.
Settings left out come from the model's config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rissole_jax.sample", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a finished run's folder (python -m rissole_jax.main ...)")
  src.add_argument("--model", help="a model file (python -m rissole_jax.export ...) or a shipped "
                                   "model's name (mnist)")
  p.add_argument("--out", required=True, help="folder for the PNG files (created)")
  p.add_argument("--num", type=int, default=64,
                 help="images to make; with --variations, per input image (default 64)")
  p.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
  p.add_argument("--sampler", help="ddpm, ddim, dpmpp (DPM-Solver++) or distilled (a student "
                                   "of python -m rissole_jax.distill) (default: the model's config)")
  p.add_argument("--steps", type=int, help="sampling steps (DDIM, DPM-Solver++, a distilled "
                                           "student's count; default: the config's)")
  p.add_argument("--eta", type=float,
                 help="DDIM noise: 0 deterministic, 1 ancestral (default: the config's)")
  p.add_argument("--guidance", type=float,
                 help="classifier-free guidance scale; 1 is none (needs a model trained "
                      "with diffusion.cond_dropout > 0)")
  p.add_argument("--order", type=int, help="DPM-Solver++ order (1-3; default: the config's)")
  p.add_argument("--spacing", help="timestep spacing: time_uniform, logsnr, time_quadratic or "
                                   "trailing")
  p.add_argument("--quantize", choices=("none", "int8_weights", "int8"), default=None,
                 help="int8 denoiser and decoder (default: the config's sample.quantize)")
  p.add_argument("--t_break", type=float,
                 help="LEGO models: the fraction of the trajectory run without the skipped "
                      "bricks (sample.skip; 0 runs every brick)")
  p.add_argument("--batch_size", type=int, help="images per compiled batch (default: the config's)")
  p.add_argument("--database",
                 help="retrieve from another database: folder:PATH, a folder path, or a "
                      "dataset name (mnist_embedded, celeb_a, ...); encoded once and cached")
  p.add_argument("--variations", nargs="+", metavar="IMG",
                 help="image files to make variations of ('more like this')")
  p.add_argument("--inpaint", nargs="+", metavar="IMG",
                 help="image files to complete: the blocks --keep names are kept, the rest "
                      "generated (--num completions each)")
  p.add_argument("--keep", default="top",
                 help="with --inpaint: top, bottom, left or right (half the block grid), or a "
                      "mask image of the input's size (white: kept; rounded to blocks)")
  p.add_argument("--outpaint", metavar="IMG",
                 help="an image file to extend: placed at --at on a canvas of --canvas blocks, "
                      "the rest generated (--num outpaintings)")
  p.add_argument("--canvas", default=None,
                 help="with --outpaint: the canvas in blocks, ROWS,COLS (default: one more "
                      "column of blocks than the model's grid)")
  p.add_argument("--at", default="0,0",
                 help="with --outpaint: the block ROW,COL of the canvas the image's top-left "
                      "block goes to (default 0,0)")
  p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
  from rissole_jax.runtime import cache
  cache.add_flag(p)
  return p.parse_args(argv)


def _mask_file(path: str, size: int) -> np.ndarray:
  """A mask image -> bool (size, size): white (>= 128 after greyscale) is kept."""
  from PIL import Image
  from rissole_jax.errors import ConfigError
  from rissole_jax.inference.editing import SHORTHANDS
  if not Path(path).is_file():
    raise ConfigError(f"--keep {path!r}: not one of {SHORTHANDS} and not a mask image file.")
  with Image.open(path) as im:
    return np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) >= 128


def _pair(text: str, flag: str) -> tuple[int, int]:
  from rissole_jax.errors import ConfigError
  try:
    a, b = (int(v) for v in text.split(","))
  except ValueError:
    raise ConfigError(f"{flag} {text!r}: give two integers, ROWS,COLS (e.g. 2,3).") from None
  return a, b


def load_model(args):
  """The Sampler of --workdir or --model (a file, else a shipped name) and
  what was loaded, in words."""
  from rissole_jax import pretrained
  from rissole_jax.errors import DataError
  from rissole_jax.inference.sampler import Sampler
  if args.workdir:
    return Sampler.from_workdir(args.workdir), f"the workdir {args.workdir}"
  if Path(args.model).exists() or args.model not in pretrained.MODELS:
    if not Path(args.model).exists():
      raise DataError(f"--model {args.model!r}: no such model file, and no shipped model of "
                      f"that name (shipped: {', '.join(pretrained.MODELS)}). Fix: give a model "
                      "file (python -m rissole_jax.export ...) or a shipped name.")
    return Sampler.load(args.model), f"the model file {args.model}"
  return (Sampler.pretrained(args.model),
          f"the shipped model {args.model!r} ({pretrained.path(args.model)})")


def _on_canvas(s, image_path, canvas, at) -> np.ndarray:
  """The input placed on its canvas, grey where the canvas is to be generated."""
  from rissole_jax.data.images import to_model_images
  size, ch = s.image_shape[0], s.image_shape[2]
  gh, gw = s.config.blocks.grid
  bh, bw = size // gh, size // gw
  out = np.full((canvas[0] * bh, canvas[1] * bw, ch), 128, np.uint8)
  out[at[0] * bh:at[0] * bh + size, at[1] * bw:at[1] * bw + size] = to_model_images(
      [image_path], size, ch)[0]
  return out


def _with_inputs(s, inputs, keep, images) -> np.ndarray:
  """Rows of input | mask (kept blocks white) | completions, for the grid."""
  from rissole_jax.data.images import to_model_images
  from rissole_jax.inference import editing
  size, ch = s.image_shape[0], s.image_shape[2]
  originals = to_model_images(inputs, size, ch)
  pix = editing.latent_mask(editing.block_mask(keep, s.config.blocks.grid, size), (size, size))
  mask = np.broadcast_to((pix * 255).astype(np.uint8)[..., None], (size, size, ch))
  rows = [np.stack([o, mask, *row]) for o, row in zip(originals, images)]
  return np.stack(rows)


def main(argv=None) -> int:
  args = parse(argv)
  from rissole_jax.runtime import cache
  from rissole_jax.inference import pictures
  cache.enable_compilation_cache(args.no_compilation_cache)
  from rissole_jax.errors import RissoleError
  out = Path(args.out)
  try:
    if args.num < 1:
      raise RissoleError(f"--num {args.num}: ask for at least one image.")
    s, loaded = load_model(args)
    print(f"loaded {loaded}")
    s = s.quantized(args.quantize or s.config.sample.quantize)
    if args.database:
      s = s.with_database(args.database, progress=not args.no_progress)
    kw = dict(seed=args.seed, sampler=args.sampler, steps=args.steps, eta=args.eta,
              order=args.order, spacing=args.spacing,
              guidance=args.guidance, t_break=args.t_break, batch_size=args.batch_size,
              progress=not args.no_progress)
    if sum(bool(a) for a in (args.variations, args.inpaint, args.outpaint)) > 1:
      raise RissoleError("--variations, --inpaint and --outpaint: give one of them.")
    if args.outpaint:
      gh, gw = s.config.blocks.grid
      canvas = _pair(args.canvas, "--canvas") if args.canvas else (gh, gw + 1)
      at = _pair(args.at, "--at")
      images = s.outpaint(args.outpaint, canvas, at, num_per_image=args.num, **kw)
      names = [f"outpaint_{j:02d}.png" for j in range(len(images))]
      shown = np.stack([_on_canvas(s, args.outpaint, canvas, at), *images])[None]
    elif args.inpaint:
      from rissole_jax.inference.editing import SHORTHANDS
      keep = args.keep if args.keep in SHORTHANDS else _mask_file(args.keep, s.image_shape[0])
      images = s.inpaint(args.inpaint, keep, num_per_image=args.num, **kw)
      names = [f"inpaint_{i:03d}_{j:02d}.png" for i in range(images.shape[0])
               for j in range(images.shape[1])]
      shown = _with_inputs(s, args.inpaint, keep, images)
    elif args.variations:
      images = s.variations(args.variations, num_per_image=args.num, **kw)
      names = [f"variation_{i:03d}_{j:02d}.png" for i in range(images.shape[0])
               for j in range(images.shape[1])]
    else:
      images = s.sample(args.num, **kw)
      names = [f"sample_{i:05d}.png" for i in range(len(images))]
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  grid = s.grid(shown if args.inpaint or args.outpaint else images)
  flat = images.reshape(-1, *images.shape[-3:])
  for name, image in zip(names, flat):
    pictures.save_png(out / name, image)
  grid_path = out / "grid.png"
  pictures.save_png(grid_path, np.asarray(grid).reshape(grid.size[1], grid.size[0], -1))
  print(f"wrote {len(flat)} images to {out}/ ({names[0]} ...) and the grid {grid_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
