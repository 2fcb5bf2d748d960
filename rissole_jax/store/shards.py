"""The encode stage's output: the database as shards of code indices.

  encode/codebook.npy                       (K, c) float32: the codes' vectors
  encode/{split}-{i:05d}.npy                (rows, h, w) uint8/uint16 code indices
                                            ((rows, h, w, c) float32 latents for an
                                            autoencoder without a codebook)
  encode/{split}-{i:05d}_labels.npy         (rows,) int32, -1 where unknown
  encode/{split}-{i:05d}.json               the shard's manifest (rows, fingerprint, sha256)
  encode/meta.json                          every file above, written last by process 0

Shard i of a split holds rows [i * shard_rows, (i + 1) * shard_rows) of the
source, whatever the number of processes: process p encodes shards p, p + P,
p + 2P, ... (P processes), each written atomically with its own manifest, so
an interrupted encode resumes shard by shard and 1 or 100 processes write the
same bytes. The database is the union of the shards in shard order.

Workdirs from before the shards (encode/{split}.npy float32 latents, no
"format" in meta.json) are still read, as float latents.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rissole_jax.errors import IndexMismatch
from rissole_jax import files

FORMAT = "shards"


def ranges(n: int, shard_rows: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard of n rows (at least one shard, maybe empty)."""
  shard_rows = max(int(shard_rows), 1)
  return [(s, min(s + shard_rows, n)) for s in range(0, max(n, 1), shard_rows)]


def mine(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards one process encodes: every process_count-th."""
  return list(range(process_index, num_shards, process_count))


def share(n: int, process_index: int, process_count: int, grid: int = 1) -> tuple[int, int]:
  """[start, stop) of the rows of an n-row split one process searches: an
  even, contiguous share, whatever the shards (to within `grid` rows: its
  boundaries fall on multiples of grid, the batches queries are searched in)."""
  grid = max(int(grid), 1)
  blocks = -(-n // grid)
  return tuple(min(blocks * p // process_count * grid, n)
               for p in (process_index, process_index + 1))


def _name(split: str, i: int) -> str:
  return f"{split}-{i:05d}"


def _fix(directory: Path) -> str:
  return (f"Fix: run the encode stage again (python -m rissole_jax.main --config ... "
          f"--workdir {Path(directory).parent} --only encode --overwrite), with every process "
          "of the run (or delete {directory}).").replace("{directory}", str(directory))


def write_shard(directory: Path, split: str, i: int, start: int, rows: np.ndarray,
                labels: np.ndarray, fingerprint: str) -> None:
  """One shard's rows and labels, then its manifest (a crash leaves no manifest)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  name = _name(split, i)
  files.atomic_save_npy(directory / f"{name}.npy", rows)
  files.atomic_save_npy(directory / f"{name}_labels.npy", np.asarray(labels, np.int32))
  files.write_manifest(directory / f"{name}.json", [f"{name}.npy", f"{name}_labels.npy"],
                 {"split": split, "shard": i, "start": int(start), "rows": len(rows),
                  "fingerprint": fingerprint, "dtype": str(rows.dtype),
                  "row_shape": list(rows.shape[1:])})


def shard_done(directory: Path, split: str, i: int, start: int, stop: int,
               fingerprint: str) -> bool:
  """Whether shard i is already there, intact, for these rows and this autoencoder."""
  path = Path(directory) / f"{_name(split, i)}.json"
  if not path.exists():
    return False
  try:
    m = files.read_manifest(path, "latents")
  except IndexMismatch:
    return False
  return (m.get("fingerprint"), m.get("start"), m.get("rows")) == (fingerprint, start, stop - start)


def finish(directory: Path, fingerprint: str, dataset: str, codebook: np.ndarray | None,
           splits: dict[str, tuple[int, int, str]], latent_shape) -> dict:
  """meta.json over every shard (process 0, once all processes wrote theirs).
  splits: {split: (rows, shard_rows, source name)}. Refuses missing shards and
  shards of another autoencoder, naming the fix."""
  directory = Path(directory)
  files.remove(directory / "meta.json")
  listed, shapes, sources, counts = [], {}, {}, {}
  if codebook is not None:
    files.atomic_save_npy(directory / "codebook.npy", np.asarray(codebook, np.float32))
    listed.append("codebook.npy")
  dtypes = set()
  for split, (n, shard_rows, source_name) in splits.items():
    rr = ranges(n, shard_rows)
    for i, (start, stop) in enumerate(rr):
      path = directory / f"{_name(split, i)}.json"
      if not path.exists():
        raise IndexMismatch(f"{path} is missing: shard {i} of {len(rr)} of the {split} split "
                            f"was never written (a process failed or was left out). "
                            + _fix(directory))
      m = files.read_manifest(path, "latents")
      if m["fingerprint"] != fingerprint:
        raise IndexMismatch(
            f"{path} was made by another autoencoder ({m['fingerprint']}, the others by "
            f"{fingerprint}): the shards are mixed from two runs. " + _fix(directory))
      if (m["start"], m["rows"]) != (start, stop - start):
        raise IndexMismatch(f"{path} holds rows {m['start']}.. ({m['rows']}), not "
                            f"{start}..{stop}: encode.shard_rows changed. " + _fix(directory))
      dtypes.add(m["dtype"])
      listed += [f"{_name(split, i)}.npy", f"{_name(split, i)}_labels.npy"]
    shapes[split], sources[split], counts[split] = n, source_name, len(rr)
  meta = {"format": FORMAT, "fingerprint": fingerprint, "dataset": dataset,
          "latent_shape": list(latent_shape), "rows": shapes, "shards": counts,
          "shard_rows": {s: int(v[1]) for s, v in splits.items()}, "sources": sources,
          "codes": codebook is not None, "dtype": sorted(dtypes)[0] if dtypes else None,
          "codebook_size": None if codebook is None else len(codebook)}
  files.write_manifest(directory / "meta.json", listed, meta)
  return meta


def read_meta(directory: Path) -> dict:
  """The encode folder's meta.json after checking every file it lists
  (legacy float folders included: their meta has no 'format')."""
  meta = files.read_manifest(Path(directory) / "meta.json", "latents")
  if meta.get("format", "float") not in (FORMAT, "float"):
    raise IndexMismatch(f"{directory}/meta.json: unknown format {meta['format']!r}. "
                        + _fix(directory))
  if "format" not in meta:  # before the shards: {split}.npy float latents
    meta = {**meta, "format": "float", "codes": False,
            "rows": {s: shape[0] for s, shape in meta["shapes"].items()}}
  return meta


def num_shards(meta: dict, split: str) -> int:
  return meta["shards"].get(split, 0) if meta["format"] == FORMAT else 1


def shard_start(meta: dict, split: str, i: int) -> int:
  return 0 if meta["format"] != FORMAT else i * meta["shard_rows"][split]


def read_shard(directory: Path, meta: dict, split: str, i: int,
               mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(rows, labels) of shard i of a split (legacy: the whole split is shard 0)."""
  directory, mode = Path(directory), "r" if mmap else None
  name = _name(split, i) if meta["format"] == FORMAT else split
  return (np.load(directory / f"{name}.npy", mmap_mode=mode),
          np.load(directory / f"{name}_labels.npy"))


def read_split(directory: Path, meta: dict, split: str,
               mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(rows, labels) of a split, its shards in order; (None, None) if it has none.
  mmap: the rows as a RowView over the memory-mapped shards (read on use)."""
  if split not in meta["rows"]:
    return None, None
  n = num_shards(meta, split)
  parts = [read_shard(directory, meta, split, i, mmap) for i in range(n)]
  if len(parts) == 1:
    return parts[0]
  if mmap:
    return (RowView([(shard_start(meta, split, i), p[0]) for i, p in enumerate(parts)]),
            np.concatenate([p[1] for p in parts]))
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def codebook(directory: Path, meta: dict) -> np.ndarray | None:
  return np.load(Path(directory) / "codebook.npy") if meta.get("codes") else None



def iter_shards(directory: Path, meta: dict, split: str):
  """(start row, rows) of each shard of a split, memory-mapped: a pass over a
  database that never holds more than a shard of it."""
  for i in range(num_shards(meta, split) if split in meta["rows"] else 0):
    yield shard_start(meta, split, i), read_shard(directory, meta, split, i, mmap=True)[0]


def rows_at(directory: Path, meta: dict, split: str, ids) -> np.ndarray:
  """Rows `ids` (global, any order) of a split, read from their shards."""
  ids = np.asarray(ids, np.int64)
  out = None
  for start, rows in iter_shards(directory, meta, split):
    hit = (ids >= start) & (ids < start + len(rows))
    if out is None:
      out = np.empty((len(ids), *rows.shape[1:]), rows.dtype)
    if hit.any():
      out[hit] = rows[ids[hit] - start]
  return out


def read_rows(directory: Path, meta: dict, split: str, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a split, copied from the shards they span (mapped
  only while read: a process that reads its share a batch at a time holds a
  batch, not the pages of its whole share)."""
  if meta["format"] == FORMAT:
    spans = ranges(meta["rows"][split], meta["shard_rows"][split])
  else:
    spans = [(0, meta["rows"][split])]
  out = [np.array(read_shard(directory, meta, split, i, mmap=True)[0][max(start, a) - a:
                                                                      min(stop, b) - a])
         for i, (a, b) in enumerate(spans) if a < stop and b > start]
  return out[0] if len(out) == 1 else np.concatenate(out)


class RowView:
  """A split's memory-mapped shards as one read-only array: a slice or an
  index array reads only the shards it touches (so a process that needs a
  block of rows, e.g. its devices' part of a sharded placement, reads that)."""

  def __init__(self, parts: list[tuple[int, np.ndarray]]):
    self._parts = [p for _, p in parts]
    self._ends = np.cumsum([len(p) for p in self._parts])
    self.dtype = self._parts[0].dtype
    self.shape = (int(self._ends[-1]), *self._parts[0].shape[1:])
    self.ndim = len(self.shape)
    self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step == 1:  # contiguous: whole pieces of the shards it spans
        first = int(np.searchsorted(self._ends, start, side="right"))
        out, pos = [], start
        for i in range(first, len(self._parts)):
          if pos >= stop:
            break
          base = int(self._ends[i] - len(self._parts[i]))
          piece = self._parts[i][pos - base:min(stop, int(self._ends[i])) - base]
          out.append(np.asarray(piece))
          pos += len(piece)
        return (np.concatenate(out) if out
                else np.zeros((0, *self.shape[1:]), self.dtype))
      key = np.arange(start, stop, step)
    ids = np.asarray(key, np.int64)
    flat = ids.ravel()
    out = np.empty((len(flat), *self.shape[1:]), self.dtype)
    which = np.searchsorted(self._ends, flat, side="right")
    for i in np.unique(which):
      hit = which == i
      out[hit] = self._parts[i][flat[hit] - int(self._ends[i] - len(self._parts[i]))]
    return out.reshape(*ids.shape, *self.shape[1:])

  def __array__(self, dtype=None, copy=None):
    a = self[:]
    return a if dtype is None else a.astype(dtype)
