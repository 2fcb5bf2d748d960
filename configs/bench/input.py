"""The input pipeline benchmark (rissole_jax/benchmarks/input.py): the
loader alone and feeding the default VQ-GAN step, against data.workers, over
the embedded digits, a folder of generated JPEGs and the same JPEGs as tfds
array_record; then the images/s the paper-scale configs need per host.

  python -m rissole_jax.benchmarks.input --config configs/bench/input.py \
      --out runs/input.json

The generated data is made once under `data_dir` (about 0.8 GiB; a minute or two).
`:smoke` is a seconds-long run of every path (the test's).
"""
import ml_collections as mlc

from rissole_jax.defaults import base_config


def get_config(arg: str = ""):
  c = mlc.ConfigDict()
  c.base = base_config()               # its data section is replaced per dataset
  c.data_dir = "~/.cache/rissole_jax/bench_input"
  c.jpegs = 20_000                     # generated 256x256 JPEGs (folder and array_record)
  c.jpeg_size = 256
  # Photographs at the sizes the paper-scale configs decode, for the decode
  # rates of the estimates: ImageNet's typical 500x375, CelebA's 178x218.
  c.photos = 1_000
  c.datasets = ("embedded", "folder", "array_record")
  c.workers = ("sync", 0, 1, 2, 4)     # "sync": one reader, no loader (the old loop)
  c.loader_batches = 200               # timed per setting, after loader.WARMUP
  c.step_batches = 40
  c.rounds = 3                         # settings interleaved, medians reported
  c.estimate_configs = ("configs/celeba64.py", "configs/imagenet100.py")
  if arg == "smoke":
    c.data_dir = ""                    # a temporary folder
    c.jpegs, c.jpeg_size, c.photos = 64, 64, 8
    c.workers = ("sync", 0, 1)
    c.loader_batches = c.step_batches = 6
    c.rounds = 1
    c.base.vqgan.update(ch=8, ch_mult=(1, 2), disc_ch=8)
    c.base.vqgan.train.batch_size = 8
    c.estimate_configs = ()
  elif arg:
    raise ValueError(f"unknown variant {arg!r} (smoke)")
  return c
