"""The denoiser backbones by name (config.model.backbone): one place that
checks a model config and makes its denoiser.

  unet  models/unet.py (block mapping and compute dtype: models/mapped.py)
  lego  models/lego.py (LEGO bricks)

Every backbone presents the denoiser interface of models/common.py; the
checks here are those of every backbone, then the backbone's own.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from rissole_jax import blocks as blk
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.models import lego, mapped, unet
from rissole_jax.models.common import VARIANTS, uses_blocks, uses_retrieval


class Backbone(NamedTuple):
  check: Callable   # (config, latent_shape) -> None; raises ConfigError
  make: Callable    # (config, latent_shape) -> the denoiser module


BACKBONES = {
    "unet": Backbone(unet.check_config, mapped.make_denoiser),
    "lego": Backbone(lego.check_config, lego.make_denoiser),
}


def check_config(config, latent_shape) -> None:
  """Refuses inconsistent model/blocks/diffusion settings before any work."""
  m, v = config.model, config.model.variant
  check_choice("model.variant", v, VARIANTS)
  check_choice("model.backbone", m.backbone, BACKBONES)
  blk.check_grid(latent_shape, config.blocks.grid)
  if m.use_prev_block and not uses_blocks(v):
    raise ConfigError(f"model.use_prev_block needs a block variant (rissole, blocks_only); "
                      f"variant {v!r} denoises the whole latent. Fix: drop prev_block.")
  BACKBONES[m.backbone].check(config, latent_shape)
  if config.diffusion.cond_dropout > 0 and not uses_retrieval(v):
    raise ConfigError(f"diffusion.cond_dropout={config.diffusion.cond_dropout} drops the "
                      f"retrieval condition, but variant {v!r} has none. Fix: set it to 0.")
  if not 0 <= config.diffusion.cond_dropout < 1:
    raise ConfigError("diffusion.cond_dropout must be in [0, 1).")
  mapped.check_config(config)   # block_map, share_weights, dtype (U-Net options)


def make_denoiser(config, latent_shape):
  """The config's denoiser, checked first."""
  check_config(config, latent_shape)
  return BACKBONES[config.model.backbone].make(config, latent_shape)
