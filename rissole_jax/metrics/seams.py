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
