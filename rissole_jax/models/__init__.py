"""Flax Linen models: the VQ-GAN and the block denoiser.

  vqgan.py     the VQ-GAN (encoder, quantizer, decoder, discriminator)
  registry.py  the denoiser backbones by name: check_config, make_denoiser
  common.py    what every backbone shares (variants, time embedding, null)
  rows.py      the denoiser's inputs as rows (blocks folded into the batch)
  unet.py      the U-Net backbone; mapped.py: its block mapping and dtype
  lego.py      the LEGO-bricks backbone
  layers.py    the layers both are built from
"""
from rissole_jax.models.registry import BACKBONES, check_config, make_denoiser

__all__ = ["BACKBONES", "check_config", "make_denoiser"]
