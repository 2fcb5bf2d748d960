"""How callers hand blocks to a denoiser: as rows. Block variants fold the n
blocks of each latent into the batch (B*n rows, example-major), so one set of
weights serves every block in one call; whole-latent variants take a row per
latent. Every backbone takes these rows (models/common.py's interface).
"""
from __future__ import annotations

import einops
import jax.numpy as jnp

from rissole_jax import blocks as blk


def fold(x):
  """(B, n, ...) -> (B*n, ...): blocks become batch rows."""
  return einops.rearrange(x, "b n ... -> (b n) ...")


def unfold(x, n: int):
  """(B*n, ...) -> (B, n, ...): the inverse of `fold`."""
  return einops.rearrange(x, "(b n) ... -> b n ...", n=n)


def condition(model, neighbours, batch: int) -> dict:
  """Position and neighbour rows for `batch` latents whose neighbours' latents
  are (B, k, h, w, c): folded to B*n rows for block variants."""
  if not model.blocks:
    return {"neighbours": neighbours if model.retrieval else None}
  n = blk.num_blocks(model.grid)
  # broadcast + reshape rather than tile: works for a symbolic batch (jax.export)
  cond = {"pos": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)).reshape(-1),
          "neighbours": None}
  if model.retrieval:
    nb = jnp.swapaxes(blk.split(neighbours, model.grid), 1, 2)  # (B, n, k, bh, bw, c)
    cond["neighbours"] = fold(nb)
  return cond


def model_inputs(model, z0, neighbours=None):
  """Denoiser inputs for clean latents z0 (B, h, w, c) and their neighbours'
  latents (B, k, h, w, c): (x0 rows, dict of condition rows). Block variants
  fold the n blocks into the rows (B*n of them, example-major)."""
  cond = condition(model, neighbours, z0.shape[0])
  if not model.blocks:
    return z0, cond
  zb = blk.split(z0, model.grid)                       # (B, n, bh, bw, c)
  if model.prev_block:
    # Teacher forcing: block i sees the clean block i-1 (at sampling, the one just made).
    cond["prev"] = fold(blk.previous(zb, axis=1))
  return fold(zb), cond


def init_inputs(model, latent_shape, k: int, batch: int = 1):
  """Dummy inputs of the right shapes (for init / eval_shape); `keep` is among
  them when the model has a learned null, so that it is created."""
  h, w, c = latent_shape
  z0 = jnp.zeros((batch, h, w, c), jnp.float32)
  nb = jnp.zeros((batch, k, h, w, c), jnp.float32)
  x, cond = model_inputs(model, z0, nb)
  t = jnp.zeros((x.shape[0],), jnp.int32)
  if model.retrieval and model.learn_null:
    cond["keep"] = jnp.ones((x.shape[0],), bool)
  return x, t, cond
