"""Post-training int8 quantization of the denoiser and the VQ-GAN decoder.

Modes (config `sample.quantize`):
  none           float32, as trained
  int8_weights   every conv/dense kernel stored as int8 with one float32 scale
                 per output channel (Qwix QArray); the network dequantizes
                 them and computes in float. A quarter of the weight storage.
  int8           weights and activations int8 (Qwix PTQ): convolutions and
                 matmuls run in int8 with int32 accumulation; activation
                 scales are static, calibrated on training latents (noised
                 at timesteps spread over the schedule, with their neighbours)
                 for the denoiser and on training latents for the decoder.

Either way the result plugs into the sampler unchanged:
`model_q.apply({"params": params_q}, x, t, **cond)` and
`decode_fn_q(ae_params_q, z)`.

Kept in float, and why:
  * the timestep-embedding MLP (time1, time2): it runs once per step on a
    (B, 4*ch) vector (no measurable cost), and Qwix's QT calibration mistakes
    its input for a weight;
  * attention's score and value products (einsums of two activations): Qwix
    PTQ cannot give them static scales; at the lowest resolution they are a
    small part of the FLOPs;
  * norms, biases, the codebook: float32 and tiny;
  * any layer named in `sample.quantize_keep_float` (regexes over module
    paths), e.g. the layers `layer_sensitivity` ranks worst.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.errors import ConfigError, DataError, check_choice
from rissole_jax.models import layers

MODES = ("none", "int8_weights", "int8")
ALWAYS_FLOAT = (r"(.*/)?time[12]",)
QUANT_OPS = ("dot_general", "conv_general_dilated")
INSTALL_HINT = "pip install qwix>=0.1.8 (or pip install -e '.[dev]')"


def _qwix():
  try:
    import qwix
  except ImportError as e:
    raise ConfigError(f"sample.quantize needs Qwix, which is not installed. Fix: {INSTALL_HINT}, "
                      "or set --config.sample.quantize=none.") from e
  return qwix


def check_mode(mode: str) -> None:
  check_choice("sample.quantize", mode, MODES)


# ---------------------------------------------------------------------------
# Calibration data.

def calibration_inputs(model, schedule, latents, neighbours, num: int = 64, batch: int = 32,
                       seed: int = 0) -> list[tuple]:
  """Denoiser inputs (x_t, t, cond) as the sampler sees them: `num` training
  latents (normalised, (N, h, w, c)) with their neighbours' latents
  (neighbours: (N, k) ids), noised at timesteps evenly covering [0, T), in
  batches of `batch` images. Deterministic in `seed`."""
  from rissole_jax.diffusion import solvers
  from rissole_jax.models import unet
  latents = np.asarray(latents, np.float32)
  if len(latents) == 0:
    raise DataError("quantization needs calibration data: the database has no latents. "
                    "Fix: quantize a model whose workdir has its encode and index stages "
                    "(or pass calibration latents).")
  rng = np.random.default_rng([seed, 0xCA1])
  ids = rng.choice(len(latents), size=num, replace=num > len(latents))
  ts = np.linspace(0, schedule.T - 1, num).round().astype(np.int32)[rng.permutation(num)]
  out = []
  for b, s in enumerate(range(0, num, batch)):
    sl = ids[s:s + batch]
    z0 = jnp.asarray(latents[sl])
    nb = jnp.asarray(latents[np.asarray(neighbours)[sl]]) if neighbours is not None else None
    x0, cond = unet.model_inputs(model, z0, nb)
    reps = x0.shape[0] // len(sl)                 # blocks per image
    t = jnp.asarray(np.repeat(ts[s:s + batch], reps))
    noise = solvers.normal(jax.random.PRNGKey(seed * 1000 + b), x0.shape)
    out.append((schedule.q_sample(x0, t, noise), t, cond))
  return out


# ---------------------------------------------------------------------------
# Rules.

def _rules(qwix, rule_cls, mode: str, keep_float=(), only=None):
  """Qwix rules: kept-float layers first (a rule without a qtype leaves its
  match alone), then the int8 rule for convs and dense layers."""
  keep = [rule_cls(module_path=p) for p in (*ALWAYS_FLOAT, *keep_float)]
  act = dict(act_qtype=jnp.int8, act_static_scale=True) if mode == "int8" else {}
  return keep + [rule_cls(module_path=only or ".*", op_names=QUANT_OPS, weight_qtype=jnp.int8,
                          **act)]


def _kept(path: str, keep_float) -> bool:
  return any(re.fullmatch(p, path) for p in (*ALWAYS_FLOAT, *keep_float))


# ---------------------------------------------------------------------------
# int8 weights, float compute.

def quantize_kernels(params, keep_float=()):
  """params with every conv/dense `kernel` (not kept float) replaced by a
  Qwix QArray: int8 values, a float32 scale per output channel."""
  qwix = _qwix()

  def one(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    module = "/".join(names[:-1])
    if names[-1] != "kernel" or leaf.ndim < 2 or _kept(module, keep_float):
      return leaf
    return qwix.quantize(jnp.asarray(leaf), jnp.int8, channelwise_axes=(leaf.ndim - 1,))
  return jax.tree_util.tree_map_with_path(one, _unbox(params))


def dequantize_kernels(params):
  qwix = _qwix()
  return jax.tree.map(lambda a: qwix.dequantize(a) if isinstance(a, qwix.QArray) else a, params,
                      is_leaf=lambda a: isinstance(a, qwix.QArray))


class WeightOnly:
  """A Flax module whose kernels arrive as int8 QArrays: `apply` dequantizes
  them and runs the float module. Other attributes are the module's."""

  def __init__(self, module):
    self.module = module

  def __getattr__(self, name):
    return getattr(self.module, name)

  def apply(self, variables, *args, **kwargs):
    return self.module.apply({**variables, "params": dequantize_kernels(variables["params"])},
                             *args, **kwargs)


# ---------------------------------------------------------------------------
# int8 weights and activations (Qwix PTQ with static scales).

def calibrate(module, params, inputs: list[tuple], rules, method: str | None = None) -> dict:
  """Qwix quant_stats: activation ranges averaged over the calibration batches."""
  qwix = _qwix()
  qt = qwix.quantize_model(module, qwix.QtProvider(rules), **({"methods": (method,)} if method else {}))
  kw = {"method": method} if method else {}
  args0, cond0 = _split(inputs[0])
  with layers.plain_convs():
    init = jax.eval_shape(lambda: qt.init(jax.random.PRNGKey(0), *args0, **cond0, **kw))
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init.get("quant_stats", {}))

  # Eager, not jitted: Qwix's QT convolution updates its statistics inside a
  # custom_vjp, which leaks tracers under jit. A few batches of one forward
  # pass each, so seconds.
  def step(stats, args, cond):
    with layers.plain_convs():
      _, upd = qt.apply({"params": params, "quant_stats": stats}, *args, **cond,
                        mutable=["quant_stats"], **kw)
    return upd["quant_stats"]
  for inp in inputs:
    args, cond = _split(inp)
    stats = step(stats, args, cond)
  return jax.device_get(stats)


def _split(inp) -> tuple[tuple, dict]:
  """(args, kwargs) of a calibration input: (x, t, cond) or (z,)."""
  if len(inp) == 3:
    return (inp[0], inp[1]), dict(inp[2])
  return tuple(inp), {}


def ptq(module, params, inputs, keep_float=(), method: str | None = None, only=None):
  """(quantized module, int8 params) with static activation scales."""
  qwix = _qwix()
  stats = calibrate(module, params, inputs, _rules(qwix, qwix.QtRule, "int8", keep_float, only),
                    method)
  qm = qwix.quantize_model(module, qwix.PtqProvider(
      _rules(qwix, qwix.QuantizationRule, "int8", keep_float, only)),
      **({"methods": (method,)} if method else {}))
  args0, cond0 = _split(inputs[0])
  kw = {"method": method} if method else {}
  with layers.plain_convs():
    abstract = jax.eval_shape(lambda: qm.init(jax.random.PRNGKey(0), *args0, **cond0, **kw))
  abstract = abstract["params"]
  qp = qwix.quantize_params(_unbox(params), abstract, stats, allow_extra_params=True)
  return qm, qp


def _unbox(params):
  import flax.linen as nn
  return nn.unbox(params)


# ---------------------------------------------------------------------------
# The two networks.

def quantize_denoiser(model, params, mode: str, calib_inputs=None, keep_float=()):
  """(model_q, params_q) for `model_q.apply({"params": params_q}, x, t, **cond)`.
  calib_inputs: `calibration_inputs(...)`; required for mode 'int8'."""
  check_mode(mode)
  if mode == "none":
    return model, params
  from rissole_jax.models import mapped
  # Qwix rewrites the float32, folded network (same parameters); it refuses
  # per-position weights.
  model = mapped.plain(model, f"sample.quantize={mode!r}")
  params = _unbox(params)   # Qwix and the kernel paths want plain arrays, not partitioned boxes
  if mode == "int8_weights":
    return WeightOnly(model), quantize_kernels(params, keep_float)
  if not calib_inputs:
    raise ConfigError("sample.quantize='int8' needs calibration data (training latents and "
                      "their neighbours) for its static activation scales. Fix: pass "
                      "calibration_inputs(...), or use sample.quantize='int8_weights'.")
  qmodule, qparams = ptq(model, params, calib_inputs, keep_float)
  return _Module(qmodule, model), qparams


class _Module:
  """The Qwix-quantized module, with the float module's attributes (the
  sampler reads e.g. .blocks, .grid, .learn_null)."""

  def __init__(self, qmodule, base):
    self.qmodule, self.base = qmodule, base

  def __getattr__(self, name):
    return getattr(self.base, name)

  def apply(self, variables, *args, **kwargs):
    kwargs.pop("train", None)
    with layers.plain_convs():
      return self.qmodule.apply(variables, *args, **kwargs)


def decoder_keys(ae_params) -> list[str]:
  """Top-level VQ-GAN parameter groups the decode path reads."""
  return [k for k in ae_params if not k.startswith(("encoder", "quant_conv", "codebook",
                                                     "quantize"))]


def decoder_params(ae_params) -> dict:
  return {k: ae_params[k] for k in decoder_keys(ae_params)}


def decoder_calibration(latents, num: int = 64, batch: int = 32, seed: int = 0) -> list[tuple]:
  """Decoder inputs: `num` training latents (not normalised), in batches."""
  latents = np.asarray(latents, np.float32)
  if len(latents) == 0:
    raise DataError("quantizing the decoder needs calibration latents; the database is empty. "
                    "Fix: quantize a model whose workdir has its encode stage.")
  rng = np.random.default_rng([seed, 0xDEC])
  ids = rng.choice(len(latents), size=num, replace=num > len(latents))
  return [(jnp.asarray(latents[ids[s:s + batch]]),) for s in range(0, num, batch)]


def quantize_decoder(ae, mode: str, calib_latents=None, keep_float=()):
  """(decode_fn_q, ae_params_q): decode_fn_q(ae_params_q, z) -> images in [-1, 1].
  Only the decoder's layers are quantized (the encoder is not in the sampler)."""
  from rissole_jax.models import vqgan as vq
  check_mode(mode)
  if mode == "none":
    return ae.decode_fn, ae.params
  module = ae.model
  # jax Arrays, not numpy: Qwix finds a layer's weight by identity.
  params = jax.tree.map(jnp.asarray, ae.params)
  dec_keys = decoder_keys(params)
  if mode == "int8_weights":
    qp = quantize_kernels({k: params[k] for k in dec_keys}, keep_float)

    def decode_w(p, z):
      return jnp.clip(module.apply({"params": dequantize_kernels(p)}, z, method=vq.VQModel.decode),
                      -1, 1)
    return decode_w, qp
  if not calib_latents:
    raise ConfigError("sample.quantize='int8' needs calibration latents for the decoder's "
                      "static activation scales. Fix: pass decoder_calibration(db.latents).")
  qm, qp = ptq(module, params, calib_latents, keep_float, method="decode")

  def decode_q(p, z):
    with layers.plain_convs():
      return jnp.clip(qm.apply({"params": p}, z, method="decode"), -1, 1)
  return decode_q, qp


# ---------------------------------------------------------------------------
# Both, for a sampler's parts.

@dataclasses.dataclass
class Quantized:
  mode: str
  model: Any
  params: Any
  decode_fn: Callable
  ae_params: Any
  keep_float: tuple = ()
  students: dict = dataclasses.field(default_factory=dict)   # steps -> distilled params, as `params`

  def sizes(self) -> dict:
    return {"denoiser_bytes": param_bytes(self.params), "decoder_bytes": param_bytes(self.ae_params)}


def quantize_parts(parts, mode: str, keep_float=None, num_calib: int = 64, seed: int = 0) -> Quantized:
  """The denoiser (and its distilled students, if `parts` has any) and the
  decoder of `parts` (config, model, params, ae, stats, db, schedule: a
  rissole_jax.Sampler or the like) in `mode`, calibrated on the database's
  latents and neighbours."""
  from rissole_jax.diffusion.latents import normalise
  check_mode(mode)
  if keep_float is None:
    keep_float = tuple(parts.config.sample.get("quantize_keep_float", ()) or ())
  students = getattr(parts, "students", None) or {}
  if mode == "none":
    return Quantized(mode, parts.model, parts.params, parts.ae.decode_fn, parts.ae.params,
                     students=dict(students))
  calib = dec_calib = None
  if mode == "int8":
    lat = normalise(np.asarray(parts.db.latents, np.float32), parts.stats).astype(np.float32)
    calib = calibration_inputs(parts.model, parts.schedule, lat, parts.db.neighbours,
                               num_calib, seed=seed)
    dec_calib = decoder_calibration(parts.db.latents, num_calib, seed=seed)
  model_q, params_q = quantize_denoiser(parts.model, parts.params, mode, calib, keep_float)
  decode_q, ae_q = quantize_decoder(parts.ae, mode, dec_calib, keep_float)
  # Distilled students: the same network, the same calibration inputs.
  students_q = {n: quantize_denoiser(parts.model, p, mode, calib, keep_float)[1]
                for n, p in students.items()}
  return Quantized(mode, model_q, params_q, decode_q, ae_q, tuple(keep_float), students_q)


# ---------------------------------------------------------------------------
# Storage.

def param_bytes(tree) -> int:
  """Bytes of every array in a (possibly quantized) parameter tree."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def dtype_bytes(tree) -> dict:
  """Bytes by dtype name, e.g. {'int8': ..., 'float32': ...}."""
  out: dict = {}
  for a in jax.tree.leaves(tree):
    a = np.asarray(a)
    out[str(a.dtype)] = out.get(str(a.dtype), 0) + int(a.nbytes)
  return out


# int8 storage for the model file: a kernel becomes {INT8_VALUES: int8,
# INT8_SCALE: float32 per output channel} (Qwix's symmetric channelwise
# rounding); reading it back needs only numpy.
INT8_VALUES, INT8_SCALE = "int8_values", "int8_scale"


def kernels_to_int8(params):
  """params (nested dicts of arrays) with every conv/dense kernel stored as
  int8 values and a float32 scale per output channel; everything else
  (biases, norms, the codebook) as it was."""
  qwix = _qwix()

  def one(path, leaf):
    leaf = np.asarray(leaf)
    if getattr(path[-1], "key", None) != "kernel" or leaf.ndim < 2:
      return leaf
    q = qwix.quantize(jnp.asarray(leaf, jnp.float32), jnp.int8, channelwise_axes=(leaf.ndim - 1,))
    return {INT8_VALUES: np.asarray(q.qvalue, np.int8),
            INT8_SCALE: np.asarray(q.scale, np.float32)}
  return jax.tree_util.tree_map_with_path(one, _unbox(params))


def kernels_from_int8(tree):
  """The float32 params of a kernels_to_int8 tree (values times scale)."""
  if isinstance(tree, dict):
    if set(tree) == {INT8_VALUES, INT8_SCALE}:
      return (np.asarray(tree[INT8_VALUES], np.float32) *
              np.asarray(tree[INT8_SCALE], np.float32))
    return {k: kernels_from_int8(v) for k, v in tree.items()}
  return tree


def save_params(path, tree) -> None:
  """Leaves of a (quantized) tree, in order, to an .npz (written atomically);
  load_params needs a tree of the same structure (e.g. the abstract one the
  quantizer makes) to put them back."""
  from rissole_jax.files import atomic_save_npz
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  atomic_save_npz(Path(path), **{f"{i:05d}": np.asarray(a) for i, (_, a) in enumerate(leaves)},
                  __paths__=np.array([jax.tree_util.keystr(p) for p, _ in leaves]))


def load_params(path, like):
  """The tree saved by save_params, in the structure of `like`, refusing any
  mismatch of paths, shapes or dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  with np.load(path) as f:
    paths = [str(p) for p in f["__paths__"]]
    arrays = [f[f"{i:05d}"] for i in range(len(paths))]
  want = [jax.tree_util.keystr(p) for p, _ in leaves]
  if paths != want:
    raise DataError(f"{path} holds parameters of another structure ({len(paths)} arrays, "
                    f"expected {len(want)}). Fix: re-export with the same model and "
                    "sample.quantize mode.")
  for p, a, (_, l) in zip(paths, arrays, leaves):
    if tuple(a.shape) != tuple(np.shape(l)) or a.dtype != np.dtype(l.dtype):
      raise DataError(f"{path}: {p} is {a.dtype}{a.shape}, expected {l.dtype}{np.shape(l)}.")
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])


# ---------------------------------------------------------------------------
# Sensitivity: the denoiser's error when only one layer is quantized.

def quantizable_layers(params) -> list[str]:
  """Module paths ('a/b') holding a conv/dense kernel, outside ALWAYS_FLOAT."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] == "kernel" and np.ndim(leaf) >= 2 and not _kept("/".join(names[:-1]), ()):
      out.append("/".join(names[:-1]))
  return out


def layer_sensitivity(model, params, calib_inputs, mode: str = "int8_weights",
                      layers=None) -> dict[str, float]:
  """{layer: relative squared error of the denoiser's output (against the
  float model's, on the calibration inputs) when only that layer is int8}.
  int8_weights: one compile, kernels fake-quantized per layer; int8: one
  Qwix PTQ model per layer (seconds each)."""
  check_mode(mode)
  from rissole_jax.models import mapped
  model = mapped.plain(model, "layer_sensitivity")
  layers = layers or quantizable_layers(params)
  apply = jax.jit(lambda p, x, t, cond: model.apply({"params": p}, x, t, **cond))
  refs = [apply(params, x, t, c) for x, t, c in calib_inputs]
  denom = sum(float(jnp.sum(r ** 2)) for r in refs)
  out = {}
  for layer in layers:
    if mode == "int8_weights":
      qp = dequantize_kernels(quantize_kernels(params, keep_float=(_not(layer),)))
      outs = [apply(qp, x, t, c) for x, t, c in calib_inputs]
    else:
      qm, qp = ptq(model, params, calib_inputs, only=re.escape(layer))
      outs = [qm.apply({"params": qp}, x, t, **c) for x, t, c in calib_inputs]
    out[layer] = sum(float(jnp.sum((o - r) ** 2)) for o, r in zip(outs, refs)) / denom
  return out


def _not(layer: str) -> str:
  """A regex matching every module path except `layer`."""
  return rf"(?!{re.escape(layer)}$).*"


def get_path(tree, path: str):
  """The subtree at a '/'-joined module path."""
  for k in path.split("/"):
    tree = tree[k]
  return tree
