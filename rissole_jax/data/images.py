"""User images -> uint8 arrays of the model's size and channels.

Whatever a user brings (a path, a PIL image, a NumPy array; greyscale, RGB,
RGBA, palette, CMYK, 16-bit or float) is converted as the folder data source
converts its files (data/sources.py: decode_image, pil_to_array): to 8 bits,
to greyscale or RGB, center-cropped to a square and resized. What cannot be
converted is refused with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rissole_jax.errors import DataError

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def array_to_uint8(a: np.ndarray, what: str = "image") -> np.ndarray:
  """An (H, W) or (H, W, C) array -> uint8 (H, W, C) of 1 to 4 channels
  (grey, grey + alpha, RGB, RGBA), scaled by what the dtype declares, never
  by how bright the values are: uint8 as is, uint16 as 16-bit (1/257, so a
  dark 16-bit image stays dark), float as [0, 1], bool as 0/255. Other
  integer dtypes (int64 from np.array of Python ints, int32, ...) declare no
  depth: they are read as 8-bit values and must lie in 0..255 (16-bit data:
  cast it to uint16)."""
  a = np.asarray(a)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise DataError(f"{what} has shape {a.shape}; expected (H, W) or (H, W, C).")
  if a.shape[-1] not in _MODES:
    raise DataError(f"{what} has {a.shape[-1]} channels, which cannot be converted; expected 1 "
                    "(greyscale), 2 (greyscale + alpha), 3 (RGB) or 4 (RGBA) channels, last axis.")
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * 255
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.uint16:
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)):
      raise DataError(f"{what} holds NaN or infinite values.")
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
  if np.issubdtype(a.dtype, np.integer):
    if a.min(initial=0) < 0 or a.max(initial=0) > 255:
      raise DataError(f"{what} has dtype {a.dtype} with values in {a.min()}..{a.max()}; an "
                      f"integer dtype other than uint8/uint16 is read as 8-bit (0..255). Fix: "
                      "cast 16-bit data to np.uint16, or scale it to 0..255 as np.uint8.")
    return a.astype(np.uint8)
  raise DataError(f"{what} has dtype {a.dtype}; use uint8, uint16 or float in [0, 1].")


def array_to_pil(a: np.ndarray, what: str = "image"):
  from PIL import Image
  a = array_to_uint8(a, what)
  return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)  # mode from the shape


def to_model_image(image, size: int, channels: int, what: str = "image") -> np.ndarray:
  """One image (path, PIL image or array) -> uint8 (size, size, channels)."""
  from PIL import Image
  from rissole_jax.data.sources import center_crop_resize, decode_image, image_problem, pil_to_array
  if isinstance(image, (str, os.PathLike)):
    path = Path(os.path.expanduser(str(image)))
    if not path.is_file():
      raise DataError(f"{path}: no such image file.")
    problem = image_problem(path)
    if problem is not None:
      raise DataError(f"{path} is not a readable image ({problem}). Fix: remove it, or "
                      "replace it with a PNG/JPEG file.")
    return decode_image(path, size, channels)
  if not isinstance(image, Image.Image):
    image = array_to_pil(image, what)   # converted as a decoded file would be
  return center_crop_resize(pil_to_array(image, channels), size, channels)


def to_model_images(images, size: int, channels: int) -> np.ndarray:
  """A list of images, a single image, or an (N, H, W[, C]) array -> uint8
  (N, size, size, channels)."""
  from PIL import Image
  if isinstance(images, np.ndarray) and images.ndim == 4:
    items = list(images)
  elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
    items = [images]
  else:
    items = list(images)
  if not items:
    raise DataError("no images given.")
  return np.stack([to_model_image(im, size, channels, f"image {i}") for i, im in enumerate(items)])
