"""The trained VQ-GAN as the later stages and sampling use it: the generator's
params with jitted encode and decode (`Autoencoder`), and `load_autoencoder`,
which reads just the generator from the vqgan stage's final checkpoint (no
discriminator, optimizers or train step: training is train/vqgan.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.models import vqgan as vq
from rissole_jax.runtime import parallel


class Autoencoder:
  """The trained VQ-GAN generator for the later stages.

  .model        the VQModel (Flax module) the params belong to
  .params       generator params (replicated on the mesh)
  .fingerprint  sha256 of the params and the vqgan config (stable across loads)
  .latent_shape (h, w, c);  .f  the downsampling factor
  .encode(images in [-1,1], batch_size) -> quantized latents (N, h, w, c), float32
  .decode(latents, batch_size) -> images in [-1, 1], float32
  .encode_fn(params, x) / .decode_fn(params, z): pure, for use inside other jits.
  """

  def __init__(self, config, params, mesh):
    self.config, self.mesh = config, mesh
    self.model = vq.make_model(config)
    self.params = jax.device_put(params, parallel.replicated(mesh))
    self.f = vq.downsampling_factor(config.vqgan)
    self.latent_shape = vq.latent_shape(config.vqgan, config.data.image_size)
    self.fingerprint = params_fingerprint(self.params, config.vqgan)
    self._encode = jax.jit(self.encode_fn)
    self._encode_codes = jax.jit(self.encode_codes_fn)
    self._decode = jax.jit(self.decode_fn)

  @classmethod
  def from_params(cls, config, params, mesh=None):
    return cls(config, params, mesh or parallel.make_mesh(config.mesh))

  def encode_fn(self, params, x):
    """Quantized latents (B, h, w, c) of images (B, H, W, C) in [-1, 1]."""
    return self.model.apply({"params": params}, x, method=vq.VQModel.encode)[0]

  def encode_codes_fn(self, params, x):
    """Code indices (B, h, w) of images: the quantizer's own choice."""
    return self.model.apply({"params": params}, x, method=vq.VQModel.encode)[1]

  def decode_fn(self, params, z):
    """Images (B, H, W, C) in [-1, 1] (clipped) of latents (B, h, w, c)."""
    return jnp.clip(self.model.apply({"params": params}, z, method=vq.VQModel.decode), -1, 1)

  def encode(self, images, batch_size: int = 256) -> np.ndarray:
    return self._batched(self._encode, images, batch_size, self.latent_shape)

  def encode_codes(self, images, batch_size: int = 256) -> np.ndarray:
    """Code indices (N, h, w) (uint8/uint16) of images in [-1, 1]: what the
    database stores (no nearest-code search after the fact)."""
    from rissole_jax.store.codes import code_dtype
    idx = self._batched(self._encode_codes, images, batch_size, tuple(self.latent_shape[:2]),
                        np.int32)
    return idx.astype(code_dtype(self.config.vqgan.codebook_size))

  def decode(self, latents, batch_size: int = 256) -> np.ndarray:
    size, ch = self.config.data.image_size, self.config.data.channels
    return self._batched(self._decode, latents, batch_size, (size, size, ch))

  def _batched(self, fn, x, batch_size: int, out_shape, dtype=np.float32) -> np.ndarray:
    """fn over x in batches of one static size (the last one padded), each split
    over the mesh's batch axes. Every process passes the same x and gets all rows."""
    x = np.asarray(x, np.float32)
    rules = self.config.mesh.logical_axis_rules
    shards = int(np.prod([self.mesh.shape[a] for a in parallel.batch_axes(self.mesh, rules)]))
    bs = -(-min(batch_size, max(len(x), 1)) // shards) * shards
    sharding = parallel.batch_sharding(self.mesh, rules, x.ndim)
    out = []
    for s in range(0, len(x), bs):
      chunk = x[s:s + bs]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)])
      arr = jax.make_array_from_callback(padded.shape, sharding, lambda i: padded[i])
      out.append(parallel.to_host(fn(self.params, arr))[:len(chunk)])
    if not out:
      return np.zeros((0, *out_shape), dtype)
    return np.concatenate(out).astype(dtype)


def params_fingerprint(params, vq_cfg) -> str:
  """sha256 over the vqgan config and every parameter (path, shape, dtype, bytes)."""
  h = hashlib.sha256(json.dumps(vq_cfg.to_dict(), sort_keys=True, default=str).encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda pl: jax.tree_util.keystr(pl[0])):
    a = np.ascontiguousarray(parallel.to_host(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def abstract_params(config, mesh):
  """The generator's params as abstract arrays, replicated on `mesh`: a restore
  target that costs no initialisation."""
  size, ch = config.data.image_size, config.data.channels
  model = vq.make_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, ch), jnp.float32)))
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                      nn.meta.unbox(shapes["params"]))


def load_autoencoder(config, vqgan_dir) -> Autoencoder:
  """The generator trained by the vqgan stage in `vqgan_dir` (its final checkpoint).

  Raises DataError when the stage has not finished there, or CheckpointError
  (after marking the stage unfinished, so that a rerun remakes it) when its
  final checkpoint is damaged."""
  from rissole_jax.store import checkpoints
  vq.check_config(config)
  mesh = parallel.make_mesh(config.mesh)
  fix = ("Fix: run the vqgan stage first (python -m rissole_jax.main "
         f"--config ... --workdir {Path(vqgan_dir).parent} --only vqgan); it resumes from its "
         "last checkpoint.")
  params = checkpoints.restore_final(Path(vqgan_dir), "vqgan", config.vqgan.train.steps,
                                     abstract_params(config, mesh), fix, only="g_params")
  return Autoencoder(config, params, mesh)
