"""Inception FID between two image sets, in pytorch-fid's command-line convention.

  python -m rissole_jax.fid PATH_A PATH_B [--weights FILE] [--batch-size N] [--kid]

Each PATH is a folder of images (its top-level .png/.jpg/.jpeg/.bmp/.webp/.tif
files, as pytorch-fid reads them), an .npy uint8 array (N, H, W[, C]), or an
.npz with precomputed 'mu' and 'sigma' (pytorch-fid's statistics files).
Grayscale images are repeated to 3 channels. Prints "FID:  <value>".
Weights are never downloaded; without them the message says how to install.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


def load_images(path: str | Path) -> np.ndarray | list[np.ndarray]:
  """uint8 images (N, H, W, 3) from a folder or (N, H, W, C) from an .npy.
  A folder with images of several sizes gives a list of per-size arrays."""
  path = Path(path)
  if path.suffix == ".npy":
    x = np.load(path)
    if x.dtype != np.uint8:
      raise ValueError(f"{path}: expected uint8 images, got {x.dtype} (scale to 0..255 first)")
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"{path}: expected (N, H, W[, 1|3]) images, got shape {x.shape}")
    return x
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is neither a folder of images nor an .npy/.npz file")
  from PIL import Image
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {path}")
  by_size: dict[tuple, list] = {}
  for f in files:
    with Image.open(f) as im:
      a = np.asarray(im.convert("RGB"))
    by_size.setdefault(a.shape, []).append(a)
  groups = [np.stack(v) for v in by_size.values()]
  return groups[0] if len(groups) == 1 else groups


def features_of(path, net) -> np.ndarray:
  images = load_images(path)
  groups = images if isinstance(images, list) else [images]
  return np.concatenate([net(g) for g in groups])


def statistics_of(path, net):
  """(features or None, mu, sigma)."""
  from rissole_jax.metrics.frechet import statistics
  if Path(path).suffix == ".npz":
    with np.load(path) as z:
      return None, z["mu"], z["sigma"]
  f = features_of(path, net)
  return (f, *statistics(f))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rissole_jax.fid", description=__doc__.split("\n")[0])
  ap.add_argument("paths", nargs=2, metavar="PATH", help="folder, .npy images or .npz statistics")
  ap.add_argument("--weights", default=None, help="Inception weights file (TorchScript "
                  "inception-2015-12-05.pt or pytorch-fid's pt_inception-*.pth)")
  ap.add_argument("--batch-size", type=int, default=50)
  ap.add_argument("--kid", action="store_true", help="also print KID (needs images, not .npz)")
  args = ap.parse_args(argv)

  from rissole_jax.errors import RissoleError
  from rissole_jax.metrics.frechet import frechet_distance, frechet_distance_features, kid
  from rissole_jax.metrics.inception import InceptionFeatures
  try:
    net = InceptionFeatures(args.weights, args.batch_size)
    fa, mu_a, sig_a = statistics_of(args.paths[0], net)
    fb, mu_b, sig_b = statistics_of(args.paths[1], net)
  except RissoleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if fa is not None and fb is not None:
    value = frechet_distance_features(fa, fb)  # the same number, faster for small sets
  else:
    value = frechet_distance(mu_a, sig_a, mu_b, sig_b)
  print(f"FID:  {value}")
  if args.kid:
    if fa is None or fb is None:
      print("error: KID needs images on both sides, not .npz statistics", file=sys.stderr)
      return 1
    mean, std = kid(fa, fb)
    print(f"KID:  {mean} +- {std}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
