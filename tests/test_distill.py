"""Progressive distillation (train/distill.py, the distill stage and command,
the "distilled" sampler): the target, the grid, one round on the smoke model
that makes its student match its teacher better, exact resume, and the
student through the model file and the StableHLO export."""
import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import distill as distill_cli
from rissole_jax.defaults import base_config
from rissole_jax.diffusion import solvers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError
from rissole_jax.train import distill

# One round (4 -> 2 steps) a few steps long, on the smoke model.
ROUND = ["--set", "distill.teacher_steps=4", "--set", "distill.min_steps=2",
         "--set", "distill.train.steps=6", "--set", "distill.train.batch_size=16",
         "--set", "distill.train.lr=0.003", "--set", "distill.train.warmup_steps=1",
         "--set", "distill.train.ckpt_every=2", "--set", "distill.train.log_every=2",
         "--no_progress"]


def test_trailing_grid_halves_and_counts():
  a = solvers.trailing_timesteps(1000, 16)
  assert a[-1] == 999 and len(np.unique(a)) == 16
  np.testing.assert_array_equal(a[1::2], solvers.trailing_timesteps(1000, 8))
  c = base_config().distill
  assert distill.student_counts(c) == [8, 4, 2, 1]
  bad = base_config()
  bad.distill.teacher_steps = 12   # not min_steps times a power of two
  with pytest.raises(ConfigError, match="power of two"):
    distill.check_config(bad)


def test_target_is_two_teacher_steps_in_one():
  """A student predicting x~ reaches in one DDIM step where the teacher's two go."""
  c = base_config()
  c.diffusion.timesteps = 50
  sch = make_schedule(c.diffusion)
  teacher = lambda z, t: 0.3 * z + 0.01 * t[:, None, None, None]   # any network (v output)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  u = distill.grid(50, 2)
  ab = np.concatenate([[1.0], np.asarray(sch.alphas_cumprod)])   # index t+1; t=-1 is clean
  for i in (1, 2):
    t, tm, te = (jnp.full((3,), u[j]) for j in (2 * i, 2 * i - 1, 2 * i - 2))
    x = distill.target(sch, "v", teacher, z, t, tm, te)
    two = distill.ddim_step(sch, "v", teacher, distill.ddim_step(sch, "v", teacher, z, t, tm),
                            tm, te)
    (a_t, s_t), (a_e, s_e) = ((np.sqrt(ab[int(v[0]) + 1]), np.sqrt(1 - ab[int(v[0]) + 1]))
                              for v in (t, te))
    one = a_e * x + s_e * (z - a_t * x) / s_t   # DDIM from t to te with x~ as the estimate
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def distilled(smoke_workdir, tmp_path_factory):
  """A copy of the smoke run with one distillation round done (4 -> 2 steps)."""
  w = tmp_path_factory.mktemp("distill") / "run"
  shutil.copytree(smoke_workdir, w, symlinks=True)
  assert distill_cli.main(["--workdir", str(w), *ROUND]) == 0
  return w


def test_one_round_student_matches_its_teacher_better(distilled):
  m = json.loads((distilled / "distill" / "round_2" / "metrics.json").read_text())
  assert m["heldout_match_after"] < m["heldout_match_before"], m
  from rissole_jax import Sampler
  s = Sampler.from_workdir(distilled)
  assert sorted(s.students) == [2]
  a = s.sample(4, seed=0, sampler="distilled", steps=2, progress=False)
  assert a.shape == (4, 32, 32, 1)
  assert s.last_timings["nfe_per_sample"] == 2
  b = s.sample(4, seed=0, sampler="distilled", steps=2, eta=0.0, progress=False)
  assert np.array_equal(a, s.sample(4, seed=0, sampler="distilled", steps=2, progress=False))
  assert not np.array_equal(a, b)    # sample.eta acts (the config's 1: stochastic steps)
  with pytest.raises(ConfigError, match="take 2 steps"):
    s.sample(4, sampler="distilled", steps=4, progress=False)
  with pytest.raises(ConfigError, match="no distilled student"):
    _without_students(s).sample(2, sampler="distilled", steps=2)


def _without_students(s):
  out = copy.copy(s)
  out.students = {}
  return out


def test_resume_gives_the_same_student(distilled, tmp_path):
  """Killed after the checkpoint at step 4 (of 6): the rerun resumes there
  and ends with the same student, bit for bit."""
  w = tmp_path / "run"
  shutil.copytree(distilled, w, symlinks=True)
  d = w / "distill"
  want = (d / "students" / "2.msgpack").read_bytes()
  for p in (d / "stage.json", d / "metrics.json", d / "students.json",
            d / "students" / "2.msgpack"):
    p.unlink()
  shutil.rmtree(d / "round_2" / "checkpoints" / "6")
  assert distill_cli.main(["--workdir", str(w), *ROUND]) == 0
  assert "resumed from step 4" in (d / "log.txt").read_text()
  assert (d / "students" / "2.msgpack").read_bytes() == want


def test_student_through_model_file_and_export(distilled, tmp_path):
  from rissole_jax import Sampler
  from rissole_jax.inference import stablehlo
  s = Sampler.from_workdir(distilled)
  s.save(tmp_path / "m.rissole", weights="int8")
  back = Sampler.load(tmp_path / "m.rissole")
  assert back.manifest["students"] == [2] and sorted(back.students) == [2]
  a = s.quantized("int8_weights").sample(3, seed=1, sampler="distilled", steps=2, progress=False)
  b = back.quantized("int8_weights").sample(3, seed=1, sampler="distilled", steps=2,
                                            progress=False)
  assert np.abs(a.astype(int) - b).mean() < 3   # int8 storage: the same model, rounded
  with back.config.unlocked():
    back.config.sample.update(sampler="distilled", steps=2)
  m = stablehlo.export_stablehlo(back, tmp_path / "exp", platforms=("cpu",), say=lambda *a: None)
  assert m["sampler"]["name"] == "distilled" and m["nfe_per_image"] == 2
  assert m["sampler"]["spacing"] == "trailing"   # the grid the student was trained on
  _, leaves, _, _ = stablehlo.build(back, "none")
  student = jax.tree.leaves(jax.device_get(back.students[2]))
  assert all(np.array_equal(x, y) for x, y in zip(leaves, student))   # the student's, not the teacher's


def test_ema_decay_acts(monkeypatch):
  """distill.train.ema_decay reaches the round's EMA update (traced, not
  compiled: dtrain.ema_update's own behaviour is the diffusion stage's)."""
  import flax.linen as nn
  from rissole_jax.defaults import smoke
  from rissole_jax.models import make_denoiser
  from rissole_jax.models import rows as model_rows
  from rissole_jax.train import diffusion as dtrain
  c = smoke(base_config())
  shape, k = (8, 8, 4), c.retrieval.k
  model, sch = make_denoiser(c, shape), make_schedule(c.diffusion)
  x, t, cond = model_rows.init_inputs(model, shape, k)
  p = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, t, **cond)["params"]))
  seen = []
  real = dtrain.ema_update
  monkeypatch.setattr(dtrain, "ema_update", lambda e, q, s, d: seen.append(d) or real(e, q, s, d))
  for decay in (0.0, 0.5):
    c.distill.train.ema_decay = decay
    fns = distill.parts(c, model, sch, 2)
    state = {"step": jnp.zeros((), jnp.int32), "params": p, "ema": p,
             "opt": jax.eval_shape(fns.tx.init, p), "teacher": p}
    jax.eval_shape(fns.step, state, jax.random.PRNGKey(3), jnp.zeros((2, *shape)),
                   jnp.zeros((2, k, *shape)))
  assert seen == [0.0, 0.5]
