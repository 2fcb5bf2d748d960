"""Inpainting measured on held-out digits (issue 25): complete one part of
each image from the other and ask the evaluate stage's classifier whether the
completion is still the same digit.

  python -m rissole_jax.benchmarks.editing --workdir W [--num 500] [--keep top,left] \
      [--out runs/editing.json] [--picture runs/editing.png]
  python -m rissole_jax.benchmarks.editing --model mnist --outpaint_picture runs/outpaint.png

--outpaint_picture draws, for the first 6 held-out digits, the digit on a
canvas one block column wider on each side (grey: to generate) and three
outpaintings (Sampler.outpaint), and measures nothing else.

For each `keep` (inference/editing.block_mask), the first --num held-out
digits are completed once each (seed 0) and scored:
  label_agreement        the classifier's label of the completion equals the
                         digit's true label (chance: about 0.1 on MNIST);
  baseline_agreement     the same for ordinary samples (the simplest baseline:
                         nothing kept, neighbours from pseudo-queries);
  kept_pixel_error       mean |completion - VQ-GAN reconstruction| (0..255)
                         over the kept blocks' pixels (not 0: the decoder
                         mixes positions), against missing_pixel_error over
                         the generated ones;
  distinct_completions   the share of pixels that differ between two
                         completions of the same digit (seeds 0 and 1);
  mask_seam_score        metrics/seams.mask_seam_score: the seam where kept
                         meets generated blocks, over the real digits' at the
                         same line (1.0: as in real data), and the same for
                         the plain reconstructions (the decoder's own share);
  *_retrieval_only       for a model that couples blocks (program.couples_blocks),
                         label agreement and seam when the kept blocks do not
                         enter the trajectory (Sampler.inpaint(follow=False)).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run(workdir, num: int, keeps, seed: int = 0, picture=None) -> dict:
  from rissole_jax.data import to_float, to_uint8
  from rissole_jax.inference import editing
  from rissole_jax.inference.program import couples_blocks
  from rissole_jax.inference.sampler import Sampler
  from rissole_jax.metrics import seams
  from rissole_jax.metrics.protocol import Protocol
  s = Sampler.from_workdir(workdir)
  proto = Protocol(s.config)
  held, labels = proto.held[:num], proto.held_labels[:num]
  if (labels < 0).any():
    raise SystemExit("the held-out split has no labels: label agreement cannot be measured.")
  clf = proto.clf
  recon = to_uint8(s.ae.decode(s.ae.encode(to_float(held))))
  base = s.sample(len(held), seed=seed, progress=False)
  out = {"workdir": str(workdir), "num": int(len(held)), "seed": seed,
         "baseline_agreement": float((clf.probs(base).argmax(-1) == labels).mean())}
  grids = []
  for keep in keeps:
    a = s.inpaint(held, keep, num_per_image=1, seed=seed, progress=False)[:, 0]
    b = s.inpaint(held[:64], keep, num_per_image=1, seed=seed + 1, progress=False)[:, 0]
    mask = editing.block_mask(keep, s.config.blocks.grid, held.shape[1])
    pix = editing.latent_mask(mask, held.shape[1:3])     # the block mask over the pixels
    err = np.abs(a.astype(np.float32) - recon.astype(np.float32))[..., 0]
    out[keep] = {
        "label_agreement": float((clf.probs(a).argmax(-1) == labels).mean()),
        "kept_pixel_error": float(err[:, pix].mean()),
        "missing_pixel_error": float(err[:, ~pix].mean()),
        "distinct_completions": float((a[:64] != b).mean()),
        # Seams where kept meets generated, against the real digits' at the
        # same line (1.0: as in real data); the reconstructions' for scale.
        "mask_seam_score": seams.mask_seam_score(a, held, s.config.blocks.grid, mask),
        "mask_seam_score_reconstruction": seams.mask_seam_score(recon, held,
                                                                s.config.blocks.grid, mask),
    }
    if couples_blocks(s.model):   # the same without following the kept blocks
      r = s.inpaint(held, keep, num_per_image=1, seed=seed, progress=False, follow=False)[:, 0]
      out[keep].update({
          "label_agreement_retrieval_only": float((clf.probs(r).argmax(-1) == labels).mean()),
          "mask_seam_score_retrieval_only": seams.mask_seam_score(r, held, s.config.blocks.grid,
                                                                  mask)})
    grids.append((keep, a[:8]))
  if picture:
    _picture(picture, held[:8], grids)
  return out


def _picture(path, originals, grids) -> None:
  """Rows: originals, then each keep's completions."""
  from PIL import Image
  rows = [np.concatenate(list(originals), 1)] + [np.concatenate(list(g), 1) for _, g in grids]
  img = np.concatenate(rows, 0)[..., 0]
  Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)


def outpaint_picture(s, path, num: int = 6, per: int = 3, seed: int = 0) -> None:
  """Rows: a held-out digit on its canvas (grey: generated), then `per` outpaintings."""
  from PIL import Image
  from rissole_jax.data import HELDOUT, load_source
  gh, gw = s.config.blocks.grid
  canvas, at = (gh, gw + 2), (0, 1)
  held = load_source(s.config.data, HELDOUT).get(np.arange(num))[0]
  size = s.image_shape[0]
  bw = size // gw
  rows = []
  for img in held:
    placed = np.full((size, size + 2 * bw, img.shape[-1]), 128, np.uint8)
    placed[:, bw:bw + size] = img
    wide = s.outpaint(img, canvas, at, num_per_image=per, seed=seed, progress=False)
    gap = np.full((size, 4, img.shape[-1]), 255, np.uint8)
    rows.append(np.concatenate([placed, gap] + [x for w in wide for x in (w, gap)][:-1], 1))
  out = np.concatenate(rows, 0)[..., 0]
  Image.fromarray(out).resize((out.shape[1] * 2, out.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir")
  src.add_argument("--model", help="a model file or a shipped name (with --outpaint_picture)")
  ap.add_argument("--outpaint_picture", default=None)
  ap.add_argument("--num", type=int, default=500)
  ap.add_argument("--keep", default="top,left")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  ap.add_argument("--picture", default=None)
  a = ap.parse_args(argv)
  if a.outpaint_picture:
    from rissole_jax import pretrained
    from rissole_jax.inference.sampler import Sampler
    s = (Sampler.from_workdir(a.workdir) if a.workdir else Sampler.pretrained(a.model)
         if a.model in pretrained.MODELS and not Path(a.model).exists() else Sampler.load(a.model))
    outpaint_picture(s, a.outpaint_picture, seed=a.seed)
    return
  result = run(Path(a.workdir), a.num, [k.strip() for k in a.keep.split(",") if k.strip()],
               a.seed, a.picture)
  text = json.dumps(result, indent=1)
  print(text)
  if a.out:
    from rissole_jax.files import atomic_write_json
    atomic_write_json(Path(a.out), result)


if __name__ == "__main__":
  main()
