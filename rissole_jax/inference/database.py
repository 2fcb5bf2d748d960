"""The database sampling retrieves from, held in memory: latents (exact
codebook vectors when the autoencoder has a codebook), their code indices,
labels and the neighbour table. retrieval.Database is the same database on
disk; `SamplingDatabase.from_retrieval` reads one into the other."""
from __future__ import annotations

import dataclasses

import numpy as np

from rissole_jax.errors import DataError
from rissole_jax.store import codes as codes_lib


@dataclasses.dataclass
class SamplingDatabase:
  """Latents, codes, labels and neighbour table; the retrieval index is loaded
  or built when first needed (retrieval for user images)."""
  latents: np.ndarray            # (N, h, w, c) float32, not normalised
  neighbours: np.ndarray         # (N, k) int32, never an item itself
  labels: np.ndarray             # (N,) int32, -1 where unknown
  name: str
  codes: np.ndarray | None = None  # (N, h, w) uint8/uint16
  saved: object = dataclasses.field(default=None, repr=False)  # retrieval.Database on disk
  _index: object = dataclasses.field(default=None, repr=False)

  def __len__(self) -> int:
    return len(self.latents)

  @classmethod
  def from_retrieval(cls, db, codebook: np.ndarray | None) -> "SamplingDatabase":
    """From retrieval.Database; with a codebook, latents become the exact codebook
    vectors (the encoder's straight-through output can differ in the last bit),
    so a workdir and its model file sample the same images."""
    codes = getattr(db, "codes", None)
    if codebook is not None and codes is not None:  # stored as codes: of this codebook?
      if db.codebook.shape != codebook.shape or not np.array_equal(db.codebook, codebook):
        raise DataError(f"the database in {db.index_dir.parent} is stored as codes of another "
                        "codebook (another VQ-GAN). Fix: re-run the encode and index stages with "
                        "this VQ-GAN (python -m rissole_jax.main ... --only encode,index "
                        "--overwrite).")
      codes = np.asarray(codes)
      latents = codes_lib.from_codes(codes, codebook)
    else:
      latents, codes = np.asarray(db.latents, np.float32), None
      if codebook is not None:  # float latents (an older workdir): to codes, refusing others
        codes = codes_lib.to_codes(latents, codebook)
        latents = codes_lib.from_codes(codes, codebook)
    out = cls(latents, np.asarray(db.neighbours, np.int32), np.asarray(db.labels, np.int32),
              db.dataset, codes, saved=db)
    out.check()
    return out

  @classmethod
  def from_codes(cls, codes, codebook, neighbours, labels, name: str) -> "SamplingDatabase":
    out = cls(codes_lib.from_codes(codes, codebook), np.asarray(neighbours, np.int32),
              np.asarray(labels, np.int32), name, codes)
    out.check()
    return out

  def check(self) -> None:
    """The neighbour table fits the database and never lists an item itself."""
    n, _ = self.neighbours.shape
    if n != len(self):
      raise DataError(f"neighbour table has {n} rows but the database {len(self)} latents.")
    if n and (self.neighbours.min() < 0 or self.neighbours.max() >= len(self)):
      raise DataError("neighbour table holds ids outside the database.")
    if np.any(self.neighbours == np.arange(n)[:, None]):
      raise DataError("neighbour table lists an item as its own neighbour: a query must "
                      "never retrieve itself. Rebuild the index.")

  def index(self, config):
    """The retrieval index: the saved one where there is one, else built over
    the latents' embeddings, as the index stage builds it."""
    if self._index is None:
      from rissole_jax import retrieval
      if self.saved is not None:
        self._index = self.saved.load_index(config)
      else:
        red = retrieval.fit_reduction(self.latents, None, self.latents.shape[1:], config)
        self._index = retrieval.Index.build(retrieval.embed(self.latents, config, red), config,
                                            reduction=red)
    return self._index


def stored_arrays(db, codebook: np.ndarray | None) -> dict:
  """The database as files store it: the neighbour table, and the latents as
  code indices of `codebook` (16x smaller than float32 with a 256-entry
  codebook) where they are codebook vectors, else float32 latents. `db`:
  anything with latents and neighbours (and codes, where known)."""
  out = {"neighbours": np.asarray(db.neighbours, np.int32)}
  codes = getattr(db, "codes", None)
  if codebook is not None and codes is None:
    try:
      codes = codes_lib.to_codes(db.latents, codebook)
    except DataError:
      codes = None
  if codebook is not None and codes is not None:
    return {**out, "codes": np.asarray(codes)}
  return {**out, "latents": np.asarray(db.latents, np.float32)}
