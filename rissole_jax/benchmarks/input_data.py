"""The input benchmark's data (benchmarks/input.py), made once and reused:
photo-like JPEGs in a folder, the same JPEG bytes as a tfds array_record
dataset, and photos at the paper-scale datasets' sizes. A module of its own
so that Grain's workers unpickle the tfds builder by reference (a class
defined in __main__ would be sent by value and registered twice).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rissole_jax.files import atomic_write_json

BENCH_TFDS = "input_bench_jpegs"  # InputBenchJpegs's tfds name
PHOTO_SIZES = {"imagenet-like 500x375": (500, 375), "celeba-like 178x218": (178, 218)}


def _picture(i: int, w: int, h: int) -> np.ndarray:
  """A photo-like image: smooth colour fields, edges and sensor noise (JPEG
  sizes and decode costs of real photos, unlike flat or white-noise images)."""
  from PIL import Image
  rng = np.random.default_rng(i)
  low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
  yy, xx = np.mgrid[:h, :w]
  for _ in range(3):  # a few hard-edged discs
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(w, h)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
  img += rng.normal(0, 6, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def _write_jpegs(folder: Path, n: int, w: int, h: int) -> list[Path]:
  from PIL import Image
  marker = folder / "done.json"
  paths = [folder / f"{i // 1000:03d}" / f"{i:06d}.jpg" for i in range(n)]
  if marker.exists() and json.loads(marker.read_text()) == {"n": n, "w": w, "h": h}:
    return paths

  def one(i):
    paths[i].parent.mkdir(parents=True, exist_ok=True)
    tmp = paths[i].with_suffix(".tmp")
    Image.fromarray(_picture(i, w, h)).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, paths[i])

  with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL and NumPy release the GIL
    list(pool.map(one, range(n)))
  atomic_write_json(marker, {"n": n, "w": w, "h": h})
  return paths


class InputBenchJpegs(tfds.core.GeneratorBasedBuilder):
  """The benchmark's JPEG files, bytes unchanged, as a tfds dataset (one
  'train' split), written as array_record without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, paths=(), **kwargs):
    self._paths = list(paths)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,  # rows in file order
                                 features=tfds.features.FeaturesDict({"image": tfds.features.Image(
                                     shape=(None, None, 3), encoding_format="jpeg")}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, p in enumerate(self._paths):
      yield i, {"image": Path(p).read_bytes()}


def _write_array_record(data_dir: Path, paths: list[Path]) -> None:
  InputBenchJpegs(paths=paths, data_dir=str(data_dir), file_format="array_record"
                  ).download_and_prepare()  # a no-op once prepared


def make_data(cfg, root: Path) -> dict[str, Path]:
  folder = root / f"jpegs_{cfg.jpegs}_{cfg.jpeg_size}"
  paths = _write_jpegs(folder, cfg.jpegs, cfg.jpeg_size, cfg.jpeg_size)
  if "array_record" in cfg.datasets:
    _write_array_record(root / "tfds", paths)
  photos = {name: root / f"photos_{cfg.photos}_{w}x{h}" for name, (w, h) in PHOTO_SIZES.items()}
  for name, (w, h) in PHOTO_SIZES.items():
    _write_jpegs(photos[name], cfg.photos, w, h)
  return {"folder": folder, "tfds": root / "tfds", **photos}
