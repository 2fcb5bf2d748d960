"""Files written atomically and read back checked: the one place that knows how.

Every artifact is written to a temporary file (or folder) beside its target and
renamed into place, so a reader sees the old file or the new one, never half of
one. Folders of several files carry a manifest (JSON, written last) listing
each file's size and sha256; readers verify it, and refusals name the file and
the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from rissole_jax.errors import DataError, IndexMismatch


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes to a temporary file in the same folder, then renames over `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for everyone
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_json(path: Path, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode())


def atomic_save_npy(path: Path, array) -> None:
  import io
  import numpy as np
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: Path, **arrays) -> None:
  """Named arrays as one uncompressed .npz (np.savez), written atomically."""
  import io
  import numpy as np
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())


def json_default(o):
  import numpy as np
  if isinstance(o, (np.integer, np.floating)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: Path, missing_ok: bool = False):
  """A JSON file's contents; DataError naming the file when it is damaged
  (None when it is missing and missing_ok)."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    if missing_ok:
      return None
    raise DataError(f"{path} is missing.") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path} is damaged ({type(e).__name__}: {e}). It is a record this "
                    "program wrote. Fix: delete the stage.json beside it and rerun: the stage "
                    "that wrote it runs again (a training stage resumes from its checkpoints).") from None


def load_npy(path: Path, fix: str = "") -> "np.ndarray":
  """np.load, with a DataError naming the file (and `fix`) when it is damaged."""
  import numpy as np
  try:
    return np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise DataError(f"{path} is missing. {fix}") from None
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"{path} is damaged ({type(e).__name__}: {e}). {fix}") from None



def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, files, meta: dict) -> None:
  path = Path(path)
  listed = {f: {"bytes": (path.parent / f).stat().st_size, "sha256": sha256_file(path.parent / f)}
            for f in files}
  atomic_write_json(path, {**meta, "files": listed})


def read_manifest(path: Path, what: str) -> dict:
  """The manifest's metadata, after checking every file it lists."""
  path = Path(path)
  fix = rerun_fix(path.parent, what)
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise IndexMismatch(f"{path} is missing: the {what} was never finished (or was "
                        f"interrupted). {fix}") from None
  except json.JSONDecodeError as e:
    raise IndexMismatch(f"{path} is damaged ({e}). {fix}") from None
  for name, info in meta.get("files", {}).items():
    f = path.parent / name
    if not f.is_file():
      raise IndexMismatch(f"{f} is missing (listed in {path.name}). {fix}")
    size = f.stat().st_size
    if size != info["bytes"]:
      raise IndexMismatch(f"{f} is truncated or changed: {size} bytes, {info['bytes']} "
                          f"expected. {fix}")
    if sha256_file(f) != info["sha256"]:
      raise IndexMismatch(f"{f} is damaged: its checksum differs from {path.name}. {fix}")
  return meta


def rerun_fix(directory: Path, what: str) -> str:
  stage = {"latents": "encode", "index": "index", "neighbour tables": "index"}.get(what, what)
  return (f"Fix: delete {directory} and run the {stage} stage again "
          f"(python -m rissole_jax.main ... --only {stage}), or rebuild the database.")


def expect_meta(meta: dict, expect: dict, path: Path, what: str) -> None:
  diffs = [f"{k}: {_show(meta.get(k))} in the {what}, {_show(v)} expected"
           for k, v in expect.items() if _norm(meta.get(k)) != _norm(v)]
  if diffs:
    cause = ("made by a different autoencoder" if any(d.startswith("fingerprint") for d in diffs)
             else "made with a different config")
    raise IndexMismatch(f"{path} was {cause}:\n  " + "\n  ".join(diffs) + "\n"
                        + rerun_fix(path.parent, what))


def _norm(v):
  return json.loads(json.dumps(v, default=json_default))  # tuples == lists


def _show(v):
  return repr(_norm(v))


def sha256_file(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def remove(path: Path) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
  """Fills a temporary folder beside `target`, then renames it into place."""
  target = Path(target)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an index is for everyone
  try:
    fill(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if target.exists():
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "x")
  os.replace(tmp, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
