"""A small CNN trained once on a dataset's training images, for quick metrics.

Its 128-d penultimate features give a Fréchet distance ("classifier FD"),
KID and precision/recall in seconds on a CPU. The numbers are comparable
between runs on the same dataset and classifier settings, and NOT with
Inception FID or with other papers. With labels the network learns them (and
its confidence on samples says how often they look like a clear class);
without labels it learns to predict which of four rotations was applied
(Gidaris et al. 2018), which needs no labels and still learns shape features.

The trained parameters are cached under a key made of the training images'
content hash, the classifier settings and the numerics that train it (jax
and jaxlib versions, backend, XLA_FLAGS), so every run on the same data and
software shares one classifier. The numerics belong in the key: training
amplifies kernel-level rounding, and the classifier trained with the default
XLA:CPU flags scores the same 256 samples FD 19.68 where one trained without
them scores 20.42 (docs/performance.md, "The main job"). Compare FDs made
with one classifier.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import serialization

from rissole_jax.metrics.frechet import content_hash
from rissole_jax.metrics.inception import batched
from rissole_jax.train.optim import adam
from rissole_jax.files import atomic_write_bytes

VERSION = 1  # bump when the network or training changes: it keys the cache
FEATURES = 128


class SmallCNN(nn.Module):
  """Three stride-2 3x3 convolutions, a 128-d feature layer and the logits.
  The features see the flattened map, not a global average: where strokes
  are matters (MNIST: 96% held-out accuracy with it, 90% with a mean)."""
  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for mult in (1, 2, 4):
      x = nn.relu(nn.Conv(self.width * mult, (3, 3), strides=2)(x))
    feats = nn.relu(nn.Dense(FEATURES)(x.reshape(x.shape[0], -1)))
    return feats, nn.Dense(self.num_classes)(feats)


def _to_float(images) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Classifier:
  params: dict
  num_classes: int
  task: str                # "labels" | "rotation"
  heldout_accuracy: float  # on the held-out split, -1 if not measured
  batch_size: int = 256
  tag: str = ""            # the cache key's hash: identifies the trained network

  @functools.cached_property
  def _apply(self):
    model = SmallCNN(self.num_classes)
    params = jax.tree.map(jnp.asarray, self.params)  # on the device once
    return jax.jit(lambda x: model.apply({"params": params}, _to_float(x)))

  def _run(self, images, which: int) -> np.ndarray:
    return batched(lambda b: self._apply(b)[which], images, self.batch_size)

  def features(self, images: np.ndarray) -> np.ndarray:
    """(N, 128) penultimate features of uint8 images (N, H, W, C)."""
    return self._run(images, 0)

  def probs(self, images: np.ndarray) -> np.ndarray:
    logits = self._run(images, 1).astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _batch(images, labels, task, rng, batch_size):
  """A random batch with small random shifts; the rotation task rotates it."""
  idx = rng.integers(0, len(images), batch_size)
  x = images[idx]
  # Shifts of up to 2 pixels: robustness to the small misalignments of samples.
  pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  dy, dx = rng.integers(0, 5, 2)
  x = pad[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
  if task == "rotation":
    y = rng.integers(0, 4, batch_size)
    x = np.stack([np.rot90(im, k, axes=(0, 1)) for im, k in zip(x, y)])
  else:
    y = labels[idx]
  return np.ascontiguousarray(x), y.astype(np.int32)


def train(images: np.ndarray, labels: np.ndarray | None, steps: int, batch_size: int,
          seed: int = 0, log=None) -> tuple[dict, int, str, np.ndarray]:
  """(params, num_classes, task, class values) of a classifier trained on uint8 images."""
  has_labels = labels is not None and len(labels) and (np.asarray(labels) >= 0).all()
  if has_labels:
    classes, y_all = np.unique(labels, return_inverse=True)
    task = "labels"
  else:
    if images.shape[1] != images.shape[2]:
      raise ValueError("the rotation task needs square images")
    classes, y_all, task = np.arange(4), None, "rotation"
  model = SmallCNN(len(classes))
  params = model.init(jax.random.key(seed), _to_float(images[:1]))["params"]
  cfg = mlc.ConfigDict(dict(lr=2e-3, warmup_steps=max(1, min(50, steps // 10)),
                            steps=max(steps, 2), schedule="cosine", grad_clip=1.0))
  opt = adam(cfg)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, _to_float(x))[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    x, y = _batch(images, y_all, task, rng, batch_size)
    params, state, loss = step(params, state, x, y)
    if log is not None and (i + 1) % max(steps // 4, 1) == 0:
      log("classifier step %d/%d: loss %.4f", i + 1, steps, float(loss))
  return jax.device_get(params), len(classes), task, classes


def _accuracy(clf: Classifier, images, labels, classes) -> float:
  if clf.task == "labels":
    known = np.isin(labels, classes)
    if not known.any():
      return -1.0
    pred = classes[clf.probs(images[known]).argmax(-1)]
    return float((pred == labels[known]).mean())
  y = np.arange(len(images)) % 4
  rotated = np.stack([np.rot90(im, k, axes=(0, 1)) for im, k in zip(images, y)])
  return float((clf.probs(rotated).argmax(-1) == y).mean())


def numerics() -> dict:
  """What decides the trained classifier's floats besides its settings and data."""
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def load_or_train(train_images: np.ndarray, train_labels: np.ndarray | None,
                  cache: Path, steps: int, batch_size: int, seed: int = 0,
                  heldout: tuple[np.ndarray, np.ndarray] | None = None, log=None) -> Classifier:
  """The classifier for these training images, from `cache` or trained now."""
  labels = None if train_labels is None else np.asarray(train_labels)
  key = {"version": VERSION, "images": content_hash(train_images),
         "labels": None if labels is None else content_hash(labels),
         "steps": steps, "batch": batch_size, "seed": seed, **numerics()}
  tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = Path(cache) / f"classifier_{tag}.msgpack"
  if path.exists():
    try:
      d = serialization.msgpack_restore(path.read_bytes())
      if log:
        log("classifier: cached %s (held-out accuracy %.4f)", path, float(d["accuracy"]))
      return Classifier(d["params"], int(d["num_classes"]), str(d["task"]), float(d["accuracy"]),
                        tag=tag)
    except Exception:  # damaged or from another version: train again
      pass
  params, num_classes, task, classes = train(train_images, labels, steps, batch_size, seed, log)
  clf = Classifier(params, num_classes, task, -1.0, tag=tag)
  if heldout is not None:
    clf.heldout_accuracy = _accuracy(clf, heldout[0], np.asarray(heldout[1]), classes)
  atomic_write_bytes(path, serialization.msgpack_serialize(
      {"params": params, "num_classes": num_classes, "task": task,
       "accuracy": clf.heldout_accuracy, "key": json.dumps(key)}))
  if log:
    log("classifier: trained (%s, %d steps), held-out accuracy %.4f, saved to %s",
        task, steps, clf.heldout_accuracy, path)
  return clf
