"""Editing by blocks: which blocks of an image to keep, neighbours found
from the kept blocks alone, and the order outpainting fills a larger canvas
in (numpy only; `Sampler.inpaint` and `Sampler.outpaint` use them).

A block mask is bool (gh, gw) over the latent's block grid (blocks.py), True
where the user's image is kept. `block_mask` accepts:
  * a shorthand: "top", "bottom", "left", "right" (that half of the grid's
    rows or columns; with an odd count, the half rounds down, at least one),
  * a bool/0-1 array of the grid's shape (gh, gw),
  * a pixel mask of the image's shape (H, W): a block is kept when at least
    half of its pixels are (the rounding rule, so that a hand-drawn mask
    keeps the blocks it mostly covers).
"""
from __future__ import annotations

import numpy as np

from rissole_jax.errors import ConfigError, DataError

SHORTHANDS = ("top", "bottom", "left", "right")


def block_mask(keep, grid, image_size: int) -> np.ndarray:
  """The documented block mask for `keep` (see the module docstring)."""
  gh, gw = int(grid[0]), int(grid[1])
  if isinstance(keep, str):
    if keep not in SHORTHANDS:
      raise ConfigError(f"Unknown keep {keep!r}: use one of {SHORTHANDS}, a bool array of the "
                        f"block grid's shape {(gh, gw)}, or a pixel mask of {(image_size,) * 2}.")
    m = np.zeros((gh, gw), bool)
    rows, cols = max(1, gh // 2), max(1, gw // 2)
    if keep == "top":
      m[:rows] = True
    elif keep == "bottom":
      m[gh - rows:] = True
    elif keep == "left":
      m[:, :cols] = True
    else:
      m[:, gw - cols:] = True
  else:
    a = np.asarray(keep)
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
      raise ConfigError("keep must be bool (or 0/1): True where the image is kept.")
    a = a.astype(bool)
    if a.shape == (gh, gw):
      m = a
    elif a.shape == (image_size, image_size):
      if image_size % gh or image_size % gw:
        raise ConfigError(f"a pixel mask of {a.shape} cannot be rounded to a {gh}x{gw} grid.")
      share = a.reshape(gh, image_size // gh, gw, image_size // gw).mean(axis=(1, 3))
      m = share >= 0.5
    else:
      raise ConfigError(f"keep has shape {a.shape}: give the block grid's {(gh, gw)} or the "
                        f"image's {(image_size, image_size)} (a pixel mask), or one of "
                        f"{SHORTHANDS}.")
  if m.all():
    raise ConfigError("keep keeps every block: nothing is left to generate. Fix: keep fewer "
                      "blocks (e.g. keep='top').")
  if not m.any():
    raise ConfigError("keep keeps no block: that is plain sampling. Fix: use Sampler.sample, "
                      "or keep some blocks (e.g. keep='top').")
  return m


def latent_mask(mask: np.ndarray, latent_shape) -> np.ndarray:
  """The block mask spread over a latent (or image) of (h, w): bool (h, w)."""
  gh, gw = mask.shape
  h, w = int(latent_shape[0]), int(latent_shape[1])
  return np.repeat(np.repeat(mask, h // gh, 0), w // gw, 1)


def masked_neighbours(db_latents: np.ndarray, latents: np.ndarray, mask: np.ndarray, k: int,
                      exclude=None) -> np.ndarray:
  """(M, k) database ids nearest to each latent over the kept blocks only
  (squared distance summed over the kept positions: nothing of the missing
  part enters). `exclude`: per latent, database ids never returned (its own
  copies)."""
  lm = latent_mask(mask, latents.shape[1:3])
  db = np.asarray(db_latents, np.float32)[:, lm]          # (N, kept, c)
  q = np.asarray(latents, np.float32)[:, lm]              # (M, kept, c)
  db, q = db.reshape(len(db), -1), q.reshape(len(q), -1)
  d = (q ** 2).sum(1)[:, None] - 2 * q @ db.T + (db ** 2).sum(1)[None]
  if exclude is not None:
    for i, ids in enumerate(exclude):
      d[i, np.asarray(ids, np.int64)] = np.inf
  if k > np.isfinite(d).sum(1).min():
    raise DataError(f"the database has too few items to retrieve k={k} neighbours.")
  ids = np.argpartition(d, k - 1, axis=1)[:, :k]
  order = np.take_along_axis(d, ids, 1).argsort(1, kind="stable")
  return np.take_along_axis(ids, order, 1)


def check_canvas(canvas, at, grid) -> tuple[tuple[int, int], tuple[int, int]]:
  """(canvas, at) as int pairs, or ConfigError: the canvas (rows, cols) in
  blocks is at least the block grid, and the image placed at block (row, col)
  lies inside it."""
  (rows, cols), (r, c), (gh, gw) = canvas, at, grid
  rows, cols, r, c, gh, gw = (int(v) for v in (rows, cols, r, c, gh, gw))
  if rows < gh or cols < gw:
    raise ConfigError(f"canvas {(rows, cols)} (in blocks) is smaller than the image's block "
                      f"grid {(gh, gw)}. Fix: a canvas of at least {(gh, gw)} blocks.")
  if not (0 <= r <= rows - gh and 0 <= c <= cols - gw):
    raise ConfigError(f"at={(r, c)}: an image of {(gh, gw)} blocks placed there does not fit "
                      f"a canvas of {(rows, cols)}. Fix: 0 <= row <= {rows - gh}, "
                      f"0 <= col <= {cols - gw}.")
  if (rows, cols) == (gh, gw):
    raise ConfigError(f"canvas {(rows, cols)} is the image itself: nothing to generate. Fix: a "
                      "larger canvas, e.g. one more column of blocks.")
  return (rows, cols), (r, c)


def next_window(known: np.ndarray, grid, at) -> tuple[int, int] | None:
  """The top-left block of the next training-size window to complete on a
  canvas (known: bool (rows, cols) of blocks already there), or None when
  the canvas is full: among windows with a missing block, the one with the
  most known blocks (the most context; at least one), then the nearest to
  the image's window `at`, then the first in row-major order."""
  gh, gw = grid
  rows, cols = known.shape
  best, best_key = None, None
  for r in range(rows - gh + 1):
    for c in range(cols - gw + 1):
      w = known[r:r + gh, c:c + gw]
      if w.all() or not w.any():
        continue
      key = (-int(w.sum()), max(abs(r - at[0]), abs(c - at[1])), r, c)
      if best_key is None or key < best_key:
        best, best_key = (r, c), key
  return best
