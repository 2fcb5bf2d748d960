"""The VQ-GAN: encoder, decoder, vector quantizer and a PatchGAN discriminator.

Flax Linen modules, pure functions of their parameters. Every convolution and
dense layer comes from models/layers.py so that parameters carry logical axes
(fsdp sharding); the codebook and its EMA statistics are sharded as "vocab".

Codebook learning: EMA updates (online k-means, van den Oord et al. 2017,
appendix) rather than l2-normalised codes. EMA needs no codebook loss and no
codebook learning rate, converges fast with small batches, and keeps codes in
the encoder's own (unnormalised) space, so latents keep their magnitudes for
the diffusion stage. Dead codes are restarted from encoder outputs of the batch.
The codebook lives in the generator's `params` (so `encode_fn(params, x)` is
self-contained) but gets no gradient: the train step overwrites it with the
EMA estimate after every optimizer update.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rissole_jax.errors import ConfigError
from rissole_jax.models import layers

NUM_GROUPS = 8  # GroupNorm groups (fewer when channels are fewer; see layers.group_norm)


def downsampling_factor(vq_cfg) -> int:
  return 2 ** (len(vq_cfg.ch_mult) - 1)


def latent_shape(vq_cfg, image_size: int) -> tuple[int, int, int]:
  f = downsampling_factor(vq_cfg)
  return (image_size // f, image_size // f, vq_cfg.z_channels)


def check_config(config) -> None:
  """Raises ConfigError naming the fix when the vqgan section cannot work on the data."""
  v, size = config.vqgan, config.data.image_size
  if len(v.ch_mult) < 1 or any(int(m) < 1 for m in v.ch_mult):
    raise ConfigError(f"vqgan.ch_mult={tuple(v.ch_mult)} must be a non-empty tuple of positive "
                      "integers (one per resolution; f = 2**(len(ch_mult)-1)).")
  f = downsampling_factor(v)
  if size % f or size // f < 1:
    ok = [2 ** (n - 1) for n in range(1, 6) if size % 2 ** (n - 1) == 0]
    raise ConfigError(
        f"vqgan.ch_mult={tuple(v.ch_mult)} gives a downsampling factor f={f}, but "
        f"data.image_size={size} is not divisible by {f}. Fix: use a ch_mult of length "
        f"{[int(math.log2(o)) + 1 for o in ok]} (f in {ok}), or an image size divisible by {f}.")
  if v.z_channels < 1 or v.codebook_size < 2 or v.ch < 1 or v.num_res_blocks < 0:
    raise ConfigError(f"vqgan: need z_channels>=1, codebook_size>=2, ch>=1, num_res_blocks>=0 "
                      f"(got {v.z_channels}, {v.codebook_size}, {v.ch}, {v.num_res_blocks}).")
  if not 0.0 <= v.ema_decay < 1.0:
    raise ConfigError(f"vqgan.ema_decay={v.ema_decay} must be in [0, 1).")
  if v.disc_layers < 1 or size // 2 ** v.disc_layers < 1:
    raise ConfigError(f"vqgan.disc_layers={v.disc_layers} must be >= 1 and halve "
                      f"data.image_size={size} at most log2({size}) times.")
  if min(v.beta, v.disc_weight, v.l1_weight, v.l2_weight, v.dead_code_threshold) < 0:
    raise ConfigError("vqgan: beta, disc_weight, l1_weight, l2_weight and dead_code_threshold "
                      "must be >= 0.")
  if v.l1_weight == 0 and v.l2_weight == 0:
    raise ConfigError("vqgan: l1_weight and l2_weight are both 0: nothing trains the decoder.")


# ---------------------------------------------------------------------------
# Building blocks.

class ResBlock(nn.Module):
  out_ch: int

  @nn.compact
  def __call__(self, x):
    h = layers.conv(self.out_ch, name="conv1")(
        nn.silu(layers.group_norm(NUM_GROUPS, x.shape[-1], name="norm1")(x)))
    h = layers.conv(self.out_ch, name="conv2")(
        nn.silu(layers.group_norm(NUM_GROUPS, self.out_ch, name="norm2")(h)))
    if x.shape[-1] != self.out_ch:
      x = layers.conv(self.out_ch, kernel=1, name="skip")(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions (used at the lowest resolution)."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.group_norm(NUM_GROUPS, c, name="norm")(x).reshape(b, h * w, 1, c)
    # No key bias: it adds q.b to every logit of a query, which softmax ignores,
    # so its gradient is float noise that Adam would turn into a random walk.
    q = layers.dense(c, name="q")(y)
    k = layers.dense(c, name="k", use_bias=False)(y)
    v = layers.dense(c, name="v")(y)
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + layers.dense(c, name="proj")(y).reshape(b, h, w, c)


def _mid(x, attn: bool):
  x = ResBlock(x.shape[-1], name="mid_res1")(x)
  if attn:
    x = Attention(name="mid_attn")(x)
  return ResBlock(x.shape[-1], name="mid_res2")(x)


class Encoder(nn.Module):
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  z_channels: int
  attn_lowest: bool

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.ch, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        x = ResBlock(self.ch * mult, name=f"down{level}_res{i}")(x)
      if level < len(self.ch_mult) - 1:
        x = layers.conv(x.shape[-1], stride=2, name=f"down{level}_sample")(x)
    x = _mid(x, self.attn_lowest)
    x = nn.silu(layers.group_norm(NUM_GROUPS, x.shape[-1], name="norm_out")(x))
    return layers.conv(self.z_channels, name="conv_out")(x)


class Decoder(nn.Module):
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  out_channels: int
  attn_lowest: bool

  @nn.compact
  def __call__(self, z, return_features: bool = False):
    """Images; with `return_features`, also the input of the last layer (for the
    adaptive GAN weight, which needs gradients w.r.t. that layer's kernel)."""
    x = layers.conv(self.ch * self.ch_mult[-1], name="conv_in")(z)
    x = _mid(x, self.attn_lowest)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks):
        x = ResBlock(self.ch * self.ch_mult[level], name=f"up{level}_res{i}")(x)
      if level > 0:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        # Straight to the next level's width: a conv at the doubled resolution
        # is the decoder's most expensive layer, so it should not be wider.
        x = layers.conv(self.ch * self.ch_mult[level - 1], name=f"up{level}_sample")(x)
    h = nn.silu(layers.group_norm(NUM_GROUPS, x.shape[-1], name="norm_out")(x))
    out = last_layer(self.out_channels)(h)
    return (out, h) if return_features else out


def last_layer(out_channels: int) -> nn.Module:
  """The decoder's last layer, also applied alone with its own params."""
  return layers.conv(out_channels, name="conv_out")


# ---------------------------------------------------------------------------
# Vector quantization.

class VectorQuantizer(nn.Module):
  """Nearest-code quantization with a straight-through gradient.

  Returns (z_q, aux): z_q equals the nearest codes in the forward pass and has
  the identity gradient w.r.t. z; aux holds the code indices and the
  commitment loss beta * |z - sg(z_q)|^2 (the codebook itself learns by EMA).
  """
  codebook_size: int
  dim: int
  beta: float

  @nn.compact
  def __call__(self, z):
    init = nn.initializers.variance_scaling(1.0, "fan_out", "uniform")
    codebook = self.param("codebook", nn.with_logical_partitioning(init, ("vocab", None)),
                          (self.codebook_size, self.dim))
    idx = nearest_code(z, codebook)
    zq = jnp.take(codebook, idx, axis=0)
    commit = self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(zq)))
    zq_st = z + jax.lax.stop_gradient(zq - z)
    return zq_st, {"indices": idx, "commit_loss": commit}


def nearest_code(z, codebook):
  """Index of the nearest code (squared Euclidean) for every vector in z[..., D]."""
  d = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
       + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(d, axis=-1)


def init_ema_stats(codebook_size: int, dim: int) -> dict:
  """EMA statistics, as fractions of the batch's vectors. Usage starts at zero, so
  the first step restarts all but the most used codes from encoder outputs (a
  data-driven init)."""
  return {"usage": nn.LogicallyPartitioned(jnp.zeros((codebook_size,)), ("vocab",)),
          "embed_sum": nn.LogicallyPartitioned(jnp.zeros((codebook_size, dim)), ("vocab", None))}


def ema_update(stats: dict, z, indices, decay: float, eps: float = 1e-5):
  """One EMA k-means step. z: (N, D) encoder outputs, indices: (N,) their codes.

  usage_k <- decay usage_k + (1-decay) n_k/N, sum_k <- decay sum_k + (1-decay) sum z/N;
  code_k = sum_k / usage_k (Laplace-smoothed so that unused codes do not divide by 0).
  Returns (new stats, new codebook).
  """
  k = stats["usage"].shape[0]
  n = z.shape[0]
  counts = jax.ops.segment_sum(jnp.ones((n,), z.dtype), indices, num_segments=k) / n
  sums = jax.ops.segment_sum(z, indices, num_segments=k) / n
  usage = decay * stats["usage"] + (1.0 - decay) * counts
  embed_sum = decay * stats["embed_sum"] + (1.0 - decay) * sums
  total = jnp.sum(usage)
  smoothed = (usage + eps) / (total + k * eps) * total
  codebook = embed_sum / jnp.maximum(smoothed, 1e-12)[:, None]
  return {"usage": usage, "embed_sum": embed_sum}, codebook


def restart_dead_codes(stats: dict, codebook, z, threshold: float, rng):
  """Codes whose EMA usage is below `threshold` jump to encoder outputs of the batch.

  Replacements are drawn (deterministically from `rng`) with probability
  proportional to each vector's squared distance to its current code, as in
  k-means++: new codes go where the codebook represents the data worst, instead
  of piling onto the most frequent vector (on MNIST, the empty background).
  A restarted code gets the usage of a uniformly used one, 1/K, so it has time
  to attract vectors before it could count as dead again.
  Returns (stats, codebook, number of codes restarted).
  """
  k = codebook.shape[0]
  dead = stats["usage"] < threshold
  zq = jnp.take(codebook, nearest_code(z, codebook), axis=0)
  err = jnp.sum(jnp.square(z - zq), -1)
  p = err + 1e-12 * jnp.max(err) + 1e-30  # never all zero
  pick = jax.random.choice(rng, z.shape[0], (k,), replace=True, p=p / jnp.sum(p))
  new = jnp.take(z, pick, axis=0)
  fresh = jnp.full((k,), 1.0 / k, codebook.dtype)
  codebook = jnp.where(dead[:, None], new, codebook)
  usage = jnp.where(dead, fresh, stats["usage"])
  embed_sum = jnp.where(dead[:, None], new * fresh[:, None], stats["embed_sum"])
  return {"usage": usage, "embed_sum": embed_sum}, codebook, jnp.sum(dead)


# ---------------------------------------------------------------------------
# The generator (encoder + quantizer + decoder).

class VQModel(nn.Module):
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_lowest: bool
  z_channels: int
  codebook_size: int
  beta: float
  out_channels: int

  def setup(self):
    self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks,
                           self.z_channels, self.attn_lowest)
    self.quantizer = VectorQuantizer(self.codebook_size, self.z_channels, self.beta)
    self.decoder = Decoder(self.ch, tuple(self.ch_mult), self.num_res_blocks,
                           self.out_channels, self.attn_lowest)

  def __call__(self, x, return_features: bool = False):
    """(reconstruction, aux); aux has z_e, indices, commit_loss (and features)."""
    z_e = self.encoder(x)
    z_q, aux = self.quantizer(z_e)
    out = self.decoder(z_q, return_features=return_features)
    if return_features:
      out, aux["features"] = out
    return out, {**aux, "z_e": z_e}

  def encode(self, x):
    """Quantized latents (B, h, w, z_channels) and their code indices."""
    z_q, aux = self.quantizer(self.encoder(x))
    return z_q, aux["indices"]

  def decode(self, z):
    return self.decoder(z)


def make_model(config) -> VQModel:
  v = config.vqgan
  return VQModel(ch=v.ch, ch_mult=tuple(v.ch_mult), num_res_blocks=v.num_res_blocks,
                 attn_lowest=v.attn_lowest, z_channels=v.z_channels,
                 codebook_size=v.codebook_size, beta=v.beta, out_channels=config.data.channels)


# ---------------------------------------------------------------------------
# The discriminator and the GAN losses.

class Discriminator(nn.Module):
  """PatchGAN (Isola et al. 2017): `layers` stride-2 convolutions, one stride-1,
  then one logit per patch. GroupNorm instead of BatchNorm keeps it a pure
  function of its parameters (no batch statistics to carry)."""
  ch: int
  layers: int

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(layers.conv(self.ch, kernel=4, stride=2, name="conv0")(x), 0.2)
    for i in range(1, self.layers + 1):
      ch = self.ch * min(2 ** i, 8)
      stride = 2 if i < self.layers else 1
      x = layers.conv(ch, kernel=4, stride=stride, name=f"conv{i}", use_bias=False)(x)
      x = nn.leaky_relu(layers.group_norm(NUM_GROUPS, ch, name=f"norm{i}")(x), 0.2)
    return layers.conv(1, kernel=4, name="logits")(x)


def make_discriminator(config) -> Discriminator:
  return Discriminator(ch=config.vqgan.disc_ch, layers=config.vqgan.disc_layers)


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad, gan_grad, disc_weight: float, max_weight: float = 1e4):
  """The VQ-GAN paper's lambda: |grad rec| / |grad gan| at the decoder's last
  layer, clipped, times disc_weight, so that the GAN term never swamps the
  reconstruction. No gradient flows through it."""
  w = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight) * disc_weight)


def reconstruction_loss(x, x_rec, l1_weight: float, l2_weight: float) -> tuple[Any, dict]:
  l1 = jnp.mean(jnp.abs(x - x_rec))
  l2 = jnp.mean(jnp.square(x - x_rec))
  return l1_weight * l1 + l2_weight * l2, {"l1": l1, "l2": l2}
