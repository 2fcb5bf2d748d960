"""Layers that name the logical axes of their parameters.

Every model builds its convolutions and dense layers from here, so that
`parallel.py` can map parameters to the mesh with the config's rules:
output features are "embed" (sharded over fsdp by default), codebooks are
"vocab"; everything else is replicated.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Convolutions whose output has at most this many pixels (the U-Net's 2x2
# lowest level on 4x4 blocks) run as one matmul with the kernel spread into a
# (H*W*Cin, Ho*Wo*Cout) matrix: XLA:CPU runs a 3x3 conv on a 2x2 map (forward
# and both gradients) about 9x slower than that matmul, which does exactly the
# conv's unpadded taps. Larger maps stay convolutions (the matrix would waste
# FLOPs on zeros). docs/performance.md has the measurements.
MATMUL_CONV_MAX_PIXELS = 4

# Set while tracing a denoiser whose kernels are vmapped with its inputs (one
# set of weights per block position, models/mapped.py). jax batches such a
# conv as a grouped convolution, which XLA:CPU compiles for minutes and runs
# ~10x slower than the shared one; as shifted slices and one dot it batches
# to a batched matmul instead.
_BATCHED_KERNELS = contextvars.ContextVar("batched_kernels", default=False)


# Set while Qwix traces a network (inference/quantize.py): it recognises a
# kernel only as the direct operand of a conv or dot, so the small-map
# matmul, whose matrix is gathered from the kernel, would leave that layer
# unquantized with a weight it cannot calibrate.
_PLAIN_CONVS = contextvars.ContextVar("plain_convs", default=False)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, on: bool):
  token = var.set(on)
  try:
    yield
  finally:
    var.reset(token)


def batched_kernels(on: bool = True):
  """Within this context, convolutions are written as slices + one dot."""
  return _setting(_BATCHED_KERNELS, on)


def plain_convs(on: bool = True):
  """Within this context, every convolution is lax.conv_general_dilated."""
  return _setting(_PLAIN_CONVS, on)


def conv(features: int, kernel: int = 3, stride: int = 1, name: str | None = None,
         zero_init: bool = False, padding="SAME", use_bias: bool = True) -> nn.Conv:
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, name=name, conv_general_dilated=small_map_conv,
                 kernel_init=nn.with_logical_partitioning(init, (None, None, None, "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
  """lax.conv_general_dilated for flax's NHWC/HWIO convs; tiny maps as one matmul."""
  conv = functools.partial(jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                           lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers,
                           feature_group_count=feature_group_count, precision=precision)
  plain = (lhs.ndim == 4 and feature_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
           and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
           and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1))
  if not plain or _PLAIN_CONVS.get() or rhs.shape[0] * rhs.shape[1] == 1:
    return conv()
  B, H, W, _ = lhs.shape
  pads = (jax.lax.padtype_to_pads((H, W), rhs.shape[:2], window_strides, padding)
          if isinstance(padding, str) else tuple(map(tuple, padding)))
  taps = tap_index((H, W), rhs.shape[:2], tuple(window_strides), tuple(pads))
  if taps is None:
    if _BATCHED_KERNELS.get():
      return _sliced_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, pads)), precision)
    return conv()
  kh, kw, ci, co = rhs.shape
  n_out = taps.shape[1]
  # The matrix by indexing (no dot: int8 quantization sees only the one matmul).
  padded = jnp.concatenate([rhs.reshape(kh * kw, ci, co), jnp.zeros((1, ci, co), rhs.dtype)])
  matrix = jnp.transpose(padded[taps], (0, 2, 1, 3)).reshape(H * W * ci, n_out * co)
  y = jnp.dot(lhs.reshape(B, H * W * ci), matrix, precision=precision)
  ho = (H + pads[0][0] + pads[0][1] - kh) // window_strides[0] + 1
  return y.reshape(B, ho, n_out // ho, co)


def _sliced_conv(lhs, rhs, strides, pads, precision):
  """The conv as kh*kw strided slices of the padded input, stacked on the
  channel axis in HWIO order, times the kernel as one (kh*kw*Cin, Cout)
  matrix (im2col by slicing: no gather, no grouped conv)."""
  kh, kw, ci, co = rhs.shape
  (sh, sw), (H, W) = strides, lhs.shape[1:3]
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (H + pads[0][0] + pads[0][1] - kh) // sh + 1
  wo = (W + pads[1][0] + pads[1][1] - kw) // sw + 1
  cols = jnp.concatenate([x[:, dy:dy + (ho - 1) * sh + 1:sh, dx:dx + (wo - 1) * sw + 1:sw]
                          for dy in range(kh) for dx in range(kw)], axis=-1)
  return jnp.dot(cols, rhs.reshape(kh * kw * ci, co), precision=precision)


@functools.lru_cache(maxsize=64)
def tap_index(size, kernel, strides, pads):
  """(H*W, Ho*Wo) int: the kernel tap (dy*kw + dx) joining input pixel p to
  output pixel q, kh*kw where none does; None when the output is too large
  for the matmul form."""
  (H, W), (kh, kw), (sh, sw) = size, kernel, strides
  ho = (H + pads[0][0] + pads[0][1] - kh) // sh + 1
  wo = (W + pads[1][0] + pads[1][1] - kw) // sw + 1
  if ho * wo > MATMUL_CONV_MAX_PIXELS or ho < 1 or wo < 1:
    return None
  taps = np.full((H * W, ho * wo), kh * kw, np.int32)
  for yo in range(ho):
    for xo in range(wo):
      for dy in range(kh):
        for dx in range(kw):
          yi, xi = yo * sh + dy - pads[0][0], xo * sw + dx - pads[1][0]
          if 0 <= yi < H and 0 <= xi < W:
            taps[yi * W + xi, yo * wo + xo] = dy * kw + dx
  return taps


class PatchConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (s, s), strides=(s, s)) -- same parameters,
  same outputs -- as one matmul: with kernel = stride every input pixel makes
  its own s x s output patch. (XLA:CPU runs the transposed convolution on
  tiny maps as slowly as the small convolutions above.)"""
  features: int
  size: int = 2

  @nn.compact
  def __call__(self, x):
    s = self.size
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, "embed")),
        (s, s, x.shape[-1], self.features))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (self.features,))
    B, H, W, _ = x.shape
    # ConvTranspose correlates with the flipped kernel.
    y = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel[::-1, ::-1])
    return y.reshape(B, H * s, W * s, self.features) + bias


def conv_transpose(features: int, size: int = 2, name: str | None = None) -> PatchConvTranspose:
  """A size x size transposed convolution with stride size (2x upsampling)."""
  return PatchConvTranspose(features, size, name=name)


def dense(features: int, name: str | None = None, zero_init: bool = False,
          use_bias: bool = True) -> nn.Dense:
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(features, name=name, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(init, (None, "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def group_norm(groups: int, channels: int, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with the largest group count <= `groups` that divides `channels`."""
  g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
  return nn.GroupNorm(num_groups=g, name=name)


def embedding(num: int, features: int, name: str | None = None) -> nn.Embed:
  return nn.Embed(num, features, name=name, embedding_init=nn.with_logical_partitioning(
      nn.initializers.normal(stddev=1.0), ("vocab", None)))
