"""What every denoiser backbone shares: the variants and what they mean, the
timestep embedding, the learned null condition and the check for a missing
input.

Variants (config.model.variant):
  rissole      one block, conditioned on the same block of the k neighbours
  blocks_only  one block, no retrieval (shows the coherence problem)
  full         the whole latent, no retrieval (a plain latent diffusion model)
  rdm          the whole latent, cross-attending to one token per neighbour (RDM)

The Denoiser interface (models/unet.py's Denoiser and models/lego.py's
LegoDenoiser both present it; models/rows.py lays out its inputs): fields
`variant`, `grid`, `use_position`, `use_prev_block`, `learn_null` (with the
flags of VariantFlags) and the call
  model.apply(variables, x, t, pos=None, neighbours=None, prev=None, keep=None,
              train=False)
on rows of blocks (or whole latents).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("rissole", "blocks_only", "full", "rdm")


def uses_blocks(variant: str) -> bool:
  return variant in ("rissole", "blocks_only")


def uses_retrieval(variant: str) -> bool:
  return variant in ("rissole", "rdm")


class VariantFlags:
  """What a denoiser's variant and flags mean, for every backbone (the
  trainer and sampler read these): needs `variant`, `use_position`,
  `use_prev_block` fields."""

  @property
  def blocks(self) -> bool:
    return uses_blocks(self.variant)

  @property
  def retrieval(self) -> bool:
    return uses_retrieval(self.variant)

  @property
  def position(self) -> bool:
    return self.blocks and self.use_position

  @property
  def prev_block(self) -> bool:
    return self.blocks and self.use_prev_block


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding (B,) -> (B, dim), as in Transformer/DDPM."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


def with_null(module: nn.Module, nb, keep, learn_null: bool):
  """Condition dropout: nb (B, ...) where keep (B,) is True, else the module's
  learned stand-in `null_neighbours` (created only when keep is given)."""
  if keep is None:
    return nb
  if not learn_null:
    raise ValueError("`keep` needs a model trained with condition dropout "
                     "(diffusion.cond_dropout > 0).")
  null = module.param("null_neighbours", nn.with_logical_partitioning(
      nn.initializers.zeros, (None,) * (nb.ndim - 1)), nb.shape[1:])
  return jnp.where(keep.reshape((nb.shape[0],) + (1,) * (nb.ndim - 1)), nb,
                   null[None].astype(nb.dtype))


def need(x, name: str):
  """x, or a ValueError naming the input this config's denoiser needs."""
  if x is None:
    raise ValueError(f"The denoiser needs `{name}` with this config.")
  return x


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
