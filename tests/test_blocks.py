"""The block grid: split/merge, raster order, positions, and refused grids."""
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import blocks
from rissole_jax.errors import ConfigError


@pytest.mark.parametrize("shape,grid", [
    ((8, 8, 4), (1, 1)), ((8, 8, 4), (2, 2)), ((8, 8, 4), (4, 4)), ((8, 8, 4), (2, 4)),
    ((8, 8, 4), (8, 8)), ((16, 16, 10), (2, 2)), ((6, 9, 3), (3, 3)), ((12, 8, 2), (4, 1)),
])
def test_split_merge_identity(shape, grid):
  z = np.random.default_rng(0).normal(size=(3, 2) + shape).astype(np.float32)
  b = blocks.split(z, grid)
  bh, bw = shape[0] // grid[0], shape[1] // grid[1]
  assert b.shape == (3, 2, grid[0] * grid[1], bh, bw, shape[2])
  np.testing.assert_array_equal(blocks.merge(b, grid), z)
  np.testing.assert_array_equal(blocks.merge(blocks.split(jnp.asarray(z), grid), grid), z)


def test_raster_order_and_positions():
  z = np.arange(8 * 8).reshape(1, 8, 8, 1)
  grid = (2, 4)
  b = blocks.split(z, grid)                  # blocks of 4x2
  pos = blocks.positions(grid)
  assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3]]
  for i, (r, c) in enumerate(pos):
    assert blocks.index(r, c, grid) == i
    np.testing.assert_array_equal(b[0, i], z[0, 4 * r:4 * r + 4, 2 * c:2 * c + 2])
  with pytest.raises(ValueError):
    blocks.index(2, 0, grid)


def test_previous_block():
  b = jnp.arange(2 * 4 * 1 * 1 * 1, dtype=jnp.float32).reshape(2, 4, 1, 1, 1) + 1
  prev = blocks.previous(b, axis=1)
  np.testing.assert_array_equal(prev[:, 0], 0)
  np.testing.assert_array_equal(prev[:, 1:], b[:, :-1])


@pytest.mark.parametrize("grid", [(3, 3), (2, 3), (5, 1)])
def test_non_dividing_grid_is_refused(grid):
  with pytest.raises(ConfigError, match=r"does not divide the latent of 8x8.*Fix"):
    blocks.check_grid((8, 8, 4), grid)
  with pytest.raises(ConfigError):
    blocks.split(np.zeros((1, 8, 8, 4)), grid)


def test_bad_grid_values():
  for grid in [(0, 2), (2,), "ab"]:
    with pytest.raises(ConfigError):
      blocks.check_grid((8, 8, 4), grid)
  assert blocks.block_shape((16, 16, 10), (2, 2)) == (8, 8, 10)
  assert blocks.num_blocks((2, 4)) == 8
