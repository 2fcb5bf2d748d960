"""Runs stages of the smoke config on given meshes (in a subprocess, so the
device count can be forced before jax is imported), then dumps the final
parameters of the trained stages to WORKDIR/params.npz for comparison.

  python tests/mesh_worker.py DEVICES DATA_DIR JOB [JOB ...]
      JOB = MESH_SHAPE:WORKDIR:STAGES[:LINK_FROM]
      e.g. 8x1:/tmp/a:vqgan 2x4:/tmp/b:vqgan 8x1:/tmp/a:diffusion:/tmp/ref
  python tests/mesh_worker.py DEVICES fsdp-bytes MESH_SHAPE OUT.json
  python tests/mesh_worker.py DEVICES gather-bytes MESH_SHAPE OUT.json

The device count is fixed per process, but one 8-device process can run
several meshes one after another (each into its own workdir), and the jobs run
in the order given. Upstream stages (vqgan, encode, index) that a job neither
runs nor already has in its workdir are linked from LINK_FROM, waiting (up to
15 minutes) until that run has finished them: so a run started alongside the
reference trains from the reference's latents and index.

params.npz maps "STAGE/path" to the final checkpoint's arrays (the whole
train state of each stage the workdir's jobs trained).

The `gather-bytes` form places a random database of codes for each
diffusion.train.gather and writes the bytes per device as JSON.

The `fsdp-bytes` form builds the diffusion train state of the smoke config
sharded on the mesh (no training) and writes its per-device bytes as JSON.

Several processes: the usual environment variables (RISSOLE_COORDINATOR,
RISSOLE_NUM_PROCESSES, RISSOLE_PROCESS_ID) name the coordinator; every process
runs the same jobs; only process 0 writes params.npz.
"""
import os
import sys

devices = sys.argv[1]
# The parent's flags (the suite's -O0) plus the device count.
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from configs import mnist  # noqa: E402
from rissole_jax import main  # noqa: E402
from rissole_jax.runtime import parallel  # noqa: E402
from rissole_jax.train import checkpoints  # noqa: E402

UPSTREAM = ("vqgan", "encode", "index")
WAIT_S = 900


def config(shape: str, data_dir: str | None = None):
  c = mnist.get_config("smoke")
  if data_dir:
    c.data.data_dir = data_dir
  c.mesh.shape = tuple(int(s) for s in shape.split("x"))
  # GAN off: with the hinge loss and the adaptive weight on, a few near-zero
  # discriminator moments differ by ~5% between meshes (reduction-order noise
  # that Adam amplifies), which would hide real layout bugs behind a loose tolerance.
  c.vqgan.disc_start = 10**6
  # A smaller VQ-GAN (its step's compile is most of each run): no residual
  # blocks between resolutions and one discriminator layer. Every layer type
  # stays (the middle block keeps its residual blocks and attention).
  c.vqgan.num_res_blocks = 0
  c.vqgan.disc_layers = 1
  # Only the final checkpoint: each orbax save costs a second or two here.
  c.vqgan.train.ckpt_every = c.vqgan.train.steps
  # Several shards of the database (4,500 digits: 5), so that two processes share them.
  c.encode.shard_rows = 1024
  c.diffusion.train.ckpt_every = c.diffusion.train.steps
  return c


def _done(stage_dir: str) -> bool:
  try:
    with open(os.path.join(stage_dir, "stage.json")) as f:
      return bool(json.load(f).get("done"))
  except (OSError, ValueError):
    return False


def link_upstream(workdir: str, link_from: str, only) -> None:
  """Links the upstream stages this job needs from `link_from`, once finished there."""
  needed = [s for s in UPSTREAM if s not in only and not os.path.exists(os.path.join(workdir, s))]
  deadline = time.time() + WAIT_S
  for s in needed:
    src = os.path.join(link_from, s)
    while not _done(src):
      if time.time() > deadline:
        raise TimeoutError(f"{src} did not finish within {WAIT_S}s")
      time.sleep(1.0)
    try:
      os.symlink(src, os.path.join(workdir, s))
    except FileExistsError:  # another process of the same job linked it first
      pass


def run_job(job: str, data_dir: str) -> None:
  shape, workdir, stages, *link = job.split(":")
  c = config(shape, data_dir)
  only = tuple(stages.split(","))
  os.makedirs(workdir, exist_ok=True)
  if link:
    link_upstream(workdir, link[0], only)
  main.run(c, workdir, only=only, progress=False)
  import jax
  out = {}
  for s in only:
    if s in ("vqgan", "diffusion"):
      # Every process restores: orbax's restore is collective (process 0
      # alone would wait for the others forever); to_host gathers too.
      state = checkpoints.restore_params(os.path.join(workdir, s, "checkpoints"))
      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        out[f"{s}/{jax.tree_util.keystr(path)}"] = parallel.to_host(leaf)
  path = os.path.join(workdir, "params.npz")
  if parallel.process_info()[0] == 0 and out:
    if os.path.exists(path):  # an earlier job in this workdir (another stage)
      with np.load(path) as old:
        out = {**{k: old[k] for k in old.files}, **out}
    np.savez(path, **out)
  parallel.sync(f"dumped:{job}")


def fsdp_bytes(shape: str, out_path: str) -> None:
  import jax
  from rissole_jax.train import diffusion
  c = config(shape)
  mesh = parallel.make_mesh(c.mesh)
  latent_shape = diffusion.expected_latent_shape(c)
  state = diffusion.build(c, latent_shape, int(c.retrieval.k), mesh, 0)[3]
  total = lambda t: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(t))
  row = {"mesh": dict(mesh.shape), "devices": jax.device_count()}
  for name, tree in (("params", state["params"]), ("state", state)):
    per = parallel.bytes_per_device(tree)
    row[name] = {"total": total(tree), "per_device": sorted(per.values())}
  # The replicated parameter leaves: what keeps the share above 1/n.
  repl = [(jax.tree_util.keystr(p), int(x.size) * x.dtype.itemsize)
          for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
          if x.sharding.is_fully_replicated]
  row["replicated_params"] = sorted(repl, key=lambda r: -r[1])
  with open(out_path, "w") as f:
    json.dump(row, f, indent=1)


def gather_bytes(shape: str, out_path: str) -> None:
  """The database (1,001 rows of uint8 codes, its neighbour table, a codebook)
  placed for each diffusion.train.gather: bytes per device, and the sharded
  gather against the plain one."""
  import jax
  from rissole_jax.train import diffusion
  c = config(shape)
  mesh = parallel.make_mesh(c.mesh)
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 256, (1001, 8, 8)).astype(np.uint8)
  table = rng.integers(0, 1001, (1001, 3)).astype(np.int32)
  cb = rng.standard_normal((256, 4)).astype(np.float32)
  ids = rng.integers(0, 1001, 16).astype(np.int32)
  row = {"codes_bytes": codes.nbytes, "table_bytes": table.nbytes, "codebook_bytes": cb.nbytes,
         "per_device": {}, "host_bytes": {}}
  for gather in diffusion.GATHERS:
    (r, b, t), placed = diffusion.place_database(codes, cb, table, gather, mesh)
    arrays = [x for x in (r, b, t) if isinstance(x, jax.Array)]
    row["per_device"][gather] = sorted(parallel.bytes_per_device(arrays).values())
    row["host_bytes"][gather] = placed["database_bytes_host"]
    assert placed["database_bytes_per_device"] == max(row["per_device"][gather])
    if gather == "sharded":
      take = jax.jit(parallel.take_sharded(mesh))
      row["sharded_equals_plain"] = bool(
          np.array_equal(np.asarray(take(r, ids)), codes[ids])
          and np.array_equal(np.asarray(take(t, ids)), table[ids])
          and np.array_equal(np.asarray(take(r, table[ids])), codes[table[ids]]))
      step = jax.jit(diffusion.device_gather_step(lambda s, k, z0, nb: (z0, nb),
                                                  parallel.take_sharded(mesh)))
      z0, nb = step(None, None, r, t, ids, b)
      row["step_equals_plain"] = bool(np.array_equal(np.asarray(z0), cb[codes[ids]])
                                      and np.array_equal(np.asarray(nb), cb[codes[table[ids]]]))
  with open(out_path, "w") as f:
    json.dump(row, f, indent=1)


if __name__ == "__main__":
  parallel.initialize_distributed()
  if sys.argv[2] == "fsdp-bytes":
    fsdp_bytes(sys.argv[3], sys.argv[4])
  elif sys.argv[2] == "gather-bytes":
    gather_bytes(sys.argv[3], sys.argv[4])
  else:
    for job in sys.argv[3:]:
      run_job(job, sys.argv[2])
