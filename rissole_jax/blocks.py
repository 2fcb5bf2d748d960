"""The block grid: the one place that knows how a latent is cut into blocks.

A latent (..., h, w, c) is cut into a gh x gw grid of blocks of (bh, bw, c),
numbered in raster order (row by row): block i sits at (i // gw, i % gw).
Everything else sees blocks only as an extra axis of length n = gh * gw.
"""
from __future__ import annotations

import einops
import numpy as np

from rissole_jax.errors import ConfigError


def check_grid(latent_shape, grid) -> tuple[int, int]:
  """Block (bh, bw) for a latent (h, w, c) and grid (gh, gw); refuses a grid
  that does not divide the latent, naming the grids that would."""
  h, w = int(latent_shape[0]), int(latent_shape[1])
  try:
    gh, gw = (int(g) for g in grid)
  except (TypeError, ValueError):
    raise ConfigError(f"blocks.grid must be two positive integers (rows, columns), got {grid!r}.")
  if gh < 1 or gw < 1:
    raise ConfigError(f"blocks.grid must be positive, got {tuple(grid)}.")
  if h % gh or w % gw:
    ok_r = [d for d in range(1, h + 1) if h % d == 0]
    ok_c = [d for d in range(1, w + 1) if w % d == 0]
    raise ConfigError(
        f"blocks.grid {(gh, gw)} does not divide the latent of {h}x{w} (shape "
        f"{tuple(latent_shape)}): {h} rows into {gh} and {w} columns into {gw} must both "
        f"be whole. Fix: set --config.blocks.grid to (rows, columns) with rows in {ok_r} "
        f"and columns in {ok_c}, e.g. (2, 2) when both are even.")
  return h // gh, w // gw


def num_blocks(grid) -> int:
  return int(grid[0]) * int(grid[1])


def block_shape(latent_shape, grid) -> tuple[int, int, int]:
  bh, bw = check_grid(latent_shape, grid)
  return bh, bw, int(latent_shape[2])


def split(z, grid):
  """(..., h, w, c) -> (..., n, bh, bw, c), blocks in raster order."""
  gh, gw = int(grid[0]), int(grid[1])
  check_grid(z.shape[-3:], grid)
  return einops.rearrange(z, "... (gh bh) (gw bw) c -> ... (gh gw) bh bw c", gh=gh, gw=gw)


def merge(blocks, grid):
  """(..., n, bh, bw, c) -> (..., h, w, c); the inverse of `split`."""
  gh, gw = int(grid[0]), int(grid[1])
  if blocks.shape[-4] != gh * gw:
    raise ValueError(f"merge: {blocks.shape[-4]} blocks given for a {gh}x{gw} grid.")
  return einops.rearrange(blocks, "... (gh gw) bh bw c -> ... (gh bh) (gw bw) c", gh=gh, gw=gw)


def positions(grid) -> np.ndarray:
  """(n, 2) int32 (row, column) of each block, in raster order."""
  gh, gw = int(grid[0]), int(grid[1])
  rows, cols = np.divmod(np.arange(gh * gw), gw)
  return np.stack([rows, cols], -1).astype(np.int32)


def index(row: int, col: int, grid) -> int:
  """Raster index of the block at (row, col)."""
  gh, gw = int(grid[0]), int(grid[1])
  if not (0 <= row < gh and 0 <= col < gw):
    raise ValueError(f"block ({row}, {col}) is outside the {gh}x{gw} grid.")
  return row * gw + col


def previous(blocks, axis: int = -4):
  """Each block's predecessor in raster order (zeros for the first block)."""
  import jax.numpy as jnp
  blocks = jnp.moveaxis(blocks, axis, 0)
  prev = jnp.concatenate([jnp.zeros_like(blocks[:1]), blocks[:-1]], 0)
  return jnp.moveaxis(prev, 0, axis)
