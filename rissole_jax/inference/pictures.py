"""Image grids and figures as uint8 arrays, PNG files and PIL images."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from rissole_jax.files import atomic_write_bytes


def tile(images: np.ndarray, cols: int, pad: int = 2, value: int = 255) -> np.ndarray:
  """uint8 (n, H, W, C) -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) image."""
  n, H, W, C = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (H + pad) - pad, cols * (W + pad) - pad, C), value, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    out[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = im
  return out


def grid_columns(n: int) -> int:
  """Columns for a grid of n images: about square, at most 16."""
  return max(1, min(16, int(np.ceil(np.sqrt(n)))))


def figure(queries: np.ndarray, neighbours: np.ndarray, samples: np.ndarray | None = None,
           pad: int = 2, gap: int = 8) -> np.ndarray:
  """Rows of [query | its k neighbours | sample] (uint8 images), a wider gap
  around the neighbours, as in the paper's Figure 2; without samples, rows of
  [query | neighbours]."""
  rows = []
  for i, (q, nb) in enumerate(zip(queries, neighbours)):
    H, W, C = q.shape
    sep = np.full((H, gap, C), 255, np.uint8)
    parts = [q, sep, tile(nb, len(nb), pad)]
    if samples is not None:
      parts += [sep, samples[i]]
    rows.append(np.concatenate(parts, 1))
  return tile(np.stack(rows), 1, pad + 2)


def to_pil(image: np.ndarray):
  """uint8 (H, W, 1 or 3) -> PIL image (greyscale or RGB)."""
  from PIL import Image
  image = np.asarray(image, np.uint8)
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(path: Path, image: np.ndarray) -> None:
  buf = io.BytesIO()
  to_pil(image).save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())
