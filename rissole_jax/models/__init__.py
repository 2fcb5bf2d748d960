"""Flax Linen models: the VQ-GAN and the block denoiser."""
