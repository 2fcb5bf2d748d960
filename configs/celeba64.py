"""CelebA 64x64 with the paper's settings where known.

VQ-GAN f=4, 10 latent channels, 1024 codes (latent 16x16x10), a 2x2 block
grid, k=10 neighbours, DDPM T=1000 with linear beta 1e-4..0.02.
Needs celeb_a prepared by tfds as array_record (see README, "Datasets").
Variant "paper": the denoiser at the paper's width (model.ch=256; blocks
8x8x10, k=10 as above), the paper-scale point of the throughput benchmark.
"""
from rissole_jax.defaults import base_config, apply_variants


def get_config(arg: str = ""):
  names = [a.strip() for a in arg.split(",") if a.strip()]
  paper = "paper" in names
  arg = ",".join(a for a in names if a != "paper")
  c = base_config()
  c.data.update(name="celeb_a", image_size=64, channels=3)
  c.vqgan.update(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=10,
                 codebook_size=1024, disc_ch=64, disc_layers=3, disc_start=20_000,
                 disc_weight=0.8)  # the VQ-GAN paper's rates and GAN weight at this size
  c.vqgan.train.update(steps=100_000, batch_size=64, lr=2e-4, disc_lr=2e-4,
                       warmup_steps=1000, ckpt_every=5000, log_every=500)
  c.retrieval.k = 10
  c.blocks.grid = (2, 2)
  c.model.update(ch=128, ch_mult=(1, 2), num_res_blocks=2, num_groups=32)
  c.diffusion.train.update(steps=200_000, batch_size=128, lr=1e-4, warmup_steps=1000,
                           ckpt_every=5000, log_every=500)
  c.sample.update(num=10_000, batch_size=256, sampler="ddpm")
  c.evaluate.update(classifier_steps=0)
  if paper:
    c.model.ch = 256
  return apply_variants(c, arg)
