"""The VQ-GAN: shapes, quantizer gradients and codebook updates, the GAN switch,
training, exact resume, the downstream Autoencoder API, and bad configs.

Every trainer test shares one tiny config, so the train step compiles once.
"""
import logging
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import mnist  # noqa: E402
from rissole_jax.runtime import parallel  # noqa: E402
from rissole_jax.stages.context import Context  # noqa: E402
from rissole_jax.data import ArraySource, TrainStream, to_float  # noqa: E402
from rissole_jax.errors import ConfigError, DataError  # noqa: E402
from rissole_jax.models import vqgan as vq  # noqa: E402
from rissole_jax.stages import vqgan as vqgan_stage  # noqa: E402
from rissole_jax.train import checkpoints  # noqa: E402
from rissole_jax.train import vqgan as T  # noqa: E402

SIZE = 16


def tiny_config(**vq_overrides):
  c = mnist.get_config("smoke")
  c.data.image_size = SIZE
  c.vqgan.update(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_lowest=True, z_channels=4,
                 codebook_size=16, disc_ch=4, disc_layers=2, disc_start=3, disc_weight=0.5)
  c.vqgan.train.update(steps=6, batch_size=8, lr=1e-3, disc_lr=1e-3, warmup_steps=1,
                       log_every=2, ckpt_every=2, keep_checkpoints=2)
  c.vqgan.update(**vq_overrides)
  return c


def synthetic_images(n, seed):
  """Random bright rectangles on black, like strokes on an MNIST background."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, SIZE, SIZE, 1), np.uint8)
  for i in range(n):
    for _ in range(2):
      t, l = rng.integers(0, SIZE - 4, 2)
      h, w = rng.integers(2, 8, 2)
      x[i, t:t + h, l:l + w] = rng.integers(128, 256)
  return x


@pytest.fixture
def fake_data(monkeypatch):
  """The stage reads these instead of the embedded MNIST (20 held-out: a padded batch)."""
  sources = {"train": ArraySource("train", synthetic_images(64, 0)),
             "heldout": ArraySource("heldout", synthetic_images(20, 1))}
  monkeypatch.setattr(vqgan_stage, "load_source", lambda data_cfg, split: sources[split])
  return sources


class StopAfter(Exception):
  pass


class Ctx(Context):
  """A stage context whose progress bar can interrupt the run after n steps."""
  stop_after: int | None = None

  def progress(self, total, initial=0, desc=None):
    bar = super().progress(total, initial, desc)
    if self.stop_after is not None:
      update, done = bar.update, [initial]

      def interrupting(n=1):
        update(n)
        done[0] += n
        if done[0] >= self.stop_after:
          raise StopAfter()
      bar.update = interrupting
    return bar


def make_ctx(config, root, stop_after=None):
  ctx = Ctx(config=config, root=root, stage="vqgan", logger=logging.getLogger("test.vqgan"),
            progress_bars=False)
  ctx.stop_after = stop_after
  return ctx


def param_shapes(module, x):
  return jax.tree.map(lambda a: a.shape, nn.meta.unbox(
      jax.eval_shape(module.init, jax.random.PRNGKey(0), x))["params"])


# ---------------------------------------------------------------------------
# Models.

@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_encoder_decoder_shapes(ch_mult, f):
  c = tiny_config(ch_mult=ch_mult)
  c.data.image_size = 32
  model = vq.make_model(c)
  x = jnp.zeros((2, 32, 32, 1))
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  z, idx = jax.eval_shape(lambda p, x: model.apply(p, x, method=vq.VQModel.encode), params, x)
  assert vq.downsampling_factor(c.vqgan) == f
  assert z.shape == (2, 32 // f, 32 // f, 4) == (2, *vq.latent_shape(c.vqgan, 32))
  assert idx.shape == (2, 32 // f, 32 // f)
  out = jax.eval_shape(lambda p, z: model.apply(p, z, method=vq.VQModel.decode), params, z)
  assert out.shape == x.shape


def test_architecture_keys_act():
  x = jnp.zeros((1, SIZE, SIZE, 1))
  base = param_shapes(vq.make_model(tiny_config()), x)
  assert base["encoder"]["conv_in"]["kernel"] == (3, 3, 1, 8)
  assert base["quantizer"]["codebook"] == (16, 4)
  assert "mid_attn" in base["encoder"] and "mid_attn" in base["decoder"]
  wide = param_shapes(vq.make_model(tiny_config(ch=12, z_channels=3, codebook_size=10)), x)
  assert wide["encoder"]["conv_in"]["kernel"] == (3, 3, 1, 12)
  assert wide["encoder"]["conv_out"]["kernel"][-1] == 3
  assert wide["quantizer"]["codebook"] == (10, 3)
  no_attn = param_shapes(vq.make_model(tiny_config(attn_lowest=False)), x)
  assert "mid_attn" not in no_attn["encoder"] and "mid_attn" not in no_attn["decoder"]
  deeper = param_shapes(vq.make_model(tiny_config(num_res_blocks=2)), x)
  assert "down0_res1" in deeper["encoder"] and "down0_res1" not in base["encoder"]
  assert "up0_res1" in deeper["decoder"]
  d2 = param_shapes(vq.make_discriminator(tiny_config()), x)
  d3 = param_shapes(vq.make_discriminator(tiny_config(disc_ch=6, disc_layers=3)), x)
  assert d2["conv0"]["kernel"][-1] == 4 and d3["conv0"]["kernel"][-1] == 6
  assert "conv3" in d3 and "conv3" not in d2


def quantizer(k=5, d=3, beta=0.25):
  q = vq.VectorQuantizer(k, d, beta)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, d))
  params = nn.meta.unbox(q.init(jax.random.PRNGKey(0), z))
  return q, params, z


def test_quantizer_nearest_code_and_straight_through_gradient():
  q, params, z = quantizer()
  codebook = params["params"]["codebook"]
  zq, aux = q.apply(params, z)
  d = jnp.sum((z[..., None, :] - codebook) ** 2, -1)
  np.testing.assert_array_equal(aux["indices"], jnp.argmin(d, -1))
  np.testing.assert_allclose(zq, codebook[aux["indices"]], atol=1e-6)
  # Straight-through: d(sum(w * z_q))/dz = w (the quantizer is the identity backwards).
  w = jax.random.normal(jax.random.PRNGKey(2), z.shape)
  g = jax.grad(lambda z: jnp.sum(w * q.apply(params, z)[0]))(z)
  np.testing.assert_allclose(g, w, atol=1e-6)
  # No gradient reaches the codebook (it learns by EMA).
  gc = jax.grad(lambda p: jnp.sum(w * q.apply(p, z)[0]))(params)
  assert float(jnp.abs(gc["params"]["codebook"]).max()) == 0.0


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_commitment_loss_value(beta):
  q, params, z = quantizer(beta=beta)
  zq, aux = q.apply(params, z)
  np.testing.assert_allclose(aux["commit_loss"], beta * np.mean((np.asarray(z) - zq) ** 2),
                             rtol=1e-5)
  # Its gradient pulls z towards its code (and only z: the code is held fixed).
  g = jax.grad(lambda z: q.apply(params, z)[1]["commit_loss"])(z)
  np.testing.assert_allclose(g, 2 * beta * (z - zq) / z.size, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_ema_codebook_moves_toward_assigned_inputs(decay):
  k, dim = 4, 2
  stats = nn.meta.unbox(vq.init_ema_stats(k, dim))
  codebook = jnp.asarray([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [9.0, -9.0]])
  stats = {"usage": jnp.full((k,), 0.25), "embed_sum": codebook * 0.25}
  z = jnp.asarray([[1.0, 1.0], [1.0, 1.0], [4.0, 6.0], [6.0, 4.0]])
  idx = vq.nearest_code(z, codebook)
  np.testing.assert_array_equal(idx, [0, 0, 1, 1])
  new_stats, new_cb = vq.ema_update(stats, z, idx, decay)
  # Code 0: its inputs' mean is (1, 1); the code moves that way by about (1 - decay).
  assert 0.0 < float(new_cb[0, 0]) < 1.0
  np.testing.assert_allclose(new_cb[0, 0], new_cb[0, 1], rtol=1e-6)
  assert float(jnp.linalg.norm(new_cb[0] - 1.0)) < float(jnp.linalg.norm(codebook[0] - 1.0))
  np.testing.assert_allclose(new_cb[1], [5.0, 5.0], atol=1e-4)   # mean of its inputs
  np.testing.assert_allclose(new_stats["usage"], decay * 0.25 + (1 - decay) * np.array([.5, .5, 0, 0]))
  # Unused codes keep their place (the Laplace smoothing barely shifts them).
  np.testing.assert_allclose(new_cb[2:], codebook[2:], rtol=1e-3)
  if decay == 0.9:  # a slower decay moves less
    _, fast = vq.ema_update(stats, z, idx, 0.5)
    assert abs(float(fast[0, 0]) - 0.5) < abs(float(new_cb[0, 0]) - 0.5) + 0.5
    assert float(fast[0, 0]) > float(new_cb[0, 0])


@pytest.mark.parametrize("threshold", [0.05, 0.5])
def test_dead_codes_restart_from_batch_vectors(threshold):
  k, dim = 6, 3
  usage = jnp.asarray([0.3, 0.01, 0.2, 0.0, 0.4, 0.09])
  codebook = jnp.arange(k * dim, dtype=jnp.float32).reshape(k, dim) * 10
  stats = {"usage": usage, "embed_sum": codebook * usage[:, None]}
  z = jax.random.normal(jax.random.PRNGKey(0), (32, dim))
  rng = jax.random.key(3, impl="rbg")
  new_stats, new_cb, n = vq.restart_dead_codes(stats, codebook, z, threshold, rng)
  dead = np.asarray(usage) < threshold
  assert int(n) == dead.sum() > 0
  for i in range(k):
    if dead[i]:  # replaced by a vector of the batch, with a fresh usage of 1/k
      assert np.any(np.all(np.isclose(np.asarray(z), np.asarray(new_cb[i])), axis=1))
      np.testing.assert_allclose(new_stats["usage"][i], 1 / k)
      np.testing.assert_allclose(new_stats["embed_sum"][i], new_cb[i] / k, rtol=1e-6)
    else:
      np.testing.assert_array_equal(new_cb[i], codebook[i])
      np.testing.assert_array_equal(new_stats["usage"][i], usage[i])
  # Deterministic in the rng.
  again = vq.restart_dead_codes(stats, codebook, z, threshold, rng)[1]
  np.testing.assert_array_equal(again, new_cb)


def test_loss_weights_and_adaptive_weight():
  x, y = jnp.zeros((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 0.5)
  for l1w, l2w in [(1.0, 0.0), (0.0, 1.0), (2.0, 3.0)]:
    value, parts = vq.reconstruction_loss(x, y, l1w, l2w)
    np.testing.assert_allclose(value, l1w * 0.5 + l2w * 0.25)
  g_rec, g_gan = jnp.full((3,), 2.0), jnp.full((3,), 1.0)
  np.testing.assert_allclose(vq.adaptive_weight(g_rec, g_gan, 0.5), 0.5 * 2.0, rtol=1e-3)
  np.testing.assert_allclose(vq.adaptive_weight(g_rec, g_gan, 1.5), 1.5 * 2.0, rtol=1e-3)
  assert float(vq.adaptive_weight(g_rec, 0 * g_gan, 1.0)) == 1e4  # clipped
  # Hinge losses.
  np.testing.assert_allclose(vq.hinge_d_loss(jnp.asarray([2.0]), jnp.asarray([-2.0])), 0.0)
  np.testing.assert_allclose(vq.hinge_d_loss(jnp.asarray([0.0]), jnp.asarray([0.0])), 1.0)
  np.testing.assert_allclose(vq.hinge_g_loss(jnp.asarray([0.5, 1.5])), -1.0)


def test_learning_rates_act():
  def first_updates(c):
    g_tx, d_tx = T.make_optimizers(c)
    out = []
    for tx in (g_tx, d_tx):
      p = {"w": jnp.ones(3)}
      s = tx.init(p)
      for _ in range(2):  # after a one-step warm-up
        u, s = tx.update({"w": jnp.ones(3)}, s, p)
      out.append(float(jnp.abs(u["w"]).max()))
    return out
  g1, d1 = first_updates(tiny_config())
  c = tiny_config()
  c.vqgan.train.update(lr=2e-3, disc_lr=5e-4)
  g2, d2 = first_updates(c)
  np.testing.assert_allclose([g2 / g1, d2 / d1], [2.0, 0.5], rtol=1e-3)


# ---------------------------------------------------------------------------
# Training (one compiled step for all of these).

def fresh_state(config):
  """(trainer, initial state, step key). The key (and batches) are placed as
  the stage places them: otherwise the step compiles again for the stage."""
  mesh = parallel.make_mesh(config.mesh)
  trainer = T.build(config, mesh)
  ik, sk = T.keys(config.seed)
  return trainer, trainer.init_state(ik), parallel.put_replicated(sk, mesh)


def test_training_lowers_loss_and_disc_switches_on_at_disc_start(fake_data):
  config = tiny_config()
  trainer, state, sk = fresh_state(config)
  images = parallel.put_batch(TrainStream(fake_data["train"], 8, 0).batch(0)["image"],
                              trainer.mesh, config.mesh.logical_axis_rules)
  d0 = jax.tree.map(np.asarray, state["d_params"])
  history, d_params = [], []
  for _ in range(config.vqgan.train.steps):
    state, m = trainer.step(state, sk, images)
    history.append(jax.tree.map(float, m))
    d_params.append(jax.tree.map(np.asarray, state["d_params"]))
  start = config.vqgan.disc_start
  for i, m in enumerate(history):
    gan = i >= start
    assert (m["d_weight"] > 0) == gan and (m["d_loss"] > 0) == gan, (i, m)
    assert (m["gan_g_loss"] != 0) == gan
    np.testing.assert_allclose(m["loss"], m["rec_loss"] + m["commit_loss"]
                               + m["d_weight"] * m["gan_g_loss"], rtol=1e-5)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d0),
                                                     jax.tree.leaves(d_params[i])))
    assert same == (not gan), f"discriminator params at step {i}"
  assert history[0]["restarted"] > config.vqgan.codebook_size // 2  # data-driven init
  assert history[-1]["rec_loss"] < 0.85 * history[0]["rec_loss"], [h["rec_loss"] for h in history]


def test_stage_resume_exact_and_autoencoder_round_trip(fake_data, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="test.vqgan")
  config = tiny_config()
  steps = config.vqgan.train.steps
  # Uninterrupted, through the stage entry point.
  metrics = vqgan_stage.run(make_ctx(config, tmp_path / "a"))
  for k in ("psnr", "codebook_usage", "perplexity", "l1", "rec_loss"):
    assert np.isfinite(metrics[k]), k
  assert metrics["heldout_images"] == 20
  assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
  assert all(isinstance(v, (int, float)) for v in metrics.values())
  assert (tmp_path / "a" / "vqgan" / "reconstructions.png").exists()
  mngr = checkpoints.manager(tmp_path / "a" / "vqgan" / "checkpoints", 2, 2)
  assert list(mngr.all_steps()) == [4, 6]  # ckpt_every=2, keep_checkpoints=2
  trainer, like, sk = fresh_state(config)
  uninterrupted, _ = checkpoints.restore_latest(mngr, like)

  # Interrupted after 3 steps (checkpoint at 2), then resumed in a fresh state.
  root = tmp_path / "b"
  with pytest.raises(StopAfter):
    vqgan_stage.train(make_ctx(config, root, stop_after=3), trainer, *T.keys(config.seed))
  with pytest.raises(DataError, match=r"need step 6 .*found \[2\]"):
    T.load_autoencoder(config, root / "vqgan")
  resumed, last = vqgan_stage.train(make_ctx(config, root), trainer, *T.keys(config.seed))
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The downstream API.
  ae = T.load_autoencoder(config, tmp_path / "a" / "vqgan")
  ae2 = T.load_autoencoder(config, root / "vqgan")
  assert ae.fingerprint == ae2.fingerprint and len(ae.fingerprint) == 16
  assert ae.f == 4 and ae.latent_shape == (4, 4, 4)
  x = to_float(fake_data["heldout"].images[:5])
  z = ae.encode(x, batch_size=4)  # two batches, the last padded
  assert z.shape == (5, 4, 4, 4) and z.dtype == np.float32
  codebook = np.asarray(ae.params["quantizer"]["codebook"])
  d = ((z[..., None, :] - codebook) ** 2).sum(-1).min(-1)
  assert d.max() < 1e-8  # every latent vector is a code
  x_rec = ae.decode(z)
  assert x_rec.shape == x.shape and x_rec.min() >= -1 and x_rec.max() <= 1
  # Pure functions, usable inside another jit (the sampler decodes in its own).
  out = jax.eval_shape(lambda p, x: ae.decode_fn(p, ae.encode_fn(p, x)), ae.params, x)
  assert out.shape == x.shape
  # The fingerprint covers the params and the config.
  other = tiny_config(beta=0.5)
  assert T.params_fingerprint(ae.params, other.vqgan) != ae.fingerprint
  moved = jax.tree.map(lambda a: a, ae.params)
  moved["decoder"]["conv_out"]["bias"] = moved["decoder"]["conv_out"]["bias"] + 1e-3
  assert T.params_fingerprint(moved, config.vqgan) != ae.fingerprint
  # A log line every log_every steps, and TensorBoard events.
  logged = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("step ")]
  assert logged[:3] == ["step 2", "step 4", "step 6"]
  assert list((tmp_path / "a" / "vqgan" / "tensorboard").glob("events.out.tfevents.*"))


def test_load_autoencoder_without_checkpoint_says_what_to_do(tmp_path):
  with pytest.raises(DataError, match="run the vqgan stage"):
    T.load_autoencoder(tiny_config(), tmp_path / "nothing")


# ---------------------------------------------------------------------------
# Bad configs.

@pytest.mark.parametrize("change,message", [
    (dict(ch_mult=(1, 2, 2, 2, 2, 2)), r"f=32, but data.image_size=16 is not divisible"),
    (dict(ch_mult=()), r"non-empty tuple"),
    (dict(ema_decay=1.0), r"ema_decay=1.0 must be in \[0, 1\)"),
    (dict(disc_layers=5), r"disc_layers=5"),
    (dict(l1_weight=0.0, l2_weight=0.0), r"nothing trains the decoder"),
    (dict(codebook_size=1), r"codebook_size>=2"),
])
def test_bad_config_messages(change, message):
  with pytest.raises(ConfigError, match=message):
    vq.check_config(tiny_config(**change))


def test_image_size_not_divisible_by_f():
  c = tiny_config(ch_mult=(1, 2, 2, 2))   # f=8
  c.data.image_size = 20
  with pytest.raises(ConfigError, match=r"f=8.*Fix: use a ch_mult of length \[1, 2, 3\]"):
    vq.check_config(c)


def test_batch_must_split_over_the_devices():
  from types import SimpleNamespace
  mesh = SimpleNamespace(shape={"data": 3, "fsdp": 1}, axis_names=("data", "fsdp"))
  with pytest.raises(ConfigError, match=r"batch_size=8 must be divisible by the 3 devices"):
    T.check_batch(tiny_config(), mesh)
  T.check_batch(tiny_config(), SimpleNamespace(shape={"data": 2, "fsdp": 2},
                                               axis_names=("data", "fsdp")))
