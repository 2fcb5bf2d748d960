"""VQ-GAN training machinery: the train step and its builder (`build`, one
compiled step per config). The trained autoencoder for the later stages
(`Autoencoder`, `load_autoencoder`) is models/autoencoder.py, re-exported
here. The vqgan stage itself (the training loop, held-out evaluation) is
stages/vqgan.py.

One jitted step updates the generator (encoder, decoder), the discriminator and
the EMA codebook together. Randomness is fold_in(key, step) and batches are a
pure function of (seed, step), so a resumed run ends with exactly the
parameters of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rissole_jax.runtime import parallel
from rissole_jax.errors import ConfigError
from rissole_jax.models import vqgan as vq
from rissole_jax.models.autoencoder import (Autoencoder, load_autoencoder,  # noqa: F401
                                           params_fingerprint)
from rissole_jax.train import guard, optim


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
  # As parallel.sharded_init, but compiled once per config: tests and resumed
  # runs reuse it.
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
