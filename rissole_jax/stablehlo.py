"""The whole sampler as a StableHLO program (jax.export), runnable without
this package: `rissole_jax/export_runner.py` (copied beside it as run.py)
needs only jax and numpy.

  python -m rissole_jax.stablehlo --config configs/mnist.py --workdir DIR --out EXPORT_DIR \
      [--quantize none|int8_weights|int8] [--platforms cpu,cuda,tpu]
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
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax import export_runner as runner
from rissole_jax.diffusion import samplers
from rissole_jax.errors import ConfigError
from rissole_jax.workdir import atomic_write_bytes, atomic_write_json

PLATFORMS = ("cpu", "cuda", "tpu")


# ---------------------------------------------------------------------------
# The program.

def _row_keys(keys, n: int):
  """(B, 2) image keys -> (B*n, 2) block keys, example-major."""
  per = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(keys)
  return per.reshape(-1, keys.shape[-1])


def _fold(x):
  return x.reshape((-1,) + x.shape[2:])


def sample_latents_rows(model, params, schedule, config, nb, keys):
  """Normalised latents (B, h, w, c) for normalised neighbour latents nb
  (B, k, h, w, c) and one key per image (B, 2): every row's noise from its
  own key (so B can be symbolic and an image does not depend on its batch).
  Blocks all at once, or in raster order with previous-block conditioning."""
  s = config.sample
  B, shape = nb.shape[0], nb.shape[2:]

  def run(cond, row_keys, row_shape):
    def pred_fn(x, t, keep):
      return model.apply({"params": params}, x, t, **cond,
                         keep=keep if model.learn_null else None)
    model_fn = samplers.guided(pred_fn, schedule, config.diffusion.prediction, s.guidance_scale)
    x_T = jax.vmap(lambda k: samplers.normal(jax.random.fold_in(k, 0), row_shape))(row_keys)
    run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(row_keys)
    return samplers.run_sampler(s.sampler, schedule, model_fn, x_T, run_keys, s.steps, s.eta,
                                **samplers.options(s))

  if not model.blocks:
    return run({"neighbours": nb if model.retrieval else None}, keys, shape)
  n = blk.num_blocks(model.grid)
  bshape = blk.block_shape(shape, model.grid)
  nbb = blk.split(nb, model.grid) if model.retrieval else None     # (B, k, n, bh, bw, c)
  if not model.prev_block:
    cond = {"pos": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)).reshape(-1),
            "neighbours": _fold(jnp.swapaxes(nbb, 1, 2)) if model.retrieval else None}
    x = run(cond, _row_keys(keys, n), bshape)
    return blk.merge(x.reshape((B, n) + x.shape[1:]), model.grid)
  nbb = jnp.moveaxis(nbb, 2, 0) if model.retrieval else None       # (n, B, k, ...)

  def one_block(prev, inputs):
    i, nb_i = inputs
    cond = {"pos": jnp.full((B,), i, jnp.int32), "neighbours": nb_i, "prev": prev}
    x = run(cond, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), bshape)
    return x, x

  _, xs = jax.lax.scan(one_block, jnp.zeros((B, *bshape), nb.dtype),
                       (jnp.arange(n, dtype=jnp.int32), nbb))
  return blk.merge(jnp.moveaxis(xs, 0, 1), model.grid)


def program(config, model, schedule, decode_fn, stats, treedef):
  """fn(*param_leaves, nb_raw, seeds) -> uint8 images, for jax.export."""
  mean, std = jnp.asarray(stats["mean"]), jnp.asarray(stats["std"])

  def fn(*args):
    params, ae_params = jax.tree_util.tree_unflatten(treedef, args[:-2])
    nb, seeds = args[-2:]
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    z = sample_latents_rows(model, params, schedule, config, (nb - mean) / std, keys) * std + mean
    img = decode_fn(ae_params, z)
    return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return fn


def build(sampler, quantize: str | None = None):
  """(fn, param leaves, treedef, Quantized) for a sampler's parts."""
  from rissole_jax import quantize as qz
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
  from rissole_jax import quantize as qz
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
  latents as codebook indices plus the codebook where every latent is a
  codebook vector (a VQ-GAN's are: 16x smaller than float32 with a 256-entry
  codebook), float32 latents otherwise."""
  lat = np.asarray(sampler.db.latents, np.float32)
  out = {"neighbours": np.asarray(sampler.db.neighbours, np.int32)}
  cb = _codebook(sampler)
  if cb is not None and len(cb) <= 65536:
    flat = lat.reshape(-1, lat.shape[-1])
    codes = np.concatenate([np.argmin(np.sum(flat[s:s + 8192, None, :] ** 2, -1)
                                      - 2 * flat[s:s + 8192] @ cb.T + np.sum(cb ** 2, -1), -1)
                            for s in range(0, len(flat), 8192)])
    # The encoder's straight-through output equals its codebook vector up to
    # float rounding: indices are exact to that rounding.
    if np.allclose(cb[codes], flat, rtol=1e-5, atol=1e-6):
      dtype = np.uint8 if len(cb) <= 256 else np.uint16
      return {**out, "codes": codes.reshape(lat.shape[:-1]).astype(dtype), "codebook": cb}
  return {**out, "latents": lat}


def _codebook(sampler):
  try:
    return np.asarray(sampler.ae.params["quantizer"]["codebook"], np.float32)
  except (KeyError, TypeError, AttributeError):
    return None


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
# CLI (also called by `python -m rissole_jax.export --format stablehlo`).

def main(argv=None) -> int:
  import argparse
  from rissole_jax.benchmarks.solvers import load_parts
  p = argparse.ArgumentParser(description="Export the whole sampler as StableHLO.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--config", default="configs/mnist.py",
                 help="config file[:variants] the workdir was made with")
  p.add_argument("--quantize", default=None, choices=("none", "int8_weights", "int8"))
  p.add_argument("--platforms", default=",".join(PLATFORMS))
  p.add_argument("--set", action="append", default=[],
                 help="sample.KEY=VALUE overrides, e.g. --set sampler=dpmpp --set steps=20")
  a = p.parse_args(argv)
  config = _load_config(a.config)
  for item in a.set:
    key, _, value = item.partition("=")
    old = config.sample[key]
    config.sample[key] = type(old)(value) if old is not None and not isinstance(old, bool) \
        else (value.lower() == "true" if isinstance(old, bool) else value)
  m = export_stablehlo(load_parts(config, a.workdir), a.out, quantize=a.quantize,
                       platforms=tuple(a.platforms.split(",")))
  print(json.dumps({k: m[k] for k in ("platforms", "quantize", "bytes", "nfe_per_image")}))
  return 0


def _load_config(spec: str):
  import importlib.util
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_rissole_config", path)
  if mod_spec is None:
    raise ConfigError(f"--config {path}: no such config file.")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg)


if __name__ == "__main__":
  sys.exit(main())
