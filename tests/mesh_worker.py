"""Runs stages of the smoke config on a given mesh (in a subprocess, so the
device count can be forced before jax is imported), then dumps the final
parameters of the trained stages to an .npz for comparison.

  python tests/mesh_worker.py DEVICES MESH_SHAPE WORKDIR DATA_DIR STAGES [LINK_FROM]
"""
import os
import sys

devices, shape, workdir, data_dir, stages = sys.argv[1:6]
link_from = sys.argv[6] if len(sys.argv) > 6 else None
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Multi-process runs: the usual environment variables name the coordinator.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from configs import mnist  # noqa: E402
from rissole_jax import main, parallel  # noqa: E402
from rissole_jax.train import checkpoints  # noqa: E402

parallel.initialize_distributed()
c = mnist.get_config("smoke")
c.data.data_dir = data_dir
c.mesh.shape = tuple(int(s) for s in shape.split("x"))
# GAN off: with the hinge loss and the adaptive weight on, a few near-zero
# discriminator moments differ by ~5% between meshes (reduction-order noise
# that Adam amplifies), which would hide real layout bugs behind a loose tolerance.
c.vqgan.disc_start = 10**6
os.makedirs(workdir, exist_ok=True)
if link_from:  # reuse upstream stages made by another run (same config)
  for s in ("vqgan", "encode", "index"):
    if not os.path.exists(os.path.join(workdir, s)):
      os.symlink(os.path.join(link_from, s), os.path.join(workdir, s))
only = tuple(stages.split(","))
main.run(c, workdir, only=only, progress=False)
if parallel.process_info()[0] == 0:
  out = {}
  for s in ("vqgan", "diffusion"):
    if s in only:
      state = checkpoints.restore_params(os.path.join(workdir, s, "checkpoints"))
      import jax
      flat = jax.tree_util.tree_flatten_with_path(state)[0]
      for path, leaf in flat:
        out[f"{s}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(os.path.join(workdir, "params.npz"), **out)
