"""ImageNet100 (100 ImageNet classes) at 64x64, the paper's second setting.

VQ-GAN f=8, 32 latent channels, 512 codes (latent 8x8x32), 2x2 block grid.
Needs imagenet2012 prepared by tfds as array_record (see README, "Datasets").
The paper does not list its 100 classes; by default we take class ids 0..99
(override with --config.data.classes). `:imagenette` swaps in imagenette.
"""
from rissole_jax.defaults import base_config, apply_variants


def get_config(arg: str = ""):
  names = [a for a in (arg or "").split(",") if a]
  c = base_config()
  c.data.update(name="imagenet100", image_size=64, channels=3, classes=tuple(range(100)))
  if "imagenette" in names:
    names.remove("imagenette")
    c.data.update(name="imagenette", classes=())
  c.vqgan.update(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=32,
                 codebook_size=512, disc_ch=64, disc_layers=3, disc_start=30_000,
                 disc_weight=0.8)  # the VQ-GAN paper's rates and GAN weight at this size
  c.vqgan.train.update(steps=150_000, batch_size=64, lr=2e-4, disc_lr=2e-4,
                       warmup_steps=1000, ckpt_every=5000, log_every=500)
  c.retrieval.k = 20
  c.blocks.grid = (2, 2)
  c.model.update(ch=128, ch_mult=(1, 2), num_res_blocks=2, num_groups=32)
  c.diffusion.train.update(steps=300_000, batch_size=128, lr=1e-4, warmup_steps=1000,
                           ckpt_every=5000, log_every=500)
  c.sample.update(num=10_000, batch_size=256, sampler="ddpm")
  c.evaluate.update(classifier_steps=0)
  return apply_variants(c, ",".join(names))
