"""The U-Net denoiser backbone (model.backbone='unet'): a small U-Net over one
latent block (or the whole latent), for every variant (models/common.py).

Block variants also take the block's position (an embedding added to the time
embedding) and, optionally, the previous block in raster order (as channels).
Neighbour blocks enter by channel concatenation through a small conv encoder
(cond='concat') or as tokens for cross-attention (cond='cross_attn'); rdm
cross-attends to one token per neighbour. A learned "null" neighbour set
replaces the real one where `keep` is False: condition dropout in training,
the unconditional half of classifier-free guidance.

One set of weights serves every block: the callers fold blocks into the batch
(models/rows.py), so all blocks of all examples go through one call. How the
blocks are mapped and the compute dtype are models/mapped.py's; choosing the
backbone is models/registry.py's.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from rissole_jax import blocks as blk
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.models.common import (VariantFlags, need, timestep_embedding, uses_blocks,
                                       with_null)
from rissole_jax.models.layers import conv, conv_transpose, dense, embedding, group_norm
# The denoiser interface, still importable from here for callers that name it
# through the U-Net (inference/).
from rissole_jax.models.common import count_params, uses_retrieval  # noqa: F401
from rissole_jax.models.rows import condition, fold, init_inputs, model_inputs, unfold  # noqa: F401

CONDS = ("concat", "cross_attn")
UPSAMPLES = ("nearest_conv", "conv_transpose", "nearest")
NEIGHBOUR_ENCODERS = ("two_conv", "one_conv", "none")
HEAD_DIM = 32


class ResBlock(nn.Module):
  out_ch: int
  groups: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = conv(self.out_ch, name="conv1")(nn.silu(group_norm(self.groups, x.shape[-1], "norm1")(x)))
    h = h + dense(self.out_ch, name="emb")(nn.silu(emb))[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.out_ch, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialised last conv: each block starts as the identity (ADM).
    h = conv(self.out_ch, name="conv2", zero_init=True)(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1, name="skip")(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention of the feature map over itself or over `context` tokens."""
  groups: int

  @nn.compact
  def __call__(self, x, context=None):
    B, H, W, C = x.shape
    heads = C // HEAD_DIM if C % HEAD_DIM == 0 and C >= HEAD_DIM else 1
    h = group_norm(self.groups, C, "norm")(x).reshape(B, H * W, C)
    ctx = h if context is None else context
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, C // heads)
    q, k, v = (split(dense(C, name=n)(a)) for n, a in (("q", h), ("k", ctx), ("v", ctx)))
    out = nn.dot_product_attention(q, k, v).reshape(B, H * W, C)
    return x + dense(C, name="out", zero_init=True)(out).reshape(B, H, W, C)


class ConcatEncoder(nn.Module):
  """(B, k, bh, bw, c) neighbour blocks -> (B, bh, bw, ch): the k*c channels
  stacked, through two 3x3 convs ("two_conv", the learned fusion of the concat
  condition) or one 1x1 projection ("one_conv"), or as they are ("none": the
  stacked channels go straight into conv_in, as in the authors' U-Net)."""
  ch: int
  kind: str = "two_conv"

  @nn.compact
  def __call__(self, nb):
    h = einops.rearrange(nb, "b k h w c -> b h w (k c)")
    if self.kind == "none":
      return h
    if self.kind == "one_conv":
      return conv(self.ch, 1, name="proj")(h)
    h = nn.silu(conv(self.ch, name="conv1")(h))
    return conv(self.ch, name="conv2")(h)


class BlockTokens(nn.Module):
  """(B, k, bh, bw, c) -> (B, k*bh*bw, dim) tokens: one per neighbour pixel, with
  learned embeddings of the pixel's place in the block and the neighbour's rank."""
  dim: int

  @nn.compact
  def __call__(self, nb):
    B, k, bh, bw, c = nb.shape
    h = dense(self.dim, name="proj")(nb)
    h = h + embedding(bh * bw, self.dim, "pixel")(jnp.arange(bh * bw)).reshape(1, 1, bh, bw, -1)
    h = h + embedding(k, self.dim, "rank")(jnp.arange(k)).reshape(1, k, 1, 1, -1)
    return nn.LayerNorm(name="norm")(h.reshape(B, k * bh * bw, self.dim))


class LatentTokens(nn.Module):
  """(B, k, h, w, c) whole neighbour latents -> (B, k, dim): one embedding per
  neighbour (RDM conditions on per-neighbour embeddings), plus a rank embedding."""
  dim: int

  @nn.compact
  def __call__(self, nb):
    B, k = nb.shape[:2]
    h = dense(self.dim, name="proj1")(nb.reshape(B, k, -1))
    h = dense(self.dim, name="proj2")(nn.silu(h))
    h = h + embedding(k, self.dim, "rank")(jnp.arange(k))[None]
    return nn.LayerNorm(name="norm")(h)


class Denoiser(VariantFlags, nn.Module):
  """Predicts eps (or x0, v) for a batch of noisy blocks (or whole latents).

  x: (B, bh, bw, c); t: (B,) int; pos: (B,) int block index; neighbours:
  (B, k, bh, bw, c) (whole latents for rdm); prev: (B, bh, bw, c); keep: (B,)
  bool, False where the retrieval condition is replaced by the learned null
  (only with learn_null; pass keep whenever the model has one, also at init).
  """
  variant: str = "rissole"
  grid: tuple = (2, 2)
  ch: int = 64
  ch_mult: tuple = (1, 2)
  num_res_blocks: int = 2
  attn_lowest: bool = True
  # What the layout spends FLOPs on (defaults.py's model keys say what each does).
  up_extra_block: bool = False  # num_res_blocks + 1 up blocks per level (ADM), else num_res_blocks
  attn_mid_only: bool = True    # self-attention once in the middle, not after every lowest block
  mid_res_blocks: int = 2       # residual blocks in the middle (attention after the first)
  upsample: str = "conv_transpose"
  neighbour_encoder: str = "none"
  dropout: float = 0.0
  num_groups: int = 8
  cond: str = "concat"
  use_position: bool = True
  use_prev_block: bool = False
  learn_null: bool = False    # a learned stand-in for the neighbours (condition dropout)
  out_channels: int = 4

  @nn.compact
  def __call__(self, x, t, pos=None, neighbours=None, prev=None, keep=None, train=False):
    g, emb_dim = self.num_groups, 4 * self.ch
    # In the input's dtype: bfloat16 compute (models/mapped.py) stays bfloat16.
    emb = dense(emb_dim, name="time1")(timestep_embedding(t, self.ch).astype(x.dtype))
    emb = dense(emb_dim, name="time2")(nn.silu(emb))
    if self.position:
      need(pos, "pos")
      emb = emb + embedding(blk.num_blocks(self.grid), emb_dim, "position")(pos)

    inputs, context = [x], None
    if self.prev_block:
      inputs.append(need(prev, "prev"))
    if self.retrieval:
      nb = with_null(self, need(neighbours, "neighbours"), keep, self.learn_null)
      if self.variant == "rdm":
        context = LatentTokens(self.ch, name="neighbour_tokens")(nb)
      elif self.cond == "concat":
        inputs.append(ConcatEncoder(self.ch, self.neighbour_encoder, name="neighbour_concat")(nb))
      else:
        context = BlockTokens(self.ch, name="neighbour_tokens")(nb)

    h = conv(self.ch, name="conv_in")(jnp.concatenate(inputs, -1))
    # Down, middle and up paths. Cross-attention (when there is a context)
    # follows every residual block; self-attention at the lowest level (after
    # each of its blocks, or with attn_mid_only once in the middle). Each level
    # keeps its skips: its input, then each block's output; the up path takes
    # them back deepest first (ADM's extra up block takes the level's input).
    levels = len(self.ch_mult)
    skips = []
    for lvl, mult in enumerate(self.ch_mult):
      skips.append([h])
      for i in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, g, self.dropout, name=f"down{lvl}_res{i}")(h, emb, train)
        h = self._attend(h, context, lvl == levels - 1 and not self.attn_mid_only, f"down{lvl}_{i}")
        skips[-1].append(h)
      if lvl < levels - 1:
        h = conv(h.shape[-1], stride=2, name=f"down{lvl}_sample")(h)
    for i in range(self.mid_res_blocks):
      h = ResBlock(h.shape[-1], g, self.dropout, name=f"mid_res{i}")(h, emb, train)
      if i == 0:
        h = self._attend(h, context, True, "mid")
    if not self.mid_res_blocks:
      h = self._attend(h, context, True, "mid")
    up_blocks = self.num_res_blocks + int(self.up_extra_block)
    for lvl, mult in reversed(list(enumerate(self.ch_mult))):
      level_skips = skips.pop()
      for i in range(up_blocks):
        h = jnp.concatenate([h, level_skips.pop()], -1)
        h = ResBlock(self.ch * mult, g, self.dropout, name=f"up{lvl}_res{i}")(h, emb, train)
        h = self._attend(h, context, lvl == levels - 1 and not self.attn_mid_only, f"up{lvl}_{i}")
      if lvl > 0:
        h = self._upsample(h, f"up{lvl}_sample")
    h = nn.silu(group_norm(g, h.shape[-1], "norm_out")(h))
    return conv(self.out_channels, name="conv_out", zero_init=True)(h)

  def _upsample(self, h, name: str):
    """2x upsampling: nearest resize + 3x3 conv (ADM), a 2x2 stride-2
    transposed conv (a ninth of its FLOPs), or nearest resize alone."""
    b, hh, ww, c = h.shape
    if self.upsample == "conv_transpose":
      return conv_transpose(c, name=name)(h)
    h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
    return conv(c, name=name)(h) if self.upsample == "nearest_conv" else h

  def _attend(self, h, context, lowest: bool, name: str):
    if lowest and self.attn_lowest:
      h = Attention(self.num_groups, name=f"{name}_attn")(h)
    if context is not None:
      h = Attention(self.num_groups, name=f"{name}_xattn")(h, context)
    return h


# ---------------------------------------------------------------------------
# Config -> U-Net.

def check_config(config, latent_shape) -> None:
  """The U-Net part of the model config; models/registry.py checks the rest."""
  m = config.model
  check_choice("model.cond", m.cond, CONDS)
  check_choice("model.upsample", m.upsample, UPSAMPLES)
  check_choice("model.neighbour_encoder", m.neighbour_encoder, NEIGHBOUR_ENCODERS)
  if m.mid_res_blocks not in (0, 1, 2):
    raise ConfigError(f"model.mid_res_blocks={m.mid_res_blocks} must be 0, 1 or 2.")
  bh, bw = blk.check_grid(latent_shape, config.blocks.grid)
  size = (bh, bw) if uses_blocks(m.variant) else tuple(latent_shape[:2])
  f = 2 ** (len(m.ch_mult) - 1)
  if size[0] % f or size[1] % f:
    raise ConfigError(
        f"model.ch_mult {tuple(m.ch_mult)} halves the input {len(m.ch_mult) - 1} times, but "
        f"the denoiser's input is {size[0]}x{size[1]} (not divisible by {f}). Fix: use fewer "
        f"levels in model.ch_mult or a coarser blocks.grid.")


def fields(config, latent_shape) -> dict:
  """The Denoiser's fields for a config (models/mapped.py picks the class)."""
  m = config.model
  return dict(variant=m.variant, grid=tuple(int(g) for g in config.blocks.grid), ch=m.ch,
              ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_lowest=m.attn_lowest, up_extra_block=m.up_extra_block,
              attn_mid_only=m.attn_mid_only, mid_res_blocks=m.mid_res_blocks,
              upsample=m.upsample, neighbour_encoder=m.neighbour_encoder,
              dropout=m.dropout, num_groups=m.num_groups,
              cond=m.cond, use_position=m.use_position, use_prev_block=m.use_prev_block,
              learn_null=uses_retrieval(m.variant) and config.diffusion.cond_dropout > 0,
              out_channels=int(latent_shape[-1]))
