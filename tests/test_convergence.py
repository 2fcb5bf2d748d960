"""Benchmarks that diagnose a trained workdir: classifier FD per kept diffusion
checkpoint (convergence), where the variety goes (variety), and the protocol
both score with."""
import json

import numpy as np

from rissole_jax.benchmarks import convergence


def test_fd_per_checkpoint(smoke_workdir, tmp_path):
  steps = convergence.checkpoint_steps(smoke_workdir)
  assert steps == [2, 4]          # smoke: 4 steps, a checkpoint every 2, two kept
  rows = convergence.fd_curve("smoke", smoke_workdir, num=8, seed=0, done=set())
  assert [r["step"] for r in rows] == steps
  assert all(np.isfinite(r["classifier_fd"]) and 0 <= r["near_copies"] <= 1 for r in rows)
  # each checkpoint's own EMA weights sample: the scores differ between steps
  assert rows[0]["classifier_fd"] != rows[1]["classifier_fd"]
  # resuming: steps already measured are not redone
  assert [r["step"] for r in convergence.fd_curve("smoke", smoke_workdir, 8, 0, {2})] == [4]
  out = tmp_path / "c.png"
  convergence.plot(rows, str(out), {"smoke": smoke_workdir / "diffusion" / "log.txt"})
  assert out.stat().st_size > 0
  json.dumps(rows)                # rows are plain JSON


def test_the_protocol_scores_as_the_evaluate_stage(smoke_workdir):
  from rissole_jax.inference.configs import workdir_config
  from rissole_jax.metrics.protocol import Protocol
  config = workdir_config(smoke_workdir)
  stage = json.loads((smoke_workdir / "evaluate" / "metrics.json").read_text())   # flat
  samples = np.load(smoke_workdir / "sample" / "samples.npy")
  m, _ = Protocol(config).score(samples, config.seed)
  for key in ("fd", "fd_lo", "recall", "precision", "fd_gap"):
    np.testing.assert_allclose(m[key], stage[f"classifier/{key}"], rtol=1e-6, err_msg=key)
  assert m["floor"]["fd"]["mean"] == stage["classifier/floor/fd/mean"]


def test_variety_diagnosis_runs_and_resumes(smoke_workdir, tmp_path, monkeypatch):
  from rissole_jax.benchmarks import variety
  out = tmp_path / "v.json"
  r = variety.run(smoke_workdir, 8, 0, variety.PARTS, out, log=lambda *a: None)
  assert set(variety.PARTS) <= set(r) and json.loads(out.read_text())["meta"]["num"] == 8
  for part in variety.PARTS:
    assert np.isfinite(r[part]["fd"]) and "fd_lo" in r[part] and "floor_recall" in r[part]
  assert 1 <= r["samples"]["distinct_queries"] <= 8
  assert r["oracle"]["real_to_nearest_neighbour"] > 0     # never the image itself
  # A rerun skips the parts already in --out: it samples nothing.
  from rissole_jax.inference.sampler import Sampler
  monkeypatch.setattr(Sampler, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
  assert variety.run(smoke_workdir, 8, 0, variety.PARTS, out, log=lambda *a: None)["oracle"] \
      == r["oracle"]


def test_variety_measures():
  from rissole_jax.benchmarks import variety
  b = variety.class_balance(np.array([0, 0, 1]), np.array([0, 1, 1]), 2)
  assert b["histogram"] == [0.6667, 0.3333] and np.isclose(b["tv_distance"], 1 / 3)
  nb = np.array([[[0., 0.], [2., 0.]]])               # one x, k = 2 neighbours
  d = variety.neighbour_distances(np.array([[0., 0.]]), nb, scale=2.0)
  assert d == {"to_nearest_neighbour": 0.0, "to_neighbour_mean": 0.5, "neighbour_spread": 0.5}


def test_editing_benchmark_runs_on_the_smoke_model(smoke_workdir, tmp_path):
  from rissole_jax.benchmarks import editing
  r = editing.run(smoke_workdir, 4, ["top"], picture=tmp_path / "p.png")
  assert r["num"] == 4 and 0 <= r["baseline_agreement"] <= 1
  t = r["top"]
  assert 0 <= t["label_agreement"] <= 1 and 0 < t["distinct_completions"] <= 1
  assert np.isfinite(t["mask_seam_score"]) and t["kept_pixel_error"] >= 0
  assert (tmp_path / "p.png").stat().st_size > 0
