"""User images as a database to retrieve from (Sampler.with_database): the
data Source for a folder, an array or list of images, or a dataset name, and
the cache key of the database encoded from it."""
from __future__ import annotations

import os
from pathlib import Path

from rissole_jax.files import sha256_bytes


def database_source(source, config):
  """A data Source for `source`: a folder (path or "folder:PATH"; every image
  in it, named by its file list so a changed folder is re-encoded), images
  (an (N, H, W[, C]) array or a list; named by their bytes), or a dataset
  name (its train split)."""
  from rissole_jax.data import ArraySource, load_source
  from rissole_jax.data.sources import FolderSource
  size, ch = config.data.image_size, config.data.channels
  if isinstance(source, (str, os.PathLike)):
    spec = str(source)
    path = spec[len("folder:"):] if spec.startswith("folder:") else spec
    if spec.startswith("folder:") or os.sep in spec or Path(os.path.expanduser(path)).is_dir():
      src = FolderSource(path, "train", size, ch, heldout_fraction=0.0,
                         bad_images=config.data.get("bad_images", "error"))
      listing = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in src.files)
      src.name = f"folder:{Path(path).expanduser().resolve()}:{digest(listing.encode())}"
      return src
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
      data.name, data.classes = spec, ()
    return load_source(data, "train")
  from rissole_jax.data.images import to_model_images
  images = to_model_images(source, size, ch)
  return ArraySource(f"array:{digest(images.tobytes())}", images)


def digest(data: bytes) -> str:
  """A short content name (16 hex digits of sha256)."""
  return sha256_bytes(data)[:16]


def database_key(autoencoder_fingerprint: str, source_name: str, config, image_shape) -> str:
  """The cache folder name of a database encoded from `source_name` by this
  autoencoder with config.retrieval: any change makes another."""
  from rissole_jax.stages import workdir as wd
  return wd.fingerprint({"autoencoder": autoencoder_fingerprint, "source": source_name,
                         "retrieval": config.retrieval.to_dict(), "size": tuple(image_shape)})
