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

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.diffusion import solvers
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.files import atomic_save_npz, atomic_write_bytes, atomic_write_json, sha256_file
from rissole_jax.inference import export_runner as runner
from rissole_jax.inference import quantize as qz
from rissole_jax.inference.database import stored_arrays
from rissole_jax.inference.program import (Settings, nfe, params_for, sample_latents,
                                           skip_plan)
from rissole_jax.store import codes as codes_lib

PLATFORMS = ("cpu", "cuda", "tpu")   # tried when no platforms are given
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")   # jax.export's names


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
  config = sampler.config
  solvers.check_config(config.sample, config.diffusion.timesteps)
  mode = quantize if quantize is not None else config.sample.get("quantize", "none")
  settings = Settings.from_config(config.sample)
  if settings.sampler == solvers.DISTILLED:   # the program runs the student, alone
    sampler = copy.copy(sampler)
    sampler.params, sampler.students = params_for(sampler, settings), {}
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


def export_stablehlo(sampler, out_dir, *, batch_symbolic: bool = True, platforms=None,
                     quantize: str | None = None, batch: int = 8, say=print) -> dict:
  """Writes the exported sampler, its parameters, the database, run.py and
  manifest.json to out_dir; returns the manifest. `sampler`: anything with
  config, model, params, ae, stats, db, schedule (a rissole_jax.Sampler).
  platforms: those to lower for, each required (ConfigError naming the one
  that fails and why); None tries PLATFORMS and drops (and lists as skipped)
  those JAX cannot lower for here."""
  out = Path(out_dir)
  if platforms is not None:
    platforms = tuple(platforms)
    if not platforms:
      raise ConfigError("export: no platforms given. Fix: name at least one of "
                        f"{KNOWN_PLATFORMS}, or give none to try {PLATFORMS}.")
    for p in platforms:   # a typo is refused here: jax.export would lower for any name
      check_choice("export platform", p, KNOWN_PLATFORMS)
  fn, leaves, treedef, q = build(sampler, quantize)
  latent_shape = tuple(int(v) for v in sampler.stats["latent_shape"])
  k = int(sampler.db.neighbours.shape[1])
  specs = _arg_specs(leaves, latent_shape, k, batch_symbolic, batch)
  if platforms is not None:
    exported, skipped = _export_required(fn, specs, platforms), {}
  else:
    exported, skipped = _export_available(fn, specs, say)
  out.mkdir(parents=True, exist_ok=True)
  blob = exported.serialize()
  atomic_write_bytes(out / "sampler.stablehlo", bytes(blob))
  qz.save_params(out / "params.npz", [np.asarray(a) for a in leaves])
  atomic_save_npz(out / "database.npz", **database_arrays(sampler))
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
                  "guidance_scale": float(s.guidance_scale),
                  "guidance_interval": [float(v) for v in s.get("guidance_interval",
                                                                solvers.EVERY_STEP)],
                  **solvers.options(s)},
      "nfe_per_image": nfe(Settings.from_config(s), sampler.config, sampler.model),
      "quantize": q.mode, "keep_float": list(q.keep_float),
      "bytes": {"program": len(blob), "denoiser": qz.param_bytes(q.params),
                "decoder": qz.param_bytes(q.ae_params),
                "database": int((out / "database.npz").stat().st_size)},
      "sha256": {n: sha256_file(out / n) for n in ("sampler.stablehlo", "params.npz",
                                                   "database.npz")},
  }
  atomic_write_json(out / "manifest.json", manifest)
  return manifest


def lower(fn, specs, platforms: tuple):
  """jax.export of `fn` for `platforms` (one program serving all of them)."""
  return jax.export.export(jax.jit(fn), platforms=platforms)(*specs)


def _export_required(fn, specs, platforms: tuple):
  """The program lowered for every one of `platforms`, or ConfigError naming
  the platform that cannot be lowered here and why."""
  try:
    return lower(fn, specs, platforms)
  except Exception as e:  # jax raises many types for a platform it cannot lower for
    err = e
  for p in platforms:   # which one: each alone (only on failure, so no cost otherwise)
    try:
      lower(fn, specs, (p,))
    except Exception as e:  # noqa: BLE001
      err, bad = e, p
      break
  else:
    bad = ",".join(platforms)
  why = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
  raise ConfigError(f"export: cannot lower the sampler for platform {bad!r} here: {why}. "
                    "Fix: drop it from --platforms (or leave --platforms out: the platforms "
                    "that lower are kept, the others listed as skipped).") from err


def _export_available(fn, specs, say):
  """(exported, {platform: why skipped}): PLATFORMS, less those JAX cannot
  lower for here."""
  exported, skipped = None, {}
  wanted = list(PLATFORMS)
  while wanted:
    try:
      exported = lower(fn, specs, tuple(wanted))
      break
    except Exception as e:   # a platform this jax cannot lower for: drop it, say which
      bad = next((p for p in wanted if p != "cpu" and p in str(e).lower()), None)
      bad = bad or (wanted[-1] if len(wanted) > 1 else None)
      if bad is None:
        raise
      skipped[bad] = str(e).splitlines()[0][:300]
      wanted.remove(bad)
      say(f"export: skipping platform {bad}: {skipped[bad]}")
  return exported, skipped


def database_arrays(sampler) -> dict:
  """The database as stored beside the program (database.npz): the neighbour
  table, and the latents as codebook indices plus the codebook, or float32
  latents where they are not codebook vectors (inference/database.py)."""
  cb = codes_lib.codebook_of(sampler.ae.params)
  arrays = stored_arrays(sampler.db, cb)
  return {**arrays, "codebook": cb} if "codes" in arrays else arrays


def _image_shape(sampler):
  d = sampler.config.data
  return (d.image_size, d.image_size, d.channels)
