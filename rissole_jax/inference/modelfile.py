"""The model file: everything sampling needs, in one file to hand to someone.

A zip archive (stored, not compressed: the arrays are read straight back) of

  config.json            the config the model was made with
  stats.json             latent normalisation (mean, std), k, latent shape
  autoencoder.msgpack    VQ-GAN generator params: encoder (for variations and
                         database swaps), quantizer codebook, decoder
  denoiser.msgpack       EMA denoiser params
  database/codes.npy     the database as code indices (uint8/uint16 per latent
                         position: the latents are quantized, so nothing is lost)
  database/neighbours.npy, database/labels.npy, database/info.json
  students/<n>.msgpack   distilled students (python -m rissole_jax.distill), one
                         per step count; the manifest lists the counts
  manifest.json          written last: format name and version, the weights'
                         storage, the model's fingerprint (its config's diffusion
                         stage fingerprint), where it came from (provenance, if
                         given), and the size and sha256 of every other member

Format versions: 1 holds float32 weights; 2 adds `weights` and `students` to the manifest:
"float32" as in 1, or "int8", where every conv/dense kernel of both networks
is int8 with a float32 scale per output channel (inference/quantize.py,
kernels_to_int8: a quarter of the bytes) and is read back as float32 (the
sampler computes in float, as trained). This reader reads both.

The retrieval index is rebuilt from the codes when first needed (variations),
with the settings in config.json: for the default database that takes well
under a second. Writing goes to a temporary file renamed into place, so an
interrupted export leaves nothing that loads; loading opens the file read-only
and refuses a truncated, altered, incomplete or newer-format file.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from rissole_jax.errors import DataError
from rissole_jax.files import atomic_write_bytes, sha256_bytes

FORMAT = "rissole_jax.model"
VERSION = 2  # bump on any change an older reader would misread
WEIGHTS = ("float32", "int8")
_ARRAYS = ("codes", "neighbours", "labels")


def _npy(a) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.asarray(a), allow_pickle=False)
  return buf.getvalue()


def _msgpack(params, weights: str = "float32") -> bytes:
  import jax
  from flax import serialization
  from rissole_jax.inference.quantize import kernels_to_int8
  from rissole_jax.runtime import parallel
  params = jax.tree.map(parallel.to_host, params)
  if weights == "int8":
    params = kernels_to_int8(params)
  return serialization.msgpack_serialize(params)


def _unmsgpack(data: bytes, weights: str):
  from flax import serialization
  from rissole_jax.inference.quantize import kernels_from_int8
  params = serialization.msgpack_restore(data)
  return kernels_from_int8(params) if weights == "int8" else params


def model_fingerprint(config) -> str | None:
  """The config's diffusion-stage fingerprint (it covers every stage that
  makes the model: data, VQ-GAN, encode, index, denoiser and its training)."""
  from rissole_jax.stages import stage_records
  return {r.name: r.fingerprint for r in stage_records(config, Path("."))}.get("diffusion")


def members(parts, weights: str = "float32") -> dict[str, bytes]:
  """The file's members (manifest excluded) for a Sampler (or inference.loading.Parts)."""
  from rissole_jax.inference.database import stored_arrays
  from rissole_jax.store import codes as codes_lib
  db = parts.db
  codebook = codes_lib.codebook_of(parts.ae.params)
  arrays = stored_arrays(db, codebook)
  if "codes" not in arrays:
    raise DataError("this sampler's autoencoder has no codebook, so its database cannot be "
                    "stored as code indices; a model file needs a VQ-GAN.")
  stats = {"mean": np.asarray(parts.stats["mean"]).tolist(),
           "std": np.asarray(parts.stats["std"]).tolist(), "k": int(parts.stats["k"]),
           "latent_shape": list(parts.stats["latent_shape"])}
  info = {"name": db.name, "n": len(db), "code_dtype": str(arrays["codes"].dtype),
          "codebook_size": len(codebook)}
  students = {f"students/{n}.msgpack": _msgpack(p, weights)
              for n, p in sorted((getattr(parts, "students", None) or {}).items())}
  return {
      **students,
      "config.json": parts.config.to_json(sort_keys=True).encode(),
      "stats.json": json.dumps(stats).encode(),
      "autoencoder.msgpack": _msgpack(parts.ae.params, weights),
      "denoiser.msgpack": _msgpack(parts.params, weights),
      "database/codes.npy": _npy(arrays["codes"]),
      # uint16 where the ids fit (lossless; read back as int32)
      "database/neighbours.npy": _npy(arrays["neighbours"].astype(
          np.uint16 if len(db) <= 2**16 else np.int32)),
      "database/labels.npy": _npy(np.asarray(db.labels, np.int32)),
      "database/info.json": json.dumps(info).encode(),
  }


def save(sampler, path, weights: str = "float32", provenance: dict | None = None) -> dict:
  """Writes the model file atomically; returns {member: bytes} and the total,
  plus what the database would take as float32 latents (for the ratio).
  `sampler`: a Sampler or inference.loading.Parts. weights: "float32" or
  "int8" (kernels stored as int8, read back as float32). provenance: a
  JSON-able record of where the model came from (commit, command, metrics),
  kept in the manifest."""
  import jax
  from rissole_jax.errors import check_choice
  from rissole_jax.models.autoencoder import params_fingerprint
  from rissole_jax.runtime import parallel
  from rissole_jax.version import __version__
  check_choice("weights", weights, WEIGHTS)
  if getattr(sampler, "quantization", "none") != "none":
    raise DataError(f"this sampler is quantized for computing ({sampler.quantization}); a model "
                    "file stores the float one. Fix: save the sampler before .quantized(...), "
                    "with weights='int8' for int8 storage.")
  path = Path(path)
  parts = members(sampler, weights)
  ae_fp = sampler.ae.fingerprint
  if weights == "int8":   # the autoencoder a reader gets back is the rounded one
    ae_fp = params_fingerprint(_unmsgpack(parts["autoencoder.msgpack"], weights),
                               sampler.config.vqgan)
  earlier = getattr(sampler, "manifest", None) or {}
  manifest = {"format": FORMAT, "version": VERSION, "rissole_jax": __version__,
              "jax": jax.__version__, "autoencoder_fingerprint": ae_fp, "weights": weights,
              # a model read from a file keeps the fingerprint of the config it trained with
              "model_fingerprint": earlier.get("model_fingerprint") or
              model_fingerprint(sampler.config),
              "provenance": provenance if provenance is not None else earlier.get("provenance"),
              # the distilled students' step counts (sampler="distilled")
              "students": sorted((int(n) for n in getattr(sampler, "students", {}) or {}),
                                 reverse=True),
              "files": {n: {"size": len(b), "sha256": sha256_bytes(b)} for n, b in parts.items()}}
  if parallel.process_info()[0] == 0:
    buf = io.BytesIO()   # the members are in memory already; the file is their sum
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
      for name, data in parts.items():
        z.writestr(name, data)
      z.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    atomic_write_bytes(path, buf.getvalue())
  sizes = {n: len(b) for n, b in parts.items()}
  sizes["total"] = path.stat().st_size if path.exists() else sum(sizes.values())
  sizes["database_as_float32_latents"] = int(np.prod(sampler.db.latents.shape)) * 4
  return sizes


def read(path) -> tuple[dict, dict[str, bytes]]:
  """(manifest, {member: bytes}) of a model file, verified; DataError naming
  the problem and the fix otherwise. Opens the file read-only."""
  path = Path(path)
  fix = f"Fix: write it again (python -m rissole_jax.export --workdir DIR --out {path})."
  if not path.is_file():
    raise DataError(f"{path}: no such model file. {fix}")
  try:
    with open(path, "rb") as f, zipfile.ZipFile(f, "r") as z:
      names = set(z.namelist())
      if "manifest.json" not in names:
        raise DataError(f"{path} is incomplete (it has no manifest.json: its writing was "
                        f"interrupted, or it is not a rissole_jax model file). {fix}")
      manifest = json.loads(z.read("manifest.json"))
      _check_format(manifest, path)
      data = {}
      for name, info in manifest["files"].items():
        if name not in names:
          raise DataError(f"{path} is damaged: {name} is missing. {fix}")
        data[name] = z.read(name)
        if len(data[name]) != info["size"] or sha256_bytes(data[name]) != info["sha256"]:
          raise DataError(f"{path} is damaged: {name} differs from its checksum in the "
                          f"manifest. {fix}")
  except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, ValueError, KeyError) as e:
    raise DataError(f"{path} is not a readable model file (truncated or damaged: "
                    f"{type(e).__name__}: {e}). {fix}") from e
  return manifest, data


def _check_format(manifest: dict, path: Path) -> None:
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path} is not a rissole_jax model file (format "
                    f"{manifest.get('format')!r}, expected {FORMAT!r}).")
  version = manifest.get("version")
  if manifest.get("weights", "float32") not in WEIGHTS:
    raise DataError(f"{path} stores its weights as {manifest.get('weights')!r}, which this "
                    f"rissole_jax does not read ({', '.join(WEIGHTS)}). Fix: upgrade rissole_jax.")
  if not isinstance(version, int) or version > VERSION:
    raise DataError(f"{path} has model-file format version {version}, newer than this "
                    f"rissole_jax reads (up to {VERSION}). Fix: upgrade rissole_jax "
                    "(pip install -U rissole_jax), or export it again with this version.")


def load(path, mesh=None):
  """The parts (inference.loading.Parts) of a model file: Sampler.load makes
  the Sampler."""
  from rissole_jax import defaults
  from rissole_jax.inference.configs import merge_config
  from rissole_jax.inference.database import SamplingDatabase
  from rissole_jax.inference.loading import Parts
  from rissole_jax.models import make_denoiser
  from rissole_jax.models.autoencoder import Autoencoder
  from rissole_jax.runtime import parallel
  from rissole_jax.store import codes as codes_lib
  manifest, data = read(path)
  config = defaults.recorded_base()   # files made before a model key: its first value
  merge_config(config, json.loads(data["config.json"]))
  # Sampling runs on whatever devices are here, not on the training mesh; and
  # the data folder of the machine that trained it means nothing here.
  config.mesh = defaults.base_config().mesh
  with config.data.unlocked():
    config.data.data_dir = None
  mesh = mesh or parallel.make_mesh(config.mesh)
  stats = json.loads(data["stats.json"])
  stats = {"mean": np.asarray(stats["mean"], np.float32), "std": np.asarray(stats["std"], np.float32),
           "k": int(stats["k"]), "latent_shape": tuple(stats["latent_shape"])}
  weights = manifest.get("weights", "float32")   # version 1: float32
  ae_params = _unmsgpack(data["autoencoder.msgpack"], weights)
  ae = Autoencoder.from_params(config, ae_params, mesh)
  if ae.fingerprint != manifest.get("autoencoder_fingerprint"):
    raise DataError(f"{path}: the autoencoder's parameters do not match the fingerprint they "
                    "were written with (a damaged or edited file). Fix: export it again.")
  model = make_denoiser(config, stats["latent_shape"])
  params = parallel.put_replicated(_unmsgpack(data["denoiser.msgpack"], weights), mesh)
  arr = {a: np.load(io.BytesIO(data[f"database/{a}.npy"]), allow_pickle=False) for a in _ARRAYS}
  info = json.loads(data["database/info.json"])
  db = SamplingDatabase.from_codes(arr["codes"], codes_lib.codebook_of(ae.params),
                                   arr["neighbours"], arr["labels"], info["name"])
  students = {}
  for n in manifest.get("students", []):
    name = f"students/{int(n)}.msgpack"
    if name not in data:
      raise DataError(f"{path} lists a distilled student of {n} steps but does not hold "
                      f"{name} (a damaged or edited file). Fix: export it again.")
    students[int(n)] = parallel.put_replicated(_unmsgpack(data[name], weights), mesh)
  return Parts(config, ae, model, params, stats, db, mesh, manifest, students)
