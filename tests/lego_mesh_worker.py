"""The LEGO denoiser on a 2x4 (data x fsdp) mesh of 8 host devices against one
device: forward outputs and one train step's parameters. Run by test_lego.py
with XLA_FLAGS=--xla_force_host_platform_device_count=8; prints OK."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rissole_jax.runtime import parallel  # noqa: E402
from rissole_jax.defaults import apply_variants, base_config  # noqa: E402
from rissole_jax.train import diffusion as dif  # noqa: E402

SHAPE, K = (8, 8, 4), 3


def main():
  assert jax.device_count() == 8, jax.devices()
  c = apply_variants(base_config(), "lego_pg")
  c.model.lego.update(depth=2, width=64, emb_dim=32)   # 2 heads; width shards over fsdp
  c.retrieval.k = K
  c.diffusion.timesteps = 20
  c.diffusion.cond_dropout = 0.1
  c.diffusion.train.update(batch_size=8, lr=1e-3, warmup_steps=1)
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(8, *SHAPE)).astype(np.float32)
  nb = rng.normal(size=(8, K, *SHAPE)).astype(np.float32)
  results = []
  for shape in ((1, 1), (2, 4)):
    c.mesh.shape = shape
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = parallel.make_mesh(c.mesh, devices)
    rules = c.mesh.logical_axis_rules
    model, schedule, tx, state, sh = dif.build(c, SHAPE, K, mesh, 0)
    p = dif.parts(c, SHAPE)
    repl = parallel.replicated(mesh)
    step = jax.jit(p.step, in_shardings=(sh, repl, parallel.batch_sharding(mesh, rules, 4),
                                         parallel.batch_sharding(mesh, rules, 5)),
                   out_shardings=(sh, repl))
    loss = jax.jit(p.eval_loss)
    zb, nbb = parallel.put_batch((z0, nb), mesh, rules)
    before = np.asarray(loss(state["params"], zb, nbb, jax.random.PRNGKey(5)))
    state, _ = step(state, jax.random.PRNGKey(1), zb, nbb)
    after = np.asarray(loss(state["params"], zb, nbb, jax.random.PRNGKey(5)))
    params = jax.tree.map(lambda a: np.asarray(parallel.to_host(a)), nn.meta.unbox(state["params"]))
    if shape == (2, 4):
      sharded = [x for x in jax.tree.leaves(state["params"]) if not x.sharding.is_fully_replicated]
      assert sharded, "no parameter is sharded over fsdp"
    results.append((before, after, params))
  (b1, a1, p1), (b8, a8, p8) = results
  np.testing.assert_allclose(b8, b1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a8, a1, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5), p1, p8)
  print("OK")


if __name__ == "__main__":
  main()
