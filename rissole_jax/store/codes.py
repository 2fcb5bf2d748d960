"""The latent database as VQ-GAN code indices.

Latents are quantized, so each position is one of the codebook's vectors:
storing its index (uint8 for up to 256 codes, uint16 up to 65,536) loses
nothing and is 4*c (or 2*c) times smaller than float32 latents of c channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.errors import DataError

_CHUNK = 4096  # latents per jitted call: bounds the (positions x codes) distance matrix


def code_dtype(codebook_size: int) -> np.dtype:
  if codebook_size <= 256:
    return np.dtype(np.uint8)
  if codebook_size <= 65536:
    return np.dtype(np.uint16)
  return np.dtype(np.uint32)


def codebook_of(ae_params) -> np.ndarray | None:
  """The (K, c) codebook in VQ-GAN generator params (None if it has none)."""
  try:
    return np.asarray(ae_params["quantizer"]["codebook"], np.float32)
  except (KeyError, TypeError):
    return None


@jax.jit
def _nearest(z, codebook):
  from rissole_jax.models.vqgan import nearest_code
  idx = nearest_code(z, codebook)
  return idx, jnp.max(jnp.abs(jnp.take(codebook, idx, axis=0) - z))


def to_codes(latents: np.ndarray, codebook: np.ndarray, tol: float = 1e-4) -> np.ndarray:
  """(N, h, w, c) quantized latents -> (N, h, w) code indices. Refuses latents
  that are not (to `tol`, relative to the codebook's scale) codebook vectors:
  they were made by another autoencoder."""
  latents = np.asarray(latents, np.float32)
  codebook = np.asarray(codebook, np.float32)
  out = np.empty(latents.shape[:-1], code_dtype(len(codebook)))
  worst = 0.0
  for s in range(0, len(latents), _CHUNK):
    idx, err = _nearest(latents[s:s + _CHUNK], codebook)
    out[s:s + _CHUNK] = np.asarray(idx)
    worst = max(worst, float(err))
  scale = float(np.abs(codebook).max()) or 1.0
  if worst > tol * scale:
    raise DataError(
        f"the database latents are not vectors of this autoencoder's codebook (off by "
        f"{worst:.3g}): they were made by another VQ-GAN. Fix: re-run the encode and index "
        "stages with this VQ-GAN (python -m rissole_jax.main ... --only encode,index --overwrite).")
  return out


def from_codes(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """(N, h, w) code indices -> (N, h, w, c) float32 latents (a lookup: exact)."""
  codes = np.asarray(codes)
  if codes.size and int(codes.max()) >= len(codebook):
    raise DataError(f"code index {int(codes.max())} is outside the codebook of "
                    f"{len(codebook)} codes: the database belongs to another autoencoder.")
  return np.asarray(codebook, np.float32)[codes.astype(np.int64)]
