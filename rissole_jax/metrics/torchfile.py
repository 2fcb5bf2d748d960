"""Reads the tensors of a PyTorch file as numpy arrays, without torch.

Handles the zip format (`torch.save` since 1.6 and TorchScript archives: a
data.pkl whose tensors point at raw storage files under data/) and the legacy
format (consecutive pickles followed by the raw storages). Only tensors are
rebuilt; other objects (TorchScript modules, OrderedDicts) become plain dicts
of their state, so `read_tensors` can flatten everything to {dotted.name: array}.
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Opaque:
  """Stands in for any class the file names (modules, containers): keeps its state."""

  def __init__(self, *args, **kwargs):
    self.args = args

  def __setstate__(self, state):
    self.state = state


class _Tensor:
  """A tensor not yet materialised: storage key, offset, shape, strides."""

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name.startswith("_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return name
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    return type(name, (_Opaque,), {})

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel[, view metadata])
    kind, storage_type, key = pid[0], pid[1], pid[2]
    if kind != "storage":
      raise ValueError(f"unsupported persistent id {pid!r}")
    name = storage_type if isinstance(storage_type, str) else getattr(storage_type, "__name__", "")
    return (name, str(key))


def _materialise(t: _Tensor, data: bytes) -> np.ndarray:
  dtype = _DTYPES.get(t.storage[0])
  if dtype is None:
    raise ValueError(f"unsupported tensor storage {t.storage[0]}")
  flat = np.frombuffer(data, dtype=dtype)
  itemsize = flat.itemsize
  if not t.shape:
    return flat[t.offset].copy()
  view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.shape,
                                         strides=[s * itemsize for s in t.stride])
  return np.array(view)  # copy: contiguous and independent of the file buffer


def _flatten(obj, prefix, out, storages):
  if isinstance(obj, _Tensor):
    out[prefix] = _materialise(obj, storages(obj.storage[1]))
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, storages)
  elif isinstance(obj, _Opaque) and isinstance(getattr(obj, "state", None), dict):
    _flatten(obj.state, prefix, out, storages)
  elif isinstance(obj, (list, tuple)) and any(isinstance(v, (_Tensor, _Opaque, dict)) for v in obj):
    for i, v in enumerate(obj):
      _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, storages)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise ValueError(f"{path}: a zip file without data.pkl is not a PyTorch file")
    root = pkl[0][: -len("data.pkl")]
    obj = _Unpickler(z.open(pkl[0])).load()
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out, lambda key: z.read(f"{root}data/{key}"))
  return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a PyTorch file (neither zip nor legacy format)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info (endianness, type sizes)
    obj = _Unpickler(f).load()
    keys = pickle.load(f)
    # Each storage: an int64 element count, then its raw bytes.
    tensors = []
    _collect(obj, tensors)
    dtype_of = {t.storage[1]: np.dtype(_DTYPES[t.storage[0]]) for t in tensors}
    raw = {}
    for key in keys:
      (count,) = struct.unpack("<q", f.read(8))
      raw[key] = f.read(count * dtype_of[key].itemsize) if key in dtype_of else None
  out: dict[str, np.ndarray] = {}
  _flatten(obj, "", out, lambda key: raw[key])
  return out


def _collect(obj, acc):
  if isinstance(obj, _Tensor):
    acc.append(obj)
  elif isinstance(obj, dict):
    for v in obj.values():
      _collect(v, acc)
  elif isinstance(obj, _Opaque) and isinstance(getattr(obj, "state", None), dict):
    _collect(obj.state, acc)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _collect(v, acc)


def read_tensors(path) -> dict[str, np.ndarray]:
  """{dotted.name: array} for every tensor in a PyTorch file (state dict,
  checkpoint or TorchScript archive). Raises ValueError for other files."""
  path = Path(path)
  return _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
