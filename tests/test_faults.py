"""Fault injection: bad image files, damaged checkpoints and records, NaN
losses, kill -9 mid-training, a full disk. Each fault must end in a clear
message (a RissoleError; exit status 2 and no traceback from the CLI) or a
safe recovery that ends with exactly the results of an undisturbed run.

One smoke pipeline (conftest's smoke_workdir, made once per test run) is the
reference; every scenario works on a copy of it, so only the stages a fault
touches run again.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rissole_jax import main
from rissole_jax.stages import workdir as wd
from rissole_jax.data import sources
from rissole_jax.errors import DataError, RissoleError
from rissole_jax.train import checkpoints, guard
from rissole_jax import files

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("vqgan", "encode", "index", "diffusion", "sample")


def _config(data_dir, **changes):
  sys.path.insert(0, str(ROOT))
  from configs import mnist
  c = mnist.get_config("smoke")
  c.data.data_dir = data_dir
  c.stages = STAGES
  for key, value in changes.items():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture
def reference(smoke_workdir):
  """An undisturbed smoke run of _config(data_dir) (conftest's, shared: copy to change)."""
  return smoke_workdir


def _copy(reference, tmp_path) -> Path:
  dst = tmp_path / "run"
  shutil.copytree(reference, dst, symlinks=True)
  return dst


def _samples(root):
  return np.load(Path(root) / "sample" / "samples.npy")


def _done(root, stage) -> bool:
  return json.loads((Path(root) / stage / "stage.json").read_text())["done"]


# ---------------------------------------------------------------------------
# Image files.

def _image_folder(folder: Path, good: int = 24) -> dict:
  """`good` plain RGB images, one of every mode a user may have, and three bad
  files; returns the special files by kind."""
  from PIL import Image
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(good):
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(folder / f"img{i:02d}.png")
  a = rng.integers(0, 256, (36, 40, 3), np.uint8)
  alpha = np.full((36, 40, 1), 255, np.uint8)
  alpha[0, 0] = 0  # one transparent pixel: it must come out white
  made = {"rgb": "m_rgb.png", "grey": "m_grey.png", "rgba": "m_rgba.png",
          "palette": "m_palette.png", "grey16": "m_grey16.png", "cmyk": "m_cmyk.jpg",
          "huge": "m_huge.jpg"}
  Image.fromarray(a).save(folder / made["rgb"])
  Image.fromarray(a[..., 0]).save(folder / made["grey"])
  Image.fromarray(np.concatenate([a, alpha], -1)).save(folder / made["rgba"])
  Image.fromarray(a).quantize(256).save(folder / made["palette"])
  Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(folder / made["grey16"])
  Image.fromarray(a).convert("CMYK").save(folder / made["cmyk"])
  Image.fromarray(np.zeros((2400, 3200, 3), np.uint8)).save(folder / made["huge"], quality=50)
  (folder / "x_text.png").write_text("this is not an image\n")
  (folder / "x_empty.jpg").write_bytes(b"")
  png = (folder / made["rgb"]).read_bytes()
  (folder / "x_truncated.png").write_bytes(png[:len(png) // 2])
  made["bad"] = ["x_empty.jpg", "x_text.png", "x_truncated.png"]
  return made


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images") / "photos"
  return folder, _image_folder(folder)


def test_bad_images_error_names_the_first_and_the_count(image_folder):
  folder, made = image_folder
  with pytest.raises(DataError) as e:
    sources.FolderSource(folder, "train", 32, 1, 0.3, "error")
  msg = str(e.value)
  assert "3 of the 34 files" in msg and f"the first is {folder / 'x_empty.jpg'} (empty file)" in msg
  assert all(str(folder / b) in msg for b in made["bad"]) and "bad_images=skip" in msg


@pytest.mark.parametrize("channels", [1, 3])
def test_bad_images_skip_and_every_mode_converts(image_folder, channels):
  folder, made = image_folder
  train = sources.FolderSource(folder, "train", 32, channels, 0.3, "skip")
  held = sources.FolderSource(folder, "heldout", 32, channels, 0.3, "skip")
  assert [p.name for p, _ in train.bad_files] == made["bad"]
  assert len(train) + len(held) == 31 and len(held) > 0
  assert not {p.name for p in train.files + held.files} & set(made["bad"])
  images, labels = train.get(np.arange(len(train)))
  assert images.shape == (len(train), 32, 32, channels) and images.dtype == np.uint8
  dec = {k: sources.decode_image(folder / v, 32, channels) for k, v in made.items() if k != "bad"}
  # 16-bit is scaled to 8 bits (not clipped); opaque RGBA and palette are colour.
  ref = dec["grey"] if channels == 1 else None
  if channels == 1:
    np.testing.assert_array_equal(dec["grey16"], ref)
  np.testing.assert_array_equal(dec["rgba"][1:, 1:], dec["rgb"][1:, 1:])
  assert np.abs(dec["palette"].astype(int) - dec["rgb"]).mean() < 20
  assert np.abs(dec["cmyk"].astype(int) - dec["rgb"]).mean() < 30
  assert dec["huge"].shape == (32, 32, channels)
  # The transparent corner pixel is white (after the resize, still bright).
  from PIL import Image
  with Image.open(folder / made["rgba"]) as im:
    assert sources.pil_to_array(im, channels)[0, 0].min() == 255


def test_huge_jpeg_is_not_decoded_at_full_size(image_folder, monkeypatch):
  from PIL import JpegImagePlugin
  folder, made = image_folder
  sizes, load = [], JpegImagePlugin.JpegImageFile.load
  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load",
                      lambda self: (sizes.append(self.size), load(self))[1])
  sources.decode_image(folder / made["huge"], 32, 3)
  assert sizes and max(sizes[0]) <= 3200 // 8  # decoded at 1/8 scale


def test_vqgan_stage_skips_and_counts_bad_images(image_folder, data_dir, tmp_path, reference):
  folder, _ = image_folder
  cfg = _config(data_dir, **{"data.name": "folder", "data.folder": str(folder),
                             "data.heldout_fraction": 0.3, "data.bad_images": "error"})
  cfg.stages = ("vqgan",)
  with pytest.raises(DataError, match="3 of the 34 files"):
    main.run(cfg, tmp_path / "w", progress=False)
  assert not (tmp_path / "w" / "vqgan" / "checkpoints").exists()  # stopped before training
  cfg.data.bad_images = "skip"
  cfg.data.workers = 1  # the stage's batches decoded in a Grain worker process
  res = main.run(cfg, tmp_path / "w2", progress=False)
  assert res["vqgan"]["bad_images"] == 3 and res["vqgan"]["input_workers"] == 1
  log = (tmp_path / "w2" / "vqgan" / "log.txt").read_text()
  for bad in ("x_empty.jpg", "x_text.png", "x_truncated.png"):  # each logged once
    assert len([line for line in log.splitlines() if bad in line]) == 1, log


def test_cli_bad_images_exit_2_without_traceback(image_folder, data_dir, tmp_path):
  folder, _ = image_folder
  r = subprocess.run(
      [sys.executable, "-m", "rissole_jax.main", "--config", "configs/mnist.py:smoke",
       "--workdir", str(tmp_path / "w"), "--config.data.name=folder",
       f"--config.data.folder={folder}", "--no_progress"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "error: 3 of the 34 files" in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr


def test_damaged_tfds_records_are_a_message(data_dir, tmp_path):
  from rissole_jax.data import TrainStream, load_source
  shutil.copytree(data_dir, tmp_path / "tfds")
  shard, = (tmp_path / "tfds").rglob("mnist_embedded-train.array_record*")
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  cfg = _config(str(tmp_path / "tfds")).data
  with pytest.raises(DataError, match=r"mnist_embedded:train' cannot be read[\s\S]*prepare it"):
    TrainStream(load_source(cfg, "train"), 8, 0)  # reads everything before training


# ---------------------------------------------------------------------------
# Damaged checkpoints.

def _largest_chunk(step_dir: Path) -> Path:
  chunks = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(chunks, key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, kind: str) -> None:
  if kind == "data":  # bytes flipped in the middle of the largest array chunk
    p = _largest_chunk(step_dir)
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 16):
      b[i] ^= 0xFF
    p.write_bytes(bytes(b))
  elif kind == "metadata":
    (step_dir / "default" / "_METADATA").write_text("{ not json")
  elif kind == "missing":
    _largest_chunk(step_dir).unlink()
  elif kind == "unrecorded":  # no checksums (killed before they were written): orbax must fail
    (step_dir / checkpoints.CHECKSUMS).unlink()
    p = _largest_chunk(step_dir)
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  else:
    raise ValueError(kind)


# orbax leaves an asyncio callback behind when tensorstore fails a read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["metadata", "missing", "unrecorded", "data"])
def test_each_kind_of_damage_is_caught_and_named(reference, tmp_path, kind):
  root = _copy(reference, tmp_path)
  step_dir = root / "diffusion" / "checkpoints" / "4"
  _damage(step_dir, kind)
  mngr = checkpoints.manager(step_dir.parent, 2, 2)
  with pytest.raises(checkpoints.CheckpointError, match=str(step_dir)) as e:
    checkpoints.restore_step(mngr, 4, None)
  if kind == "unrecorded":  # orbax/tensorstore's own error, caught and named
    assert "cannot be read" in str(e.value)
  checkpoints.restore_step(mngr, 2, None)  # the older one is intact
  mngr.close()


@pytest.mark.parametrize("stage,kind", [("diffusion", "data"), ("vqgan", "missing")])
def test_damaged_final_checkpoint_stops_downstream_then_rerun_recovers(
    reference, tmp_path, data_dir, stage, kind):
  root = _copy(reference, tmp_path)
  step_dir = root / stage / "checkpoints" / "4"
  _damage(step_dir, kind)
  wd.mark_unfinished(root / "sample")
  cfg = _config(data_dir)
  with pytest.raises(checkpoints.CheckpointError) as e:
    main.run(cfg, root, only=("sample",), progress=False)
  msg = str(e.value)
  assert f"final {stage} checkpoint is damaged" in msg and str(step_dir) in msg, msg
  assert "marked unfinished" in msg and f"--workdir {root}" in msg
  assert not _done(root, stage)
  main.run(cfg, root, progress=False)  # the stage resumes from step 2 and remakes step 4
  moved = list((root / stage / checkpoints.DAMAGED).iterdir())
  assert [p.name.split(".")[0] for p in moved] == ["4"]  # kept, not deleted
  assert "checkpoint step 4 is damaged" in (root / stage / "log.txt").read_text()
  assert "resumed from step 2" in (root / stage / "log.txt").read_text()
  np.testing.assert_array_equal(_samples(root), _samples(reference))


def test_every_checkpoint_damaged_starts_over(reference, tmp_path, data_dir):
  root = _copy(reference, tmp_path)
  for step in ("2", "4"):
    _damage(root / "diffusion" / "checkpoints" / step, "data")
  wd.mark_unfinished(root / "diffusion")
  wd.mark_unfinished(root / "sample")
  main.run(_config(data_dir), root, progress=False)
  assert len(list((root / "diffusion" / checkpoints.DAMAGED).iterdir())) == 2
  assert "starting over" in (root / "diffusion" / "log.txt").read_text()
  np.testing.assert_array_equal(_samples(root), _samples(reference))


def test_leftover_partial_save_is_ignored(reference, tmp_path):
  """A save that died (disk full, kill) leaves orbax's temporary folder: never restored."""
  root = _copy(reference, tmp_path)
  tmp = root / "diffusion" / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
  tmp.mkdir()
  (tmp / "junk").write_bytes(b"\0" * 100)
  mngr = checkpoints.manager(root / "diffusion" / "checkpoints", 2, 2)
  assert mngr.latest_step() == 4
  mngr.close()


# ---------------------------------------------------------------------------
# Damaged records and arrays: a message naming the file.

@pytest.mark.parametrize("path,content,only,match", [
    ("diffusion/stage.json", "{trunc", "diffusion", r"diffusion/stage.json is damaged[\s\S]*delete it"),
    ("diffusion/latent_stats.json", '{"mean": [1]}', "sample", r"latent_stats.json is damaged"),
    ("encode/train-00000.npy", None, "diffusion", r"encode/train-00000.npy is truncated"),
    ("index/neighbours_train.npy", b"\x93NUMPY garbage", "diffusion", r"neighbours_train.npy is"),
])
def test_damaged_records_name_the_file(reference, tmp_path, data_dir, path, content, only, match):
  root = _copy(reference, tmp_path)
  p = root / path
  if content is None:
    p.write_bytes(p.read_bytes()[:1000])
  elif isinstance(content, bytes):
    p.write_bytes(content)
  else:
    p.write_text(content)
  if only in ("sample", "diffusion") and not path.endswith("stage.json"):
    wd.mark_unfinished(root / only)
  with pytest.raises(RissoleError, match=match):
    main.run(_config(data_dir), root, only=(only,), progress=False)


def test_damaged_metrics_of_a_finished_stage_redo_it(reference, tmp_path, data_dir):
  root = _copy(reference, tmp_path)
  (root / "index" / "metrics.json").write_text("{trunc")
  res = main.run(_config(data_dir), root, only=("index",), progress=False)
  assert res["index"]["k"] == 3 and wd.read_metrics(root / "index")["k"] == 3


# ---------------------------------------------------------------------------
# Non-finite losses.

@pytest.fixture
def nan_at(monkeypatch):
  """nan_at(steps): the diffusion step makes its batch NaN at these (0-based) steps."""
  from rissole_jax.train import diffusion
  original = diffusion.make_train_step

  def install(bad_steps):
    def make(model, schedule, tx, config):
      step = original(model, schedule, tx, config)

      def poisoned(state, key, z0, nb):
        bad = jnp.isin(state["step"], jnp.asarray(bad_steps))
        return step(state, key, jnp.where(bad, jnp.nan, z0), nb)
      return poisoned
    monkeypatch.setattr(diffusion, "make_train_step", make)
    diffusion._PARTS.clear()
  yield install
  diffusion._PARTS.clear()


def test_nan_stop_names_the_step_and_never_saves_it(reference, tmp_path, data_dir, nan_at):
  root = _copy(reference, tmp_path)
  shutil.rmtree(root / "diffusion")
  nan_at([2])  # the third update
  with pytest.raises(guard.NonFiniteError) as e:
    main.run(_config(data_dir), root, only=("diffusion",), progress=False)
  msg = str(e.value)
  assert "non-finite value at step 3" in msg and "not saved" in msg
  assert f"{root / 'diffusion' / 'checkpoints'}/2" in msg and "diffusion.train.lr=" in msg
  assert "nan_policy=skip_step" in msg
  assert sorted(p.name for p in (root / "diffusion" / "checkpoints").iterdir()) == ["2"]


@pytest.mark.parametrize("max_skipped,stops", [(3, False), (2, True)])
def test_nan_skip_step(reference, tmp_path, data_dir, nan_at, max_skipped, stops):
  """Two bad steps in a row: dropped and counted, or too many (the second
  case compiles nothing new: the same step, from the persistent cache)."""
  root = _copy(reference, tmp_path)
  nan_at([1, 2])
  cfg = _config(data_dir, **{"diffusion.train.nan_policy": "skip_step",
                             "diffusion.train.max_skipped_steps": max_skipped})
  if stops:
    with pytest.raises(guard.NonFiniteError, match=r"2 steps in a row[\s\S]*up to step 3"):
      main.run(cfg, root, only=("diffusion",), overwrite=True, progress=False)
  else:
    res = main.run(cfg, root, only=("diffusion",), overwrite=True, progress=False)
    assert res["diffusion"]["skipped_steps"] == 2 and np.isfinite(res["diffusion"]["loss"])
  ckpt = root / "diffusion" / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir())
  assert steps == ([2] if stops else [2, 4])
  for step in steps:  # every saved state is intact and finite
    checkpoints.restore_final(root / "diffusion", "diffusion", step)


def test_vqgan_step_flags_non_finite_values(reference, data_dir):
  """The VQ-GAN step computes the same flag (its compiled step is reused)."""
  from rissole_jax.runtime import parallel
  from rissole_jax.train import vqgan as T
  cfg = _config(data_dir)
  trainer = T.build(cfg, parallel.make_mesh(cfg.mesh))
  init_key, step_key = T.keys(cfg.seed)
  # Random images: constant ones make the gradient norm overflow (GroupNorm of
  # a constant map), which the flag rightly reports as non-finite.
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32)
  state, m = trainer.step(trainer.init_state(init_key), step_key, images)
  assert float(m[guard.FLAG]) == 1.0
  images[0, 0, 0, 0] = np.inf
  _, m = trainer.step(state, step_key, images)
  assert float(m[guard.FLAG]) == 0.0 and not np.isfinite(float(m["loss"]))


def test_bad_nan_policy_is_refused(data_dir):
  from rissole_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="nan_policy"):
    main.check_config(_config(data_dir, **{"diffusion.train.nan_policy": "ignore"}))


# ---------------------------------------------------------------------------
# kill -9 mid-training, then a rerun: the same results as undisturbed.

def test_kill_9_at_several_points_then_identical_results(reference, tmp_path, data_dir):
  work = tmp_path / "killed"
  cmd = [sys.executable, "-m", "rissole_jax.main", "--config", "configs/mnist.py:smoke",
         "--workdir", str(work), f"--config.data.data_dir={data_dir}",
         f"--config.stages={STAGES}", "--no_progress"]
  points = [  # (what must exist when the process is killed)
      work / "vqgan" / "checkpoints" / "2",          # vqgan between its two saves
      work / "vqgan" / "checkpoints" / "4",          # vqgan trained, evaluating
      work / "diffusion" / "stage.json",             # diffusion started
      work / "diffusion" / "checkpoints" / "2",      # diffusion between its two saves
  ]
  killed_at, log = [], tmp_path / "killed.log"
  for point in points:
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the run
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.time()
    while not point.exists() and proc.poll() is None and time.time() - t0 < 300:
      time.sleep(0.02)
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      killed_at.append(point)
    proc.wait()
    assert proc.returncode in (-signal.SIGKILL, 0), log.read_text()[-3000:]
  assert len(killed_at) >= 3, killed_at  # most points were reached while running
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_array_equal(_samples(work), _samples(reference))
  for name in ("train-00000.npy", "heldout-00000.npy"):
    np.testing.assert_array_equal(np.load(work / "encode" / name),
                                  np.load(reference / "encode" / name))


# ---------------------------------------------------------------------------
# A full disk.

def test_enospc_leaves_no_artifact(tmp_path, monkeypatch):
  target = tmp_path / "out" / "metrics.json"
  files.atomic_write_json(target, {"old": 1})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError) as e:
    files.atomic_write_json(target, {"new": 2})
  assert e.value.errno == errno.ENOSPC
  with pytest.raises(OSError):
    files.atomic_save_npy(tmp_path / "out" / "latents.npy", np.zeros((4, 4)))
  assert json.loads(target.read_text()) == {"old": 1}  # the old artifact, intact
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json"]


def test_enospc_in_the_cli_is_a_message(tmp_path, monkeypatch, capsys):
  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
  monkeypatch.setattr(main, "run", full)
  monkeypatch.setattr(main, "FLAGS", type("F", (), dict(
      config=object(), workdir=str(tmp_path), overwrite=False, only=[], no_progress=True,
      no_compilation_cache=True, coordinator_address=None, num_processes=None, process_id=None))())
  with pytest.raises(SystemExit) as e:
    main.main(["prog"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "No space left on device" in err and "Fix: free space" in err
