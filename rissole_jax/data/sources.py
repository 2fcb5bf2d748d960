"""Random-access image sources: the embedded default, tfds catalogue datasets,
and a folder of images. Every source returns uint8 images (H, W, C) already
resized and cropped to the config's size, plus an integer label (-1 if none).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

TRAIN, HELDOUT = "train", "heldout"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


from rissole_jax.errors import DataError, check_choice


class Source(Protocol):
  name: str

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, H, W, C) and int32 labels (B,) for the given rows."""


def center_crop_resize(img: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Center-crop to a square, then resize (area-like antialiasing via PIL)."""
  from PIL import Image
  if img.ndim == 2:
    img = img[..., None]
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  if img.shape[-1] == 1 and channels == 3:
    img = np.repeat(img, 3, axis=-1)
  elif img.shape[-1] in (3, 4) and channels == 1:
    img = np.asarray(Image.fromarray(img[..., :3]).convert("L"))[..., None]
  elif img.shape[-1] == 4:
    img = img[..., :3]
  if s != size:
    mode = "L" if img.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
    img = np.asarray(pil.resize((size, size), Image.BICUBIC, reducing_gap=None))
    img = img.reshape(size, size, -1)
  return np.ascontiguousarray(img, dtype=np.uint8)


class ArraySource:
  """A source held in memory (small datasets, tests, database swaps)."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray | None = None):
    self.name = name
    self.images = np.asarray(images, np.uint8)
    self.labels = (np.full(len(images), -1, np.int32) if labels is None
                   else np.asarray(labels, np.int32))

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices):
    indices = np.asarray(indices)
    return self.images[indices], self.labels[indices]


def resolve_data_dir(data_dir: str | None) -> str | None:
  """data.data_dir as this process reads it: gs://BUCKET/PATH becomes
  ~/gcs/BUCKET/PATH where that gcsfuse mount exists (launch/tpu_pod.sh mounts
  it on every worker of a pod); otherwise it stays a URL, which tfds reads
  itself where its GCS support (gcsfs or TensorFlow) is installed."""
  if data_dir and str(data_dir).startswith("gs://"):
    bucket, _, rest = str(data_dir)[len("gs://"):].partition("/")
    local = Path.home() / "gcs" / bucket
    if os.path.ismount(local) or (local / rest).is_dir():
      return str(local / rest)
  return data_dir


def _cache_dir(data_dir: str | None) -> Path:
  """Where small derived files (label row lists) go: next to the data, or
  in the user cache for data read straight from gs:// ."""
  if data_dir and str(data_dir).startswith("gs://"):
    key = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~/.cache/rissole_jax/tfds_rows")) / key
  return Path(os.path.expanduser(data_dir or "~/tensorflow_datasets"))


class TfdsSource:
  """A prepared tfds dataset read with `tfds.data_source` (array_record).
  Images are read as their stored bytes and decoded here, as image files
  are: a full-size JPEG is decoded at the scale the config needs."""

  def __init__(self, name, split, data_dir, image_size, channels, label_key="label",
               image_key="image", crop=None, keep_labels=None):
    import tensorflow_datasets as tfds
    self.name = f"{name}:{split}"
    self.image_size, self.channels = image_size, channels
    self.label_key, self.image_key, self.crop = label_key, image_key, crop
    data_dir = resolve_data_dir(data_dir)
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                  decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types here; all mean "not usable".
      raise DataError(_missing_message(name, data_dir, e)) from e
    self._rows = None
    if keep_labels is not None:
      self._rows = _rows_with_labels(self._ds, label_key, keep_labels, data_dir, name, split)

  def __len__(self):
    return len(self._rows) if self._rows is not None else len(self._ds)

  def get(self, indices):
    indices = np.asarray(indices)
    rows = self._rows[indices] if self._rows is not None else indices
    images, labels = [], []
    try:
      examples = self._ds.__getitems__([int(r) for r in rows])
    except Exception as e:  # a damaged array_record file or image in it
      raise DataError(
          f"Dataset '{self.name}' cannot be read at rows {int(rows.min())}..{int(rows.max())} "
          f"({type(e).__name__}: {str(e)[:300]}). Its prepared files are damaged. Fix: "
          "prepare it again (tfds build ... --file_format=array_record into a new --data_dir; "
          "for mnist_embedded delete its folder under data_dir and it is rebuilt).") from None
    for row, ex in zip(rows, examples):
      try:
        images.append(decode_image(io.BytesIO(ex[self.image_key]), self.image_size,
                                   self.channels, self.crop))
      except Exception as e:  # PIL raises many types for a damaged image
        raise DataError(
            f"Dataset '{self.name}' row {int(row)} holds an image that does not decode "
            f"({type(e).__name__}: {str(e)[:200]}). Its prepared files are damaged. Fix: "
            "prepare it again (tfds build ... --file_format=array_record into a new --data_dir).") from None
      labels.append(int(ex[self.label_key]) if self.label_key in ex else -1)
    return np.stack(images), np.asarray(labels, np.int32)


def _rows_with_labels(ds, label_key, keep_labels, data_dir, name, split):
  """Rows of `ds` whose label is kept; cached next to the data (a one-off scan)."""
  keep = np.asarray(sorted(keep_labels))
  tag = hashlib.sha1(keep.tobytes()).hexdigest()[:12]
  cache = _cache_dir(data_dir) / f"{name}_{split}_rows_{tag}.npy"
  if cache.exists():
    try:
      return np.load(cache)
    except (OSError, ValueError, EOFError):
      pass  # damaged: a cache, so it is made again below
  labels = np.asarray([int(ds[i][label_key]) for i in range(len(ds))])
  rows = np.flatnonzero(np.isin(labels, keep)).astype(np.int64)
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")  # every process of a pod may write it
  np.save(tmp, rows)
  os.replace(tmp, cache)
  return rows


def _missing_message(name, data_dir, err) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (
      f"Dataset '{name}' is not prepared as array_record under {where} ({type(err).__name__}: {err}).\n"
      f"Fix: prepare it once on a machine that has the source files:\n"
      f"  pip install 'rissole_jax[tfds]'   # TensorFlow, needed only to prepare catalogue datasets\n"
      f"  tfds build {name} --data_dir {where} --file_format=array_record"
      + ("  --manual_dir DIR_WITH_THE_ARCHIVES" if name.startswith("imagenet2012") or name == "celeb_a" else "")
      + "\nor point --config.data.data_dir at the directory that holds it, or use a folder of "
      "images with --config.data.name=folder --config.data.folder=PATH.")


BAD_IMAGES = ("error", "skip")


def depth_scale(mode: str, a: np.ndarray) -> float:
  """The factor to 8 bits of a single-channel PIL image of `mode` (values a),
  set by the depth the file declares, not by how bright it is (a dark 16-bit
  scan whose values stay below 256 is still 16-bit):
    I;16*  16-bit: 0..65535 -> 0..255 (1/257)
    I      32-bit integers. Some Pillow versions open 16-bit PNGs as "I", and
           a 32-bit image whose values all fit 0..65535 holds 16-bit data in
           practice, so it is scaled as 16-bit; otherwise 0..2**31-1 -> 0..255.
    F      float, 0..1 -> 0..255."""
  if mode == "F":
    return 255.0
  if mode.startswith("I;16"):
    return 1 / 257
  if a.min(initial=0) >= 0 and a.max(initial=0) <= 65535:
    return 1 / 257
  return 255 / (2**31 - 1)


def pil_to_array(im, channels: int) -> np.ndarray:
  """An opened PIL image as uint8 (H, W, 1 or 3): greyscale, RGB, RGBA and
  palette (transparency on white), 16-bit and float, CMYK, YCbCr, LAB alike."""
  from PIL import Image
  if im.mode in ("I", "F") or im.mode.startswith("I;16"):
    a = np.asarray(im)
    a = a.astype(np.float64) * depth_scale(im.mode, a)
    im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return np.asarray(im.convert("L" if channels == 1 else "RGB"))


def decode_image(path, size: int, channels: int, crop=None) -> np.ndarray:
  """uint8 (size, size, channels) of an image file (a path or a file object).
  Without a crop, JPEGs are decoded at the smallest scale at least `size`
  (PIL's draft): a huge photo is not loaded at full size. A crop (top, left,
  height, width) is in full-size pixels, taken before the resize."""
  from PIL import Image
  with Image.open(path) as im:
    if im.format == "JPEG" and crop is None:
      im.draft("L" if channels == 1 else "RGB", (size, size))
    img = pil_to_array(im, channels)
  if crop is not None:  # e.g. CelebA's face crop
    t, l, h, w = crop
    img = img[t:t + h, l:l + w]
  return center_crop_resize(img, size, channels)


def image_problem(path: Path, size: int = 8) -> str | None:
  """Why `path` is not a usable image (None if it is): empty, not an image,
  damaged or truncated, too large for PIL. Decodes it once (small, for JPEGs)."""
  from PIL import Image
  try:
    if path.stat().st_size == 0:
      return "empty file"
    with Image.open(path) as im:
      im.verify()  # structure and checksums, without decoding
    decode_image(path, size, 3)  # the pixels themselves (a truncated file fails here)
    return None
  except Image.DecompressionBombError as e:
    return f"too large ({e})"
  except Exception as e:  # PIL raises many types for bad files; all mean "not usable"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


_SCANS: dict = {}  # (folder, files with sizes and times) -> {path: problem}: once per process


def scan_folder(folder: Path, files: list[Path]) -> dict[Path, str]:
  """{path: problem} of the files that are not usable images, checked in
  parallel (PIL releases the GIL while decoding). Kept per process and in the
  user cache (folder_scans/), keyed by every file's path, size and time: a
  restarted or resumed run does not decode a large folder again (20,000
  JPEGs: 2.5 min on 2 cores), and any changed file makes a new scan."""
  key = (str(folder), tuple((str(p), *_stat(p)) for p in files))
  if key not in _SCANS:
    _SCANS.clear()
    _SCANS[key] = _stored_scan(key, files)
  return _SCANS[key]


def _stored_scan(key, files: list[Path]) -> dict[Path, str]:
  from rissole_jax.files import atomic_write_json
  from rissole_jax.runtime.cache import user_cache_dir
  digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
  stored = user_cache_dir() / "folder_scans" / f"{digest}.json"
  try:
    got = json.loads(stored.read_text())
    if got.get("key") == digest:
      return {p: got["bad"][str(p)] for p in files if str(p) in got["bad"]}  # in file order
  except (OSError, ValueError, AttributeError, KeyError, TypeError):
    pass  # missing or damaged: a cache, scanned again below
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    problems = list(pool.map(image_problem, files, chunksize=64))
  bad = {p: why for p, why in zip(files, problems) if why is not None}
  try:
    atomic_write_json(stored, {"key": digest, "folder": key[0], "files": len(files),
                               "bad": {str(p): why for p, why in bad.items()}})
  except OSError:
    pass  # a read-only cache only costs the next run a scan
  return bad


def _stat(p: Path) -> tuple[int, int]:
  try:
    st = p.stat()
    return st.st_size, st.st_mtime_ns
  except OSError:
    return -1, -1


class FolderSource:
  """Every image file under a folder (recursively), split by a fixed hash of its path.

  Every file is checked when the folder is first read (once per process):
  bad_images="error" refuses a folder with any file that does not decode,
  naming the first and the count; "skip" leaves them out (`bad_files` lists
  them, with the reason). The split of a good file never depends on the others."""

  def __init__(self, folder, split, image_size, channels, heldout_fraction=0.1,
               bad_images="error"):
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
      raise DataError(f"Image folder '{folder}' does not exist. Fix: set "
                      "--config.data.folder to a directory of PNG/JPEG files.")
    check_choice("data.bad_images", bad_images, BAD_IMAGES, DataError)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
      raise DataError(f"No images ({', '.join(IMAGE_EXTS)}) found under '{folder}'.")
    bad = scan_folder(folder, files)
    if bad and bad_images == "error":
      first = next(iter(bad))
      listed = "\n  ".join(f"{p}: {why}" for p, why in list(bad.items())[:5])
      raise DataError(
          f"{len(bad)} of the {len(files)} files under '{folder}' are not usable images; "
          f"the first is {first} ({bad[first]}):\n  {listed}"
          + ("\n  ..." if len(bad) > 5 else "")
          + "\nFix: remove or replace them, or set --config.data.bad_images=skip to leave them out.")
    self.bad_files = sorted(bad.items())
    files = [p for p in files if p not in bad]

    def is_heldout(p):  # stable under adding files: depends only on the path.
      h = int(hashlib.sha1(str(p.relative_to(folder)).encode()).hexdigest()[:8], 16)
      return h / 0xFFFFFFFF < heldout_fraction

    self.files = [p for p in files if is_heldout(p) == (split == HELDOUT)]
    if not self.files:
      raise DataError(f"Split '{split}' of '{folder}' is empty ({len(files)} usable images in "
                      f"all, heldout_fraction={heldout_fraction}): add images or change it.")
    self.name = f"folder:{folder}:{split}"
    self.image_size, self.channels = image_size, channels

  def __len__(self):
    return len(self.files)

  def get(self, indices):
    out = []
    for i in np.asarray(indices):
      path = self.files[int(i)]
      try:
        out.append(decode_image(path, self.image_size, self.channels))
      except Exception as e:  # changed since the check (or a decoder quirk the check missed)
        raise DataError(f"{path} cannot be read as an image any more ({type(e).__name__}: {e}). "
                        "Fix: restore or remove it.") from None
    return np.stack(out), np.full(len(out), -1, np.int32)


def prepare_embedded(data_dir: str | None) -> None:
  """Writes the embedded MNIST split once (a few seconds, no network)."""
  from rissole_jax.data.mnist_embedded import MnistEmbedded
  builder = MnistEmbedded(data_dir=resolve_data_dir(data_dir), file_format="array_record")
  builder.download_and_prepare()


# tfds name, split names (train, held-out), and per-dataset preprocessing.
CATALOGUE = {
    # CelebA: the usual 140x140 (here 148) face crop, then resize to 64.
    "celeb_a": dict(tfds_name="celeb_a", splits=("train", "test"), label_key="none",
                    crop=(40, 15, 148, 148)),
    "imagenette": dict(tfds_name="imagenette/full-size-v2", splits=("train", "validation")),
    "imagenet100": dict(tfds_name="imagenet2012", splits=("train", "validation")),
}


def load_source(data_cfg, split: str) -> Source:
  """The source named by `data_cfg.name` for split 'train' or 'heldout'."""
  if split not in (TRAIN, HELDOUT):
    raise ValueError(f"split must be '{TRAIN}' or '{HELDOUT}', got {split!r}")
  name, size, ch = data_cfg.name, data_cfg.image_size, data_cfg.channels
  if name == "mnist_embedded":
    if size != 32 or ch != 1:
      raise DataError("mnist_embedded is 32x32x1: set data.image_size=32, data.channels=1.")
    try:
      return TfdsSource("mnist_embedded", split, data_cfg.data_dir, size, ch)
    except DataError:
      prepare_embedded(data_cfg.data_dir)
      return TfdsSource("mnist_embedded", split, data_cfg.data_dir, size, ch)
  if name == "folder":
    if not data_cfg.get("folder"):
      raise DataError("data.name=folder needs --config.data.folder=PATH (a directory of images).")
    return FolderSource(data_cfg.folder, split, size, ch, data_cfg.get("heldout_fraction", 0.1),
                        data_cfg.get("bad_images", "error"))
  if name in CATALOGUE:
    spec = CATALOGUE[name]
    tfds_split = spec["splits"][0 if split == TRAIN else 1]
    keep = list(data_cfg.classes) if data_cfg.get("classes") else None
    return TfdsSource(spec["tfds_name"], tfds_split, data_cfg.data_dir, size, ch,
                      label_key=spec.get("label_key", "label"), crop=spec.get("crop"),
                      keep_labels=keep)
  check_choice("dataset", name, ("mnist_embedded", "folder", *CATALOGUE), DataError,
               hint="Fix: set --config.data.name to one of them.")
