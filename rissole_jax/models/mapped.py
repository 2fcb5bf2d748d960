"""How the U-Net denoiser meets the blocks, and the dtype it computes in.

Every caller hands the denoiser rows with the blocks folded into the batch
(B*n rows, example-major: models/rows.py). The classes made here keep
that interface and change what happens inside:

  model.block_map="fold"   one call over all B*n rows (the plain Denoiser)
  model.block_map="vmap"   the denoiser written for one block, nn.vmap'ped
                           over the n blocks with shared parameters: the same
                           parameters (same tree, same values, same init) and
                           outputs as "fold", to float tolerance
  model.share_weights=False  one set of weights per block position (nn.vmap
                           over parameters: every leaf gains a leading axis of
                           n blocks); an ablation of what sharing saves
  model.dtype="bfloat16"   activations in bfloat16; parameters (and so the
                           optimizer state) stay float32, read through a cast
                           (Flax `dtype` vs `param_dtype`, done with
                           nn.map_variables so the Denoiser's body is unchanged);
                           the output comes back float32, so the loss is float32

"fold" stays the default: vmap compiles to the same speed (jax's conv
batching rule folds the mapped axis into the batch). Default config (blocks
4x4x4, ch 32, batch 64 images, k=10), shared 2-core AMD EPYC (AVX-512), load
~11-13, interleaved, 5 rounds x 8 steps, compile excluded, medians
(python -m rissole_jax.benchmarks.variants --config configs/mnist.py
--variant fold:model.block_map=fold --variant vmap:model.block_map=vmap):
train 20.4 vs 21.3 images/s, one sampling step 55.8 vs 62.0 images/s, per-round
ratios 0.9-1.1 both ways: equal within the noise.

Per-position weights vmap the kernels too. jax batches a conv whose kernel is
batched as a grouped (feature_group_count=n) convolution, which XLA:CPU
compiles and runs slowly (smoke config: 10x slower train steps; default
config: the train step took over 13 minutes to compile on a loaded machine),
so while tracing them the convolutions are written as slices + one dot
(layers.batched_kernels), which batch to batched matmuls.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rissole_jax import blocks as blk
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.models import layers, unet
from rissole_jax.models.common import uses_blocks
from rissole_jax.models.rows import fold, unfold

BLOCK_MAPS = ("fold", "vmap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_config(config) -> None:
  m = config.model
  check_choice("model.block_map", m.block_map, BLOCK_MAPS)
  check_choice("model.dtype", m.dtype, DTYPES)
  plain = m.block_map == "fold" and m.share_weights and m.dtype == "float32"
  if m.backbone != "unet" and not plain:
    raise ConfigError(
        f"model.block_map={m.block_map!r}, model.share_weights={m.share_weights} and "
        f"model.dtype={m.dtype!r} are U-Net options; the {m.backbone!r} backbone folds blocks "
        "into the batch, shares its weights and computes in float32. Fix: use "
        "model.backbone='unet', or the defaults (block_map='fold', share_weights=True, "
        "dtype='float32').")
  if not m.share_weights:
    if m.block_map != "vmap":
      raise ConfigError("model.share_weights=False gives every block position its own "
                        "weights, which needs model.block_map='vmap' (folding blocks into "
                        "the batch shares one set). Fix: set model.block_map='vmap'.")
    if not uses_blocks(m.variant):
      raise ConfigError(f"model.share_weights=False needs a block variant (rissole, "
                        f"blocks_only); {m.variant!r} denoises the whole latent.")


def _cast(dtype, tree):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
      tree)


class _Core(unet.Denoiser):
  """The Denoiser with its call as two liftable methods: `core` (parameters
  as stored: used at init, so they are created float32) and `core_cast`
  (parameters read in the compute dtype, where one is set)."""

  def core(self, x, t, pos, neighbours, prev, keep, train):
    return unet.Denoiser.__call__(self, x, t, pos, neighbours, prev, keep, train)

  def core_cast(self, x, t, pos, neighbours, prev, keep, train):
    return unet.Denoiser.__call__(self, x, t, pos, neighbours, prev, keep, train)


@functools.cache
def denoiser_class(block_map: str = "fold", share_weights: bool = True,
                   dtype: str = "float32") -> type:
  """The Denoiser class for these settings (the plain one for the defaults)."""
  if block_map == "fold" and share_weights and dtype == "float32":
    return unet.Denoiser
  cls = _Core
  compute = DTYPES[dtype]
  if compute != jnp.float32:
    cls = nn.map_variables(cls, "params", trans_in_fn=functools.partial(_cast, compute),
                           methods=["core_cast"])
  mapped = block_map == "vmap" or not share_weights
  if mapped:
    # Blocks are axis 1 of every (B, n, ...) input; `train` is static.
    cls = nn.vmap(cls, methods=["core", "core_cast"], in_axes=(1, 1, 1, 1, 1, 1, None),
                  out_axes=1, variable_axes={"params": None if share_weights else 0},
                  split_rngs={"params": not share_weights, "dropout": True},
                  metadata_params={nn.PARTITION_NAME: None})

  class Mapped(cls):
    def __call__(self, x, t, pos=None, neighbours=None, prev=None, keep=None, train=False):
      n = blk.num_blocks(self.grid) if mapped else None
      def rows(a, cast=False):
        if a is None:
          return None
        a = unfold(a, n) if mapped else a
        return a.astype(compute) if cast and not self.is_initializing() else a
      args = (rows(x, True), rows(t), rows(pos), rows(neighbours, True), rows(prev, True),
              rows(keep), train)
      core = self.core if self.is_initializing() or compute == jnp.float32 else self.core_cast
      with layers.batched_kernels(not share_weights):
        out = core(*args)
      return (fold(out) if mapped else out).astype(jnp.float32)

  Mapped.block_map, Mapped.share_weights, Mapped.dtype_name = block_map, share_weights, dtype
  Mapped.__name__ = Mapped.__qualname__ = (
      f"Denoiser_{block_map}{'' if share_weights else '_per_position'}_{dtype}")
  return Mapped


def make_denoiser(config, latent_shape):
  """The config's U-Net, of the class for its block_map, share_weights and dtype."""
  m = config.model
  cls = denoiser_class(m.block_map, bool(m.share_weights), m.dtype)
  return cls(**unet.fields(config, latent_shape))


def settings(model) -> tuple[str, bool, str]:
  """(block_map, share_weights, dtype) of a denoiser made here (or a plain one)."""
  return (getattr(model, "block_map", "fold"), getattr(model, "share_weights", True),
          getattr(model, "dtype_name", "float32"))


def for_rows(model, params, block=None):
  """(model, params) that denoise rows of ONE block (B rows, not B*n): the
  sampler's raster-order path (use_prev_block). Shared weights: the same
  parameters through the unmapped class; per-position weights: block `block`'s
  slice (it may be traced)."""
  block_map, shared, dtype = settings(model)
  if block_map == "fold" and shared:
    return model, params
  fields = {f: getattr(model, f) for f in unet.Denoiser.__dataclass_fields__
            if f not in ("parent", "name")}
  row_model = denoiser_class("fold", True, dtype)(**fields)
  if not shared:
    params = jax.tree.map(lambda p: p[block], params)
  return row_model, params


def plain(model, what: str):
  """The float32, folded Denoiser with `model`'s fields (the same parameters,
  where weights are shared), for code that rewrites the network's ops
  (quantization); per-position weights are refused, naming `what`."""
  block_map, shared, dtype = settings(model)
  if not shared:
    raise ConfigError(f"{what} does not support model.share_weights=False (one set of weights "
                      "per block position): its per-layer rules expect one kernel per layer. "
                      "Fix: use a shared-weights model, or leave it unquantized.")
  if block_map == "fold" and dtype == "float32":
    return model
  fields = {f: getattr(model, f) for f in unet.Denoiser.__dataclass_fields__
            if f not in ("parent", "name")}
  return unet.Denoiser(**fields)
