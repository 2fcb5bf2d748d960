"""The whole sampler as a StableHLO program (jax.export), runnable without
this package: `rissole_jax/inference/export_runner.py` (copied beside it as run.py)
needs only jax and numpy.

  python -m rissole_jax.export --format stablehlo --workdir DIR --out EXPORT_DIR \
      [--quantize none|int8_weights|int8] [--platforms cpu,cuda,tpu] [--sampler ... --steps ...]
  python EXPORT_DIR/run.py EXPORT_DIR --num 8 --out pngs/

The program maps (parameters..., neighbour latents (B, k, h, w, c) float32,
seeds (B,) uint32) to images (B, H, W, C) uint8: latent normalisation, every
sampler step (the configured sampler, steps and guidance), block merge, the
VQ-GAN decode and the uint8 conversion. B is symbolic (any batch size). The
parameters are arguments, not constants, so the same program serves float
and re-trained weights of the same shapes; they are stored beside it in
params.npz (int8 where quantized), with the database (latents and neighbour
table) in database.npz.

Versioning: manifest.json records `format` / `format_version` (this layout;
bumped on any incompatible change to the files or the program's signature),
the jax version that exported it and the jax.export calling-convention
version of the program. jax.export promises that a serialized program stays
loadable and runnable by jax releases for 6 months after the one that made
it (backward compatibility), and not by older releases; the runner refuses
any other jax version unless --allow-jax-mismatch is passed (within that
window), and always refuses a calling-convention version its jax cannot read.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax.inference import export_runner as runner
from rissole_jax.diffusion import solvers as samplers
from rissole_jax.errors import ConfigError
from rissole_jax.inference.sampler import Settings, sample_latents, skip_plan
from rissole_jax.files import atomic_write_bytes, atomic_write_json

PLATFORMS = ("cpu", "cuda", "tpu")


# ---------------------------------------------------------------------------
# The program.

def program(config, model, schedule, decode_fn, stats, treedef):
  """fn(*param_leaves, nb_raw, seeds) -> uint8 images, for jax.export."""
  mean, std = jnp.asarray(stats["mean"]), jnp.asarray(stats["std"])
  settings = Settings.from_config(config.sample)

  def fn(*args):
    params, ae_params = jax.tree_util.tree_unflatten(treedef, args[:-2])
    nb, seeds = args[-2:]
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    z = sample_latents(model, params, schedule, config.diffusion.prediction, settings,
                       (nb - mean) / std, keys, skip_plan(model, config, settings)) * std + mean
    img = decode_fn(ae_params, z)
    return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return fn


def build(sampler, quantize: str | None = None):
  """(fn, param leaves, treedef, Quantized) for a sampler's parts."""
  from rissole_jax.inference import quantize as qz
  config = sampler.config
  samplers.check_config(config.sample, config.diffusion.timesteps)
  mode = quantize if quantize is not None else config.sample.get("quantize", "none")
  q = qz.quantize_parts(sampler, mode)
  if q.mode == "none":   # the decoder's parameters only: the encoder is not in the sampler
    q.ae_params = qz.decoder_params(q.ae_params)
  leaves, treedef = jax.tree_util.tree_flatten((jax.device_get(q.params), jax.device_get(q.ae_params)))
  leaves = [np.asarray(a) for a in leaves]
  fn = program(config, q.model, sampler.schedule, q.decode_fn, sampler.stats, treedef)
  return fn, leaves, treedef, q


def _arg_specs(leaves, latent_shape, k: int, batch_symbolic: bool, batch: int):
  b = jax.export.symbolic_shape("b")[0] if batch_symbolic else batch
  return ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
          + [jax.ShapeDtypeStruct((b, k, *latent_shape), jnp.float32),
             jax.ShapeDtypeStruct((b,), jnp.uint32)])


def export_stablehlo(sampler, out_dir, *, batch_symbolic: bool = True, platforms=PLATFORMS,
                     quantize: str | None = None, batch: int = 8, say=print) -> dict:
  """Writes the exported sampler, its parameters, the database, run.py and
  manifest.json to out_dir; returns the manifest. `sampler`: anything with
  config, model, params, ae, stats, db, schedule (a rissole_jax.Sampler).
  Platforms JAX cannot lower for here are dropped (and listed as skipped)."""
  from rissole_jax.inference import quantize as qz
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fn, leaves, treedef, q = build(sampler, quantize)
  latent_shape = tuple(int(v) for v in sampler.stats["latent_shape"])
  k = int(sampler.db.neighbours.shape[1])
  specs = _arg_specs(leaves, latent_shape, k, batch_symbolic, batch)
  exported, skipped = None, {}
  wanted = [p for p in platforms]
  while wanted:
    try:
      exported = jax.export.export(jax.jit(fn), platforms=tuple(wanted))(*specs)
      break
    except Exception as e:   # a platform this jax cannot lower for: drop it, say which
      bad = next((p for p in wanted if p != "cpu" and p in str(e).lower()), None)
      bad = bad or (wanted[-1] if len(wanted) > 1 else None)
      if bad is None:
        raise
      skipped[bad] = str(e).splitlines()[0][:300]
      wanted.remove(bad)
      say(f"export: skipping platform {bad}: {skipped[bad]}")
  blob = exported.serialize()
  atomic_write_bytes(out / "sampler.stablehlo", bytes(blob))
  qz.save_params(out / "params.npz", [np.asarray(a) for a in leaves])
  _save_npz(out / "database.npz", **database_arrays(sampler))
  runner_src = Path(runner.__file__).read_bytes()
  atomic_write_bytes(out / "run.py", runner_src)
  s = sampler.config.sample
  manifest = {
      "format": runner.FORMAT, "format_version": runner.FORMAT_VERSION,
      "jax_version": jax.__version__, "calling_convention_version":
          int(exported.calling_convention_version),
      "platforms": list(exported.platforms), "platforms_skipped": skipped,
      "program": "sampler.stablehlo", "params": "params.npz", "database": "database.npz",
      "num_params": len(leaves), "batch": "symbolic" if batch_symbolic else batch,
      "inputs": {"neighbours": ["B", k, *latent_shape], "seeds": ["B"]},
      "output": ["B", *(int(v) for v in _image_shape(sampler))],
      "sampler": {"name": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
                  "guidance_scale": float(s.guidance_scale), **samplers.options(s)},
      "nfe_per_image": _nfe(sampler),
      "quantize": q.mode, "keep_float": list(q.keep_float),
      "bytes": {"program": len(blob), "denoiser": qz.param_bytes(q.params),
                "decoder": qz.param_bytes(q.ae_params),
                "database": int((out / "database.npz").stat().st_size)},
      "sha256": {n: _sha(out / n) for n in ("sampler.stablehlo", "params.npz", "database.npz")},
  }
  atomic_write_json(out / "manifest.json", manifest)
  return manifest


def database_arrays(sampler) -> dict:
  """The database as stored beside the program: the neighbour table, and the
  latents as codebook indices plus the codebook (rissole_jax/store/codes.py: 16x
  smaller than float32 with a 256-entry codebook), or float32 latents where
  they are not codebook vectors."""
  from rissole_jax.store import codes as codes_lib
  from rissole_jax.errors import DataError
  out = {"neighbours": np.asarray(sampler.db.neighbours, np.int32)}
  cb = codes_lib.codebook_of(sampler.ae.params)
  codes = getattr(sampler.db, "codes", None)
  if cb is not None and codes is None:
    try:
      codes = codes_lib.to_codes(sampler.db.latents, cb)
    except DataError:
      codes = None
  if codes is not None:
    return {**out, "codes": codes, "codebook": cb}
  return {**out, "latents": np.asarray(sampler.db.latents, np.float32)}


def _image_shape(sampler):
  d = sampler.config.data
  return (d.image_size, d.image_size, d.channels)


def _nfe(sampler) -> int:
  s, T = sampler.config.sample, sampler.config.diffusion.timesteps
  n = samplers.num_steps(s, T) * (1 if s.guidance_scale == 1.0 else 2)
  return n * (blk.num_blocks(sampler.config.blocks.grid) if sampler.model.prev_block else 1)


def _save_npz(path: Path, **arrays) -> None:
  import io
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())


def _sha(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# The CLI is `python -m rissole_jax.export --format stablehlo` (export.py).

def _load_config(spec: str):
  import importlib.util
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_rissole_config", path)
  if mod_spec is None:
    raise ConfigError(f"--config {path}: no such config file.")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg)

