"""Manifests: a JSON file listing files with size and sha256, written last;
readers verify every file, and refusals name the file and the fix."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


from rissole_jax import workdir as wd
from rissole_jax.errors import IndexMismatch


def write_manifest(path: Path, files, meta: dict) -> None:
  path = Path(path)
  listed = {f: {"bytes": (path.parent / f).stat().st_size, "sha256": _sha256(path.parent / f)}
            for f in files}
  wd.atomic_write_json(path, {**meta, "files": listed})


def read_manifest(path: Path, what: str) -> dict:
  """The manifest's metadata, after checking every file it lists."""
  path = Path(path)
  fix = _fix(path.parent, what)
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
    if _sha256(f) != info["sha256"]:
      raise IndexMismatch(f"{f} is damaged: its checksum differs from {path.name}. {fix}")
  return meta


def _fix(directory: Path, what: str) -> str:
  stage = {"latents": "encode", "index": "index", "neighbour tables": "index"}.get(what, what)
  return (f"Fix: delete {directory} and run the {stage} stage again "
          f"(python -m rissole_jax.main ... --only {stage}), or rebuild the database.")


def _expect(meta: dict, expect: dict, path: Path, what: str) -> None:
  diffs = [f"{k}: {_show(meta.get(k))} in the {what}, {_show(v)} expected"
           for k, v in expect.items() if _norm(meta.get(k)) != _norm(v)]
  if diffs:
    cause = ("made by a different autoencoder" if any(d.startswith("fingerprint") for d in diffs)
             else "made with a different config")
    raise IndexMismatch(f"{path} was {cause}:\n  " + "\n  ".join(diffs) + "\n"
                        + _fix(path.parent, what))


def _norm(v):
  return json.loads(json.dumps(v, default=wd._json_default))  # tuples == lists


def _show(v):
  return repr(_norm(v))


def _sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _remove(path: Path) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
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
