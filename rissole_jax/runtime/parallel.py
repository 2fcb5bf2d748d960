"""Processes, devices and the mesh: the one place that knows how work is spread.

Multi-host: `initialize_distributed` reads flags or the usual environment
variables; every process runs the same program on its own part of the data.
"""
from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts jax.distributed when several processes are asked for.

  Arguments win over the environment (RISSOLE_COORDINATOR, RISSOLE_NUM_PROCESSES,
  RISSOLE_PROCESS_ID); on TPU pods and SLURM, jax finds them by itself when
  RISSOLE_DISTRIBUTED=auto.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("RISSOLE_COORDINATOR")
  if num_processes is None and env.get("RISSOLE_NUM_PROCESSES"):
    num_processes = int(env["RISSOLE_NUM_PROCESSES"])
  if process_id is None and env.get("RISSOLE_PROCESS_ID"):
    process_id = int(env["RISSOLE_PROCESS_ID"])
  if coordinator_address and (num_processes or 1) > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif env.get("RISSOLE_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def process_info() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def sync(name: str) -> None:
  """A barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# The mesh and shardings.

import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from rissole_jax.errors import ConfigError  # noqa: E402


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with `mesh_cfg.axes` and `mesh_cfg.shape` (one entry may be -1)."""
  devices = list(jax.devices() if devices is None else devices)
  axes, shape = tuple(mesh_cfg.axes), list(mesh_cfg.shape)
  if len(axes) != len(shape):
    raise ConfigError(f"mesh.axes {axes} and mesh.shape {tuple(shape)} differ in length.")
  n = len(devices)
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape {tuple(shape)}: at most one size may be -1 (inferred).")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ConfigError(f"mesh.shape {tuple(shape)} does not fit {n} devices: {n} is not "
                        f"divisible by {known}. Fix: choose sizes whose product divides {n}.")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but "
                      f"{n} are available. Fix: set --config.mesh.shape so that the sizes "
                      f"multiply to {n} (use -1 for one size to infer it).")
  dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, axes)


def local_mesh(mesh_cfg) -> Mesh:
  """A mesh of this process's own devices (all on the first axis, the others
  of size 1): for work that differs between processes, like encoding shards."""
  axes = tuple(mesh_cfg.axes)
  devices = np.asarray(jax.local_devices()).reshape((-1,) + (1,) * (len(axes) - 1))
  return Mesh(devices, axes)


def _rules(rules) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over (the rule for 'batch')."""
  for name, ax in _rules(rules):
    if name == "batch":
      ax = ax if isinstance(ax, tuple) else (ax,)
      return tuple(a for a in ax if a in mesh.axis_names)
  return ()


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Leading dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(ax if names and dim % size == 0 else None)
  return P(*out)


def shardings_for(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings for a pytree that may hold flax LogicallyPartitioned boxes."""
  logical = nn.get_partition_spec(abstract_boxed)
  unboxed = nn.meta.unbox(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical, _rules(rules))
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                      mesh_specs, unboxed, is_leaf=lambda s: isinstance(s, P))


def sharded_init(init_fn, mesh: Mesh, rules, *args):
  """Creates a state already sharded: shape evaluation, shardings, jitted init.

  `init_fn(*args)` may return flax LogicallyPartitioned boxes (from
  models/layers.py); the result is unboxed. Returns (state, shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_for(abstract, mesh, rules)
  # Non-partitionable threefry: XLA:CPU compiles each 4-d random draw (every
  # conv kernel init) several times faster; values do not depend on the mesh.
  with jax.threefry_partitionable(False):
    state = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings


def put_batch(batch, mesh: Mesh, rules):
  """This process's part of a global batch -> global jax.Arrays on the mesh.

  Every leaf's leading dimension is this process's rows; together the
  processes form the global batch (see data/pipeline.py)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)
  return jax.tree.map(put, batch)


def to_host(x) -> np.ndarray:
  """A global array gathered onto every host as NumPy."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def bytes_per_device(tree) -> dict:
  """Bytes of `tree` held by each local device (for the fsdp benchmark/tests)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def put_replicated(tree, mesh: Mesh):
  """Host values (the same on every process) -> arrays replicated on the mesh.

  Unlike jax.device_put, this works when the mesh spans several processes."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)  # typed keys travel as their raw data
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)


# ---------------------------------------------------------------------------
# Row tables (the database's codes, the neighbour table) split over the mesh.

def put_rows_sharded(x, mesh: Mesh):
  """Host rows (the same on every process) -> an array whose leading dimension
  is split over every device of the mesh (padded with zero rows to a multiple
  of the device count; `take_sharded` never reads the padding). Each process
  reads only the rows of its own devices from x (which may be a memmap)."""
  x = x if hasattr(x, "shape") else np.asarray(x)
  n, d = x.shape[0], mesh.devices.size
  rows = -(-max(n, 1) // d) * d
  sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  def piece(idx):
    sl = idx[0]
    start, stop = sl.start or 0, min(sl.stop if sl.stop is not None else rows, n)
    part = np.asarray(x[start:stop]) if start < n else np.zeros((0, *x.shape[1:]), x.dtype)
    pad = (sl.stop if sl.stop is not None else rows) - (sl.start or 0) - len(part)
    return np.concatenate([part, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else part
  return jax.make_array_from_callback((rows, *x.shape[1:]), sharding, piece)


def take_sharded(mesh: Mesh):
  """take(rows, ids) -> rows[ids], for rows placed by `put_rows_sharded`:
  each device looks up the ids that fall in its block, the others add zeros,
  and a psum over the mesh gives every device the batch's rows. Traffic per
  step is the batch's rows, not the table (which a plain gather from a
  sharded operand may all-gather)."""
  import jax.numpy as jnp
  axes = tuple(mesh.axis_names)

  def local(block, ids):
    n = block.shape[0]
    j = ids - jax.lax.axis_index(axes) * n
    inside = (j >= 0) & (j < n)
    got = jnp.take(block, jnp.clip(j, 0, n - 1), axis=0)
    inside = inside.reshape(inside.shape + (1,) * (got.ndim - inside.ndim))
    wide = jnp.int32 if jnp.issubdtype(got.dtype, jnp.integer) else got.dtype
    return jax.lax.psum(jnp.where(inside, got, 0).astype(wide), axes)

  def take(rows, ids):
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P()), out_specs=P(),
                        check_vma=False)(rows, ids)
    return out.astype(rows.dtype)
  return take
