"""The training input through Grain (data/loader.py): the same batches as the
synchronous stream for any worker count, exact resume, per-process parts,
damaged files named, and the knobs outside the fingerprints. Worker processes
take seconds each to start, so each test starts as few as it can."""
import numpy as np
import pytest

from rissole_jax.data import loader, sources
from rissole_jax.data.pipeline import TrainStream
from rissole_jax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  from rissole_jax.benchmarks.input_data import _write_jpegs
  folder = tmp_path_factory.mktemp("loader") / "jpegs"
  _write_jpegs(folder, 30, 48, 40)
  return folder


def _stream(folder, batch=8, **kw):
  src = sources.FolderSource(folder, "train", 16, 3, 0.0)
  return TrainStream(src, batch, seed=3, cache=False, **kw)


def test_workers_give_the_streams_batches_and_resume_exactly(jpeg_folder):
  stream = _stream(jpeg_folder)  # 30 rows, batches of 8: epochs end mid-batch
  want = [stream.batch(s)["image"] for s in range(12)]
  # Two workers, interrupted after 5 batches (mid-epoch), then resumed at
  # step 5 with one worker: every batch is the synchronous stream's.
  with loader.Loader(loader.StreamBatches(stream), 12, workers=2, prefetch=2) as first:
    got = [next(first)["image"] for _ in range(5)]
  with loader.Loader(loader.StreamBatches(stream, 5), 7, workers=1, prefetch=3) as rest:
    got += [b["image"] for b in rest]
    stats = rest.stats()
  assert len(got) == 12
  for s, (a, b) in enumerate(zip(want, got)):
    np.testing.assert_array_equal(a, b, err_msg=f"step {s}")
  assert 0.0 <= stats["input_wait_share"] <= 1.0 and stats["input_images_per_second"] > 0
  # No workers: a thread of this process, the same batches, put on "devices".
  with loader.Loader(loader.StreamBatches(stream, 2), 4, workers=0,
                     put=lambda el: el["image"] * 2) as it:
    for s, b in enumerate(it, start=2):
      np.testing.assert_array_equal(b, want[s] * 2)


def test_two_processes_read_disjoint_rows_that_make_the_batch(jpeg_folder):
  whole = _stream(jpeg_folder)
  parts = [_stream(jpeg_folder, process_index=p, process_count=2) for p in range(2)]
  for s in (0, 3):
    idx = [p.indices(s) for p in parts]
    assert not set(idx[0]) & set(idx[1])
    np.testing.assert_array_equal(np.concatenate(idx), whole.indices(s))
  got = []
  for p in parts:
    with loader.Loader(loader.StreamBatches(p, 3), 1, workers=0) as it:
      got.append(next(it)["image"])
  np.testing.assert_array_equal(np.concatenate(got), whole.batch(3)["image"])


def test_a_file_damaged_after_the_scan_is_named_through_a_worker(jpeg_folder, tmp_path):
  import shutil
  folder = tmp_path / "copy"
  shutil.copytree(jpeg_folder, folder)
  stream = _stream(folder)
  bad = stream.source.files[int(stream.indices(1)[0])]
  bad.write_bytes(b"not an image any more")
  with loader.Loader(loader.StreamBatches(stream), 3, workers=1) as it:
    next(it)
    with pytest.raises(DataError, match=f"{bad}.*cannot be read"):
      next(it)


def test_array_record_holds_the_folders_images(tmp_path):
  from rissole_jax.benchmarks import input_data
  where = input_data.make_data(_bench_cfg(), tmp_path)
  files = sorted(where["folder"].rglob("*.jpg"))
  rec = sources.TfdsSource(input_data.BENCH_TFDS, "train", str(where["tfds"]), 24, 3)
  assert len(rec) == len(files) == 6
  images, _ = rec.get(np.arange(6))
  for img, path in zip(images, files):  # the same bytes, decoded the same way
    np.testing.assert_array_equal(img, sources.decode_image(path, 24, 3))


def _bench_cfg():
  import ml_collections as mlc
  return mlc.ConfigDict({"jpegs": 6, "jpeg_size": 32, "photos": 1,
                         "datasets": ("folder", "array_record")})


def test_settings_and_their_refusals():
  mem = sources.ArraySource("mnist_embedded:train", np.zeros((4, 2, 2, 1), np.uint8))
  other = sources.ArraySource("folder:x:train", np.zeros((4, 2, 2, 1), np.uint8))
  assert loader.workers_for("auto", in_memory=True) == 0
  assert loader.workers_for("auto", in_memory=False) >= 1
  assert loader.workers_for("auto", in_memory=False, accelerator=False) == 0
  assert loader.workers_for(3, in_memory=True) == 3
  assert loader.prefetch_for("auto") == 2 and loader.prefetch_for(5) == 5
  assert loader.cache_for("auto", mem) and not loader.cache_for("auto", other)
  assert loader.cache_for(True, other)
  for bad in (-1, 1.5, "four", True):
    with pytest.raises(ConfigError, match="data.workers"):
      loader.workers_for(bad, False)
  with pytest.raises(ConfigError, match="data.prefetch"):
    loader.prefetch_for(0)
  with pytest.raises(ConfigError, match="data.cache"):
    loader.cache_for("yes", mem)


def test_loader_knobs_leave_the_fingerprints_alone():
  from rissole_jax.defaults import base_config
  from rissole_jax.stages import workdir
  a = base_config()
  b = base_config()
  b.data.update(workers=4, prefetch=8, cache=False)
  assert workdir.config_sections(a, ["data"]) == workdir.config_sections(b, ["data"])
  b.data.image_size = 64  # what is read still counts
  assert workdir.config_sections(a, ["data"]) != workdir.config_sections(b, ["data"])


def test_folder_scan_is_kept_and_redone_when_a_file_changes(tmp_path, monkeypatch):
  import shutil
  monkeypatch.setenv("RISSOLE_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "imgs"
  folder.mkdir()
  from rissole_jax.benchmarks.input_data import _write_jpegs
  _write_jpegs(folder, 4, 16, 16)
  shutil.copy(next(folder.rglob("*.jpg")), folder / "later.jpg")
  (folder / "zz_bad.png").write_bytes(b"not a png")
  calls = []
  real = sources.image_problem
  monkeypatch.setattr(sources, "image_problem", lambda p, *a: (calls.append(p), real(p, *a))[1])
  first = sources.FolderSource(folder, "train", 16, 3, 0.0, "skip").bad_files
  assert [p.name for p, _ in first] == ["zz_bad.png"] and len(calls) == 6
  sources._SCANS.clear()  # a new process: the stored scan is read, nothing decoded
  assert sources.FolderSource(folder, "train", 16, 3, 0.0, "skip").bad_files == first
  assert len(calls) == 6
  (folder / "later.jpg").write_bytes(b"broken now")  # a changed file: scanned again
  sources._SCANS.clear()
  again = sources.FolderSource(folder, "train", 16, 3, 0.0, "skip").bad_files
  assert [p.name for p, _ in again] == ["later.jpg", "zz_bad.png"] and len(calls) == 12


def test_input_benchmark_runs_every_setting_it_names(tmp_path):
  """configs/bench/input.py:smoke with its settings trimmed (no worker
  processes: test_workers_give... starts those): a row per (data, setting),
  each against the synchronous reader."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from configs.bench import input as bench_cfg
  from rissole_jax.benchmarks import input as bench
  cfg = bench_cfg.get_config("smoke")
  cfg.update(datasets=("folder", "array_record"), workers=("sync", 0), data_dir=str(tmp_path))
  out = bench.run(cfg, tmp_path / "input.json")
  assert [(r["dataset"], r["workers"]) for r in out["rows"]] == [
      ("folder", "sync"), ("folder", "0"), ("array_record", "sync"), ("array_record", "0")]
  for r in out["rows"]:
    assert r["loader_images_per_second"] > 0 and r["step_images_per_second"] > 0
    assert 0.0 <= r["input_wait_share"] <= 1.0 and r["loader_vs_sync"] > 0
  assert out["no_input_images_per_second"] > 0 and not out["estimates"]
  assert (tmp_path / "input.md").read_text().count("| folder |") == 2
