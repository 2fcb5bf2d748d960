"""The stage runner: skip finished stages, refuse a mismatched workdir, overwrite."""
import json
import sys
import types

import pytest

from rissole_jax import main, stages as stage_registry
from rissole_jax.defaults import base_config
from rissole_jax.errors import ConfigError, WorkdirMismatch


@pytest.fixture
def fake_stages(monkeypatch):
  calls = []

  def make(name):
    mod = types.ModuleType(f"fake_{name}")

    def run(ctx):
      calls.append(name)
      (ctx.stage_dir / "out.txt").write_text(name)
      return {"value": len(calls), "nested": {"x": 1.5}, "label": "ignored"}
    mod.run = run
    monkeypatch.setitem(sys.modules, f"fake_{name}", mod)
    return f"fake_{name}"

  stages = {"a": (make("a"), ("data",)), "b": (make("b"), ("model",))}
  monkeypatch.setattr(main, "STAGES", stages)             # the runner's imports
  monkeypatch.setattr(stage_registry, "STAGES", stages)   # stage_records's
  return calls


def _config():
  c = base_config()
  c.stages = ("a", "b")
  return c


def test_runs_then_skips(tmp_path, fake_stages):
  res = main.run(_config(), tmp_path, progress=False)
  assert fake_stages == ["a", "b"]
  metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert metrics["value"] == 1 and metrics["nested/x"] == 1.5 and "label" not in metrics
  assert "seconds" in metrics and (tmp_path / "b" / "log.txt").exists()
  main.run(_config(), tmp_path, progress=False)
  assert fake_stages == ["a", "b"]  # both skipped
  assert res["b"]["value"] == 2


def test_unfinished_stage_reruns(tmp_path, fake_stages):
  main.run(_config(), tmp_path, progress=False)
  rec = json.loads((tmp_path / "b" / "stage.json").read_text())
  rec["done"] = False  # as if interrupted
  (tmp_path / "b" / "stage.json").write_text(json.dumps(rec))
  main.run(_config(), tmp_path, progress=False)
  assert fake_stages == ["a", "b", "b"]


def test_mismatched_config_is_refused_unless_overwrite(tmp_path, fake_stages):
  main.run(_config(), tmp_path, progress=False)
  c = _config()
  c.model.ch = 7  # only stage b reads `model`
  with pytest.raises(WorkdirMismatch, match=r"model.ch: \d+ -> 7[\s\S]*--overwrite"):
    main.run(c, tmp_path, progress=False)
  main.run(c, tmp_path, overwrite=True, progress=False)
  assert fake_stages == ["a", "b", "b"]  # a kept, b redone
  c.data.image_size = 28  # upstream change: a and b are redone
  main.run(c, tmp_path, overwrite=True, progress=False)
  assert fake_stages == ["a", "b", "b", "a", "b"]


def test_unknown_stage_and_variant():
  c = _config()
  c.stages = ("a", "nope")
  with pytest.raises(ValueError, match="Unknown stage"):
    main.stage_records(c, "/tmp")
  from rissole_jax.defaults import apply_variants
  with pytest.raises(ValueError, match="Unknown config variant"):
    apply_variants(base_config(), "smokey")


def test_mesh_that_does_not_fit_is_refused():
  from rissole_jax.runtime import parallel
  c = base_config().mesh
  c.shape = (3, 1)
  with pytest.raises(ConfigError, match="needs 3 devices but 1"):
    parallel.make_mesh(c)
  c.shape = (-1, -1)
  with pytest.raises(ConfigError, match="at most one"):
    parallel.make_mesh(c)
