"""Cross-block seam score: are the block boundaries of generated images visible?

For an image generated as a gh x gw grid of latent blocks, each pixel block is
(H / gh) x (W / gw). The raw ratio is
  mean |difference of adjacent pixels across a block boundary|
  / mean |difference of adjacent pixels inside a block|,
pooled over all images and both directions. Real images have their own ratio
(content is not uniform over the image: MNIST digits sit in the middle, where
the boundaries of a 2x2 grid are), so the score divides the samples' ratio by
the real images' one: 1.0 means seams as invisible as in real data, above 1
means visible seams.
"""
from __future__ import annotations

import numpy as np


def _pixel_blocks(shape, grid) -> tuple[int, int]:
  h, w = shape[1], shape[2]
  gh, gw = grid
  if h % gh or w % gw:
    raise ValueError(f"a {gh}x{gw} block grid does not divide {h}x{w} images")
  return h // gh, w // gw


def boundary_ratio(images: np.ndarray, grid) -> float:
  """The raw ratio for uint8 or float images (N, H, W, C)."""
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  bh, bw = _pixel_blocks(x.shape, grid)
  across = inside = 0.0
  n_across = n_inside = 0
  for axis, block in ((1, bh), (2, bw)):
    diff = np.abs(np.diff(x, axis=axis))  # pairs (i, i+1) along the axis
    # Pair i straddles a boundary when i+1 is a multiple of the block size.
    boundary = (np.arange(1, x.shape[axis]) % block) == 0
    b, i = np.compress(boundary, diff, axis=axis), np.compress(~boundary, diff, axis=axis)
    across, n_across = across + b.sum(), n_across + b.size
    inside, n_inside = inside + i.sum(), n_inside + i.size
  if n_across == 0:
    raise ValueError(f"a {tuple(grid)} grid has no block boundaries: nothing to measure")
  return float((across / n_across) / max(inside / max(n_inside, 1), 1e-12))


def seam_score(samples: np.ndarray, real: np.ndarray, grid) -> float:
  """The samples' boundary ratio over the real images' one (1.0: as in real data)."""
  return boundary_ratio(samples, grid) / boundary_ratio(real, grid)


def mask_boundary_ratio(images: np.ndarray, grid, mask: np.ndarray) -> float:
  """The raw ratio with only the block boundaries between a kept and a
  generated block (mask: bool (gh, gw), True where kept) counted as
  "across"; "inside" is every pair within a block, as in boundary_ratio."""
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  bh, bw = _pixel_blocks(x.shape, grid)
  mask = np.asarray(mask, bool)
  if mask.shape != tuple(grid):
    raise ValueError(f"mask {mask.shape} is not the {tuple(grid)} grid")
  H, W = x.shape[1], x.shape[2]
  across = inside = 0.0
  n_across = n_inside = 0
  for axis, block, other in ((1, bh, np.arange(W) // bw), (2, bw, np.arange(H) // bh)):
    diff = np.abs(np.diff(x, axis=axis))
    pairs = np.arange(1, x.shape[axis])
    boundary = (pairs % block) == 0
    before, after = pairs // block - 1, pairs // block   # the blocks a boundary pair joins
    m = mask if axis == 1 else mask.T      # rows along `axis`, columns along the other
    flip = boundary[:, None] & (m[before][:, other] != m[after][:, other])   # (pairs, other)
    keep = ~boundary
    d = diff if axis == 1 else np.swapaxes(diff, 1, 2)
    across += d[:, flip].sum()
    n_across += int(flip.sum()) * d.shape[0] * d.shape[-1]
    inside += d[:, keep].sum()
    n_inside += d[:, keep].size
  if n_across == 0:
    raise ValueError("the mask has no boundary between kept and generated blocks")
  return float((across / n_across) / max(inside / max(n_inside, 1), 1e-12))


def mask_seam_score(completions: np.ndarray, originals: np.ndarray, grid, mask) -> float:
  """Seams where kept meets generated: the completions' mask_boundary_ratio
  over the original (real) images' at the same boundary (1.0: as in real data)."""
  return mask_boundary_ratio(completions, grid, mask) / mask_boundary_ratio(originals, grid, mask)


def shuffle_blocks(images: np.ndarray, grid, seed: int = 0) -> np.ndarray:
  """Each block position filled from a different random image: seams by design
  (the test case, and a calibration point for the score)."""
  x = np.array(images)
  bh, bw = _pixel_blocks(x.shape, grid)
  rng = np.random.default_rng(seed)
  out = x.copy()
  for i in range(grid[0]):
    for j in range(grid[1]):
      src = rng.permutation(len(x))
      out[:, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = x[src, i * bh:(i + 1) * bh,
                                                           j * bw:(j + 1) * bw]
  return out
