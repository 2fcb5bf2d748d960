"""VQ-GAN training machinery: the train step, its builder (`build`, one
compiled step per config) and the trained autoencoder for the later stages
(`Autoencoder`, `load_autoencoder`). The vqgan stage itself (the training loop,
held-out evaluation) is stages/vqgan.py.

One jitted step updates the generator (encoder, decoder), the discriminator and
the EMA codebook together. Randomness is fold_in(key, step) and batches are a
pure function of (seed, step), so a resumed run ends with exactly the
parameters of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rissole_jax.runtime import parallel
from rissole_jax.errors import ConfigError
from rissole_jax.models import vqgan as vq
from rissole_jax.train import checkpoints, guard, optim


# ---------------------------------------------------------------------------
# Losses and the train step.

# The step's parts besides the generator's modules, as jax named scopes: op
# metadata only (the compiled arithmetic is the same); benchmarks/profile.py
# groups the step's ops by them.
SCOPES = ("gan_loss", "adaptive_weight", "discriminator_update", "optimizer", "codebook_ema",
          "metrics_and_guard")


def init_fn(model, disc, g_tx, d_tx, config):
  """key -> the train state (boxed with logical axes, for parallel.sharded_init)."""
  v, size, ch = config.vqgan, config.data.image_size, config.data.channels

  def init(key):
    kg, kd = jax.random.split(key)
    x = jnp.zeros((1, size, size, ch), jnp.float32)
    g_params = model.init(kg, x)["params"]
    d_params = disc.init(kd, x)["params"]
    return {"step": jnp.zeros((), jnp.int32), "g_params": g_params, "d_params": d_params,
            "g_opt": g_tx.init(g_params), "d_opt": d_tx.init(d_params),
            "ema": vq.init_ema_stats(v.codebook_size, v.z_channels)}
  return init


def generator_loss(model, disc, v):
  """(g_params, d_params, images, gan_on) -> (loss, aux)."""
  last = vq.last_layer(model.out_channels)

  def gan_terms(x, x_rec, feats, last_params, d_params):
    with jax.named_scope("gan_loss"):
      g_loss = vq.hinge_g_loss(disc.apply({"params": d_params}, x_rec))
    # Adaptive weight: gradients of both losses w.r.t. the last layer's kernel.
    # Its inputs are cut from the outer gradient (the weight is a constant there).
    with jax.named_scope("adaptive_weight"):
      feats, last_params = jax.lax.stop_gradient((feats, last_params))
      out = lambda k: last.apply({"params": {**last_params, "kernel": k}}, feats)
      rec = lambda k: vq.reconstruction_loss(x, out(k), v.l1_weight, v.l2_weight)[0]
      gan = lambda k: vq.hinge_g_loss(disc.apply({"params": d_params}, out(k)))
      w = vq.adaptive_weight(jax.grad(rec)(last_params["kernel"]),
                             jax.grad(gan)(last_params["kernel"]), v.disc_weight)
    return g_loss, w

  def loss(g_params, d_params, x, gan_on):
    x_rec, aux = model.apply({"params": g_params}, x, return_features=True)
    rec, parts = vq.reconstruction_loss(x, x_rec, v.l1_weight, v.l2_weight)
    # Computed every step and masked, not under lax.cond: XLA:CPU runs the
    # branches of a conditional many times slower than the same ops outside
    # one (measured: ~50x for the discriminator update), and the discriminator
    # costs a few percent of the generator.
    g_loss, w = gan_terms(x, x_rec, aux["features"], g_params["decoder"]["conv_out"], d_params)
    g_loss, w = jnp.where(gan_on, g_loss, 0.0), jnp.where(gan_on, w, 0.0)
    total = rec + aux["commit_loss"] + w * g_loss
    return total, {"x_rec": x_rec, "z_e": aux["z_e"], "indices": aux["indices"],
                   "rec_loss": rec, "commit_loss": aux["commit_loss"], "gan_g_loss": g_loss,
                   "d_weight": w, **parts}
  return loss


def discriminator_grads(disc):
  """(d_params, real, fake, gan_on) -> (grads, metrics); zero grads (so no
  update: Adam moves nothing on zero gradients) before the GAN switches on."""
  def loss(d_params, real, fake):
    lr = disc.apply({"params": d_params}, real)
    lf = disc.apply({"params": d_params}, fake)
    return vq.hinge_d_loss(lr, lf), {"logits_real": jnp.mean(lr), "logits_fake": jnp.mean(lf)}

  def grads(d_params, real, fake, gan_on):
    (value, m), g = jax.value_and_grad(loss, has_aux=True)(d_params, real, fake)
    off = lambda t: jax.tree.map(lambda a: jnp.where(gan_on, a, jnp.zeros_like(a)), t)
    return off(g), off({"d_loss": value, **m})
  return grads


def code_stats(indices, k: int, weights=None) -> dict:
  """Fraction of the k codes used and the perplexity exp(H) of their frequencies."""
  counts = jnp.zeros((k,)).at[indices.reshape(-1)].add(
      1.0 if weights is None else weights.reshape(-1))
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0))
  return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


def make_train_step(model, disc, g_tx, d_tx, config):
  """step(state, key, images) -> (state, metrics): one jittable update."""
  v = config.vqgan
  g_loss = generator_loss(model, disc, v)
  d_grads = discriminator_grads(disc)

  def step(state, key, images):
    key = jax.random.fold_in(key, state["step"])
    gan_on = state["step"] >= v.disc_start
    (loss, aux), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        state["g_params"], state["d_params"], images, gan_on)
    with jax.named_scope("discriminator_update"):
      d_g, d_metrics = d_grads(state["d_params"], images, jax.lax.stop_gradient(aux["x_rec"]),
                               gan_on)

    with jax.named_scope("optimizer"):
      updates, g_opt = g_tx.update(g_grads, state["g_opt"], state["g_params"])
      g_params = optax.apply_updates(state["g_params"], updates)
      updates, d_opt = d_tx.update(d_g, state["d_opt"], state["d_params"])
      d_params = optax.apply_updates(state["d_params"], updates)

    # The codebook follows the EMA of its assigned encoder outputs, not the optimizer.
    with jax.named_scope("codebook_ema"):
      z = jax.lax.stop_gradient(aux["z_e"]).reshape(-1, v.z_channels)
      ema, codebook = vq.ema_update(state["ema"], z, aux["indices"].reshape(-1), v.ema_decay)
      ema, codebook, restarted = vq.restart_dead_codes(ema, codebook, z, v.dead_code_threshold,
                                                       key)
    g_params = {**g_params, "quantizer": {**g_params["quantizer"], "codebook": codebook}}

    new = {"step": state["step"] + 1, "g_params": g_params, "d_params": d_params,
           "g_opt": g_opt, "d_opt": d_opt, "ema": ema}
    with jax.named_scope("metrics_and_guard"):
      stats = code_stats(aux["indices"], v.codebook_size)
      metrics = {"loss": loss, "rec_loss": aux["rec_loss"], "l1": aux["l1"], "l2": aux["l2"],
                 "commit_loss": aux["commit_loss"], "gan_g_loss": aux["gan_g_loss"],
                 "d_weight": aux["d_weight"], **d_metrics,
                 "batch_usage": stats["usage"], "batch_perplexity": stats["perplexity"],
                 "restarted": restarted, "g_grad_norm": optax.tree.norm(g_grads),
                 "d_grad_norm": optax.tree.norm(d_g)}
      # The losses, both gradient norms and everything the step updated.
      checked = (loss, d_metrics["d_loss"], metrics["g_grad_norm"], metrics["d_grad_norm"],
                 g_params, d_params, ema)
      return guard.finite_step(v.train.nan_policy, state, new, metrics, *checked)
  return step


# ---------------------------------------------------------------------------
# Building (cached: tests and the stage reuse one compiled step per config).

@dataclasses.dataclass
class Trainer:
  model: vq.VQModel
  disc: vq.Discriminator
  init: Callable            # key -> boxed state
  init_state: Callable      # key -> the state, created sharded (jitted once)
  state_shardings: Any
  abstract_state: Any       # ShapeDtypeStructs with shardings (for restoring)
  step: Callable            # jitted (state, key, images) -> (state, metrics)
  mesh: Any


_TRAINERS: dict = {}


def make_optimizers(config):
  """(generator, discriminator) optimizers: same schedule, their own learning rates."""
  t = config.vqgan.train
  return optim.adam(t), optim.adam(t, lr=t.disc_lr)


def _trainer_key(config, mesh) -> str:
  keys = {"vqgan": config.vqgan.to_dict(), "size": config.data.image_size,
          "channels": config.data.channels, "rules": config.mesh.logical_axis_rules,
          "mesh": (mesh.axis_names, mesh.devices.shape, [d.id for d in mesh.devices.flat])}
  for k in ("log_every", "ckpt_every", "keep_checkpoints", "max_skipped_steps"):  # no effect on the step
    keys["vqgan"]["train"].pop(k, None)
  return json.dumps(keys, sort_keys=True, default=str)


def build(config, mesh) -> Trainer:
  """The models, optimizers and jitted step for `config` on `mesh` (cached)."""
  vq.check_config(config)
  key = _trainer_key(config, mesh)
  if key in _TRAINERS:
    return _TRAINERS[key]
  rules = config.mesh.logical_axis_rules
  model, disc = vq.make_model(config), vq.make_discriminator(config)
  g_tx, d_tx = make_optimizers(config)
  init = init_fn(model, disc, g_tx, d_tx, config)
  abstract = jax.eval_shape(init, keys(0)[0])
  shardings = parallel.shardings_for(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract), shardings)
  # As parallel.sharded_init, but compiled once per config: tests, resumed runs
  # and load_autoencoder reuse it.
  init_state = jax.jit(lambda key: nn.meta.unbox(init(key)), out_shardings=shardings)
  repl = parallel.replicated(mesh)
  step = jax.jit(make_train_step(model, disc, g_tx, d_tx, config), donate_argnums=(0,),
                 in_shardings=(shardings, repl, parallel.batch_sharding(mesh, rules, 4)),
                 out_shardings=(shardings, repl))
  _TRAINERS[key] = Trainer(model, disc, init, init_state, shardings, abstract, step, mesh)
  return _TRAINERS[key]


def keys(seed: int):
  """(init key, step key): model initialisation and per-step randomness."""
  # "rbg" keys: XLA on CPU compiles threefry slowly (one unrolled hash per
  # parameter initialiser: tens of seconds for a small model); rbg compiles in a
  # fraction of that and is as deterministic for a given mesh.
  return jax.random.split(jax.random.key(seed, impl="rbg"))


def check_batch(config, mesh) -> None:
  rules = config.mesh.logical_axis_rules
  shards = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh, rules)]))
  bs = config.vqgan.train.batch_size
  if bs % shards:
    raise ConfigError(f"vqgan.train.batch_size={bs} must be divisible by the {shards} "
                      f"devices the batch is split over (mesh {dict(mesh.shape)}).")


# ---------------------------------------------------------------------------
# The downstream API.

class Autoencoder:
  """The trained VQ-GAN generator for the later stages.

  .model        the VQModel (Flax module; apply it with .params)
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


def load_autoencoder(config, vqgan_dir) -> Autoencoder:
  """The generator trained by the vqgan stage in `vqgan_dir` (its final checkpoint).

  Raises DataError when the stage has not finished there, or CheckpointError
  (after marking the stage unfinished, so that a rerun remakes it) when its
  final checkpoint is damaged."""
  vq.check_config(config)
  steps = config.vqgan.train.steps
  mesh = parallel.make_mesh(config.mesh)
  trainer = build(config, mesh)
  repl = parallel.replicated(mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        trainer.abstract_state)
  fix = ("Fix: run the vqgan stage first (python -m rissole_jax.main "
         f"--config ... --workdir {Path(vqgan_dir).parent} --only vqgan); it resumes from its "
         "last checkpoint.")
  state = checkpoints.restore_final(Path(vqgan_dir), "vqgan", steps, target, fix)
  return Autoencoder(config, state["g_params"], mesh)
