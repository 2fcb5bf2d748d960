"""Random-access image sources: the embedded default, tfds catalogue datasets,
and a folder of images. Every source returns uint8 images (H, W, C) already
resized and cropped to the config's size, plus an integer label (-1 if none).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import numpy as np

TRAIN, HELDOUT = "train", "heldout"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


from rissole_jax.errors import DataError


class Source(Protocol):
  name: str

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, H, W, C) and int32 labels (B,) for the given rows."""


def center_crop_resize(img: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Center-crop to a square, then resize (area-like antialiasing via PIL)."""
  from PIL import Image
  if img.ndim == 2:
    img = img[..., None]
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  if img.shape[-1] == 1 and channels == 3:
    img = np.repeat(img, 3, axis=-1)
  elif img.shape[-1] in (3, 4) and channels == 1:
    img = np.asarray(Image.fromarray(img[..., :3]).convert("L"))[..., None]
  elif img.shape[-1] == 4:
    img = img[..., :3]
  if s != size:
    mode = "L" if img.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
    img = np.asarray(pil.resize((size, size), Image.BICUBIC, reducing_gap=None))
    img = img.reshape(size, size, -1)
  return np.ascontiguousarray(img, dtype=np.uint8)


class ArraySource:
  """A source held in memory (small datasets, tests, database swaps)."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray | None = None):
    self.name = name
    self.images = np.asarray(images, np.uint8)
    self.labels = (np.full(len(images), -1, np.int32) if labels is None
                   else np.asarray(labels, np.int32))

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices):
    indices = np.asarray(indices)
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """A prepared tfds dataset read with `tfds.data_source` (array_record)."""

  def __init__(self, name, split, data_dir, image_size, channels, label_key="label",
               image_key="image", crop=None, keep_labels=None):
    import tensorflow_datasets as tfds
    self.name = f"{name}:{split}"
    self.image_size, self.channels = image_size, channels
    self.label_key, self.image_key, self.crop = label_key, image_key, crop
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types here; all mean "not usable".
      raise DataError(_missing_message(name, data_dir, e)) from e
    self._rows = None
    if keep_labels is not None:
      self._rows = _rows_with_labels(self._ds, label_key, keep_labels, data_dir, name, split)

  def __len__(self):
    return len(self._rows) if self._rows is not None else len(self._ds)

  def get(self, indices):
    indices = np.asarray(indices)
    rows = self._rows[indices] if self._rows is not None else indices
    images, labels = [], []
    for ex in self._ds.__getitems__([int(r) for r in rows]):
      img = np.asarray(ex[self.image_key])
      if self.crop is not None:  # (top, left, height, width), e.g. CelebA's face crop.
        t, l, h, w = self.crop
        img = img[t:t + h, l:l + w]
      images.append(center_crop_resize(img, self.image_size, self.channels))
      labels.append(int(ex[self.label_key]) if self.label_key in ex else -1)
    return np.stack(images), np.asarray(labels, np.int32)


def _rows_with_labels(ds, label_key, keep_labels, data_dir, name, split):
  """Rows of `ds` whose label is kept; cached next to the data (a one-off scan)."""
  keep = np.asarray(sorted(keep_labels))
  tag = hashlib.sha1(keep.tobytes()).hexdigest()[:12]
  cache = Path(os.path.expanduser(data_dir or "~/tensorflow_datasets")) / f"{name}_{split}_rows_{tag}.npy"
  if cache.exists():
    return np.load(cache)
  labels = np.asarray([int(ds[i][label_key]) for i in range(len(ds))])
  rows = np.flatnonzero(np.isin(labels, keep)).astype(np.int64)
  tmp = cache.with_suffix(".tmp.npy")
  np.save(tmp, rows)
  os.replace(tmp, cache)
  return rows


def _missing_message(name, data_dir, err) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (
      f"Dataset '{name}' is not prepared as array_record under {where} ({type(err).__name__}: {err}).\n"
      f"Fix: prepare it once on a machine that has the source files:\n"
      f"  pip install 'rissole_jax[tfds]'   # TensorFlow, needed only to prepare catalogue datasets\n"
      f"  tfds build {name} --data_dir {where} --file_format=array_record"
      + ("  --manual_dir DIR_WITH_THE_ARCHIVES" if name.startswith("imagenet2012") or name == "celeb_a" else "")
      + "\nor point --config.data.data_dir at the directory that holds it, or use a folder of "
      "images with --config.data.name=folder --config.data.folder=PATH.")


class FolderSource:
  """Every image file under a folder (recursively), split by a fixed hash of its path."""

  def __init__(self, folder, split, image_size, channels, heldout_fraction=0.1):
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
      raise DataError(f"Image folder '{folder}' does not exist. Fix: set "
                      "--config.data.folder to a directory of PNG/JPEG files.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
      raise DataError(f"No images ({', '.join(IMAGE_EXTS)}) found under '{folder}'.")

    def is_heldout(p):  # stable under adding files: depends only on the path.
      h = int(hashlib.sha1(str(p.relative_to(folder)).encode()).hexdigest()[:8], 16)
      return h / 0xFFFFFFFF < heldout_fraction

    self.files = [p for p in files if is_heldout(p) == (split == HELDOUT)]
    if not self.files:
      raise DataError(f"Split '{split}' of '{folder}' is empty ({len(files)} images in "
                      f"all, heldout_fraction={heldout_fraction}): add images or change it.")
    self.name = f"folder:{folder}:{split}"
    self.image_size, self.channels = image_size, channels

  def __len__(self):
    return len(self.files)

  def get(self, indices):
    from PIL import Image
    out = []
    for i in np.asarray(indices):
      with Image.open(self.files[int(i)]) as im:
        im = im.convert("L" if self.channels == 1 else "RGB")
        out.append(center_crop_resize(np.asarray(im), self.image_size, self.channels))
    return np.stack(out), np.full(len(out), -1, np.int32)


def prepare_embedded(data_dir: str | None) -> None:
  """Writes the embedded MNIST split once (a few seconds, no network)."""
  from rissole_jax.data.mnist_embedded import MnistEmbedded
  builder = MnistEmbedded(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()


# tfds name, split names (train, held-out), and per-dataset preprocessing.
CATALOGUE = {
    # CelebA: the usual 140x140 (here 148) face crop, then resize to 64.
    "celeb_a": dict(tfds_name="celeb_a", splits=("train", "test"), label_key="none",
                    crop=(40, 15, 148, 148)),
    "imagenette": dict(tfds_name="imagenette/full-size-v2", splits=("train", "validation")),
    "imagenet100": dict(tfds_name="imagenet2012", splits=("train", "validation")),
}


def load_source(data_cfg, split: str) -> Source:
  """The source named by `data_cfg.name` for split 'train' or 'heldout'."""
  if split not in (TRAIN, HELDOUT):
    raise ValueError(f"split must be '{TRAIN}' or '{HELDOUT}', got {split!r}")
  name, size, ch = data_cfg.name, data_cfg.image_size, data_cfg.channels
  if name == "mnist_embedded":
    if size != 32 or ch != 1:
      raise DataError("mnist_embedded is 32x32x1: set data.image_size=32, data.channels=1.")
    try:
      return TfdsSource("mnist_embedded", split, data_cfg.data_dir, size, ch)
    except DataError:
      prepare_embedded(data_cfg.data_dir)
      return TfdsSource("mnist_embedded", split, data_cfg.data_dir, size, ch)
  if name == "folder":
    if not data_cfg.get("folder"):
      raise DataError("data.name=folder needs --config.data.folder=PATH (a directory of images).")
    return FolderSource(data_cfg.folder, split, size, ch, data_cfg.get("heldout_fraction", 0.1))
  if name in CATALOGUE:
    spec = CATALOGUE[name]
    tfds_split = spec["splits"][0 if split == TRAIN else 1]
    keep = list(data_cfg.classes) if data_cfg.get("classes") else None
    return TfdsSource(spec["tfds_name"], tfds_split, data_cfg.data_dir, size, ch,
                      label_key=spec.get("label_key", "label"), crop=spec.get("crop"),
                      keep_labels=keep)
  raise DataError(f"Unknown dataset '{name}'. Known: mnist_embedded, folder, "
                  + ", ".join(CATALOGUE) + ".")
