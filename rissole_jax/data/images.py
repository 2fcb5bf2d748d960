"""User images -> uint8 arrays of the model's size and channels.

Whatever a user brings (a path, a PIL image, a NumPy array; greyscale, RGB,
RGBA, palette, CMYK, 16-bit or float) is converted the way the folder data
source converts its files: to 8 bits, to greyscale or RGB, center-cropped to a
square and resized. What cannot be converted is refused with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rissole_jax.errors import DataError

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def open_image(path) -> "PIL.Image.Image":
  """A PIL image from a file, fully read (so the file is closed), or DataError
  naming the file when it is missing, empty or not a decodable image."""
  from PIL import Image, UnidentifiedImageError
  path = Path(os.path.expanduser(str(path)))
  if not path.is_file():
    raise DataError(f"{path}: no such image file.")
  if path.stat().st_size == 0:
    raise DataError(f"{path} is empty (0 bytes), not an image. Fix: remove or replace it.")
  try:
    with Image.open(path) as im:
      im.draft(None, None)  # no-op for most formats; lets JPEG decode lazily
      im.load()
      return im.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e}). "
                    "Fix: remove it, or replace it with a PNG/JPEG file.") from e


def pil_to_array(im) -> np.ndarray:
  """A PIL image of any mode -> uint8 (H, W, 1 or 3): 16-bit and float images
  are scaled (PIL's own conversion would clip them), palette and CMYK images
  converted, alpha dropped."""
  if im.mode in _HIGH_BIT_MODES:
    a = np.asarray(im).astype(np.float64)
    top = 1.0 if im.mode == "F" and a.max(initial=0) <= 1.0 else (
        255.0 if a.max(initial=0) <= 255 else 65535.0)
    return np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)[..., None]
  if im.mode in ("1", "L", "LA"):
    return np.asarray(im.convert("L"))[..., None]
  return np.asarray(im.convert("RGB"))


def array_to_uint8(a: np.ndarray, what: str = "image") -> np.ndarray:
  """An (H, W) or (H, W, C) array -> uint8 (H, W, 1 or 3). uint8 as is, uint16
  scaled, float read as [0, 1], bool as 0/255; 2 channels (grey + alpha) and 4
  (RGBA) drop their alpha."""
  a = np.asarray(a)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise DataError(f"{what} has shape {a.shape}; expected (H, W) or (H, W, C).")
  c = a.shape[-1]
  if c not in (1, 2, 3, 4):
    raise DataError(f"{what} has {c} channels, which cannot be converted; expected 1 "
                    "(greyscale), 2 (greyscale + alpha), 3 (RGB) or 4 (RGBA) channels, last axis.")
  a = a[..., :1] if c == 2 else a[..., :3] if c == 4 else a
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
    top = 255 if a.max(initial=0) <= 255 else 65535
    return np.clip(np.round(a.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
  raise DataError(f"{what} has dtype {a.dtype}; use uint8, uint16 or float in [0, 1].")


def to_model_image(image, size: int, channels: int, what: str = "image") -> np.ndarray:
  """One image (path, PIL image or array) -> uint8 (size, size, channels)."""
  from PIL import Image
  from rissole_jax.data.sources import center_crop_resize
  if isinstance(image, (str, os.PathLike)):
    what = str(image)
    image = open_image(image)
  if isinstance(image, Image.Image):
    # Shrink huge images while decoding-sized, before any full-size copy.
    if min(image.size) > 4 * size:
      image.thumbnail((max(image.size) * 4 * size // min(image.size),) * 2)
    arr = pil_to_array(image)
  else:
    arr = array_to_uint8(image, what)
  return center_crop_resize(arr, size, channels)


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
