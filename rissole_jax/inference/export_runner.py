"""Run an exported RISSOLE sampler: only `jax` and `numpy` (no rissole_jax).

  python run.py EXPORT_DIR --num 8 --seed 0 --out pngs/ [--allow-jax-mismatch]

EXPORT_DIR is what `python -m rissole_jax.export --format stablehlo --out DIR`
wrote (this file is copied there as run.py): sampler.stablehlo (the whole
sampler, noise and neighbour latents to uint8 images, serialized with
jax.export), params.npz (denoiser and decoder parameters, float or int8),
database.npz (latents and neighbour table) and manifest.json.

Pseudo-queries are drawn uniformly from the database (numpy, from --seed);
each image's noise comes from its own uint32 seed, so an image does not depend
on the batch it is drawn in. Writes OUT/sample_XXXX.png and OUT/samples.npy.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np

FORMAT = "rissole-stablehlo"
FORMAT_VERSION = 1


class ExportError(Exception):
  """An exported directory this runner cannot use (the message says why and the fix)."""


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    raise ExportError(f"{path} is missing: not an exported sampler. Fix: export one with "
                      "python -m rissole_jax.export --format stablehlo --out DIR.")
  with open(path) as f:
    m = json.load(f)
  if m.get("format") != FORMAT:
    raise ExportError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}.")
  if int(m.get("format_version", -1)) > FORMAT_VERSION:
    raise ExportError(f"{path}: format version {m.get('format_version')} is newer than this "
                      f"runner's {FORMAT_VERSION}. Fix: use the run.py exported beside it.")
  return m


def check_jax(manifest: dict, allow_mismatch: bool = False) -> None:
  """Refuse an export made by another jax version, unless allowed (jax.export
  keeps artifacts loadable by newer jax for about 6 months, never by older)."""
  import jax
  import jax.export
  made = manifest["jax_version"]
  ccv = int(manifest["calling_convention_version"])
  lo = jax.export.minimum_supported_calling_convention_version
  hi = jax.export.maximum_supported_calling_convention_version
  if not lo <= ccv <= hi:
    raise ExportError(
        f"this export uses jax.export calling convention {ccv}; jax {jax.__version__} "
        f"reads {lo}..{hi}. Fix: pip install jax=={made} (the version that exported it), "
        "or re-export with this jax.")
  if _version(jax.__version__) < _version(made):
    raise ExportError(
        f"exported with jax {made}, running the older jax {jax.__version__}: jax.export "
        f"artifacts are not forward compatible. Fix: pip install jax=={made}, or re-export "
        "with this jax.")
  if made != jax.__version__ and not allow_mismatch:
    raise ExportError(
        f"exported with jax {made}, running jax {jax.__version__}. Fix: pip install "
        f"jax=={made}, or re-export with this jax, or pass --allow-jax-mismatch (jax.export "
        "keeps artifacts loadable by newer jax for 6 months).")


def _version(v: str) -> tuple:
  return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in v.split(".")[:3])


def load(directory: str, allow_mismatch: bool = False):
  """(exported, params list, database dict, manifest)."""
  import jax.export
  m = read_manifest(directory)
  check_jax(m, allow_mismatch)
  with open(os.path.join(directory, m["program"]), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, m["params"])) as f:
    params = [f[f"{i:05d}"] for i in range(int(m["num_params"]))]
  with np.load(os.path.join(directory, m["database"])) as f:
    # Latents stored as codebook indices (a VQ-GAN's latents are codebook vectors).
    latents = f["codebook"][f["codes"]] if "codes" in f else f["latents"]
    db = {"latents": latents, "neighbours": f["neighbours"]}
  return exported, params, db, m


def inputs(db: dict, num: int, seed: int):
  """Neighbour latents (num, k, h, w, c) of `num` uniform pseudo-queries and
  one uint32 seed per image."""
  rng = np.random.default_rng([seed, 0x5A3])
  n = len(db["neighbours"])
  queries = rng.choice(n, size=num, replace=num > n)
  nb = db["latents"][db["neighbours"][queries]].astype(np.float32)
  seeds = (np.uint64(seed) * np.uint64(1_000_003) + np.arange(num, dtype=np.uint64)) % np.uint64(2 ** 32)
  return nb, seeds.astype(np.uint32), queries


def generate(exported, params, nb, seeds, batch: int = 64) -> np.ndarray:
  out = []
  for s in range(0, len(nb), batch):
    out.append(np.asarray(exported.call(*params, nb[s:s + batch], seeds[s:s + batch])))
  return np.concatenate(out)


def png_bytes(image: np.ndarray) -> bytes:
  """A PNG (8-bit grey or RGB) with the standard library only."""
  h, w, c = image.shape
  kind = {1: 0, 3: 2}[c]
  raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, kind, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("directory")
  p.add_argument("--num", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--out", default="samples")
  p.add_argument("--allow-jax-mismatch", action="store_true")
  a = p.parse_args(argv)
  try:
    exported, params, db, _ = load(a.directory, a.allow_jax_mismatch)
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  nb, seeds, _ = inputs(db, a.num, a.seed)
  images = generate(exported, params, nb, seeds, a.batch)
  os.makedirs(a.out, exist_ok=True)
  np.save(os.path.join(a.out, "samples.npy"), images)
  for i, im in enumerate(images):
    with open(os.path.join(a.out, f"sample_{i:04d}.png"), "wb") as f:
      f.write(png_bytes(im))
  print(f"wrote {len(images)} images to {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
