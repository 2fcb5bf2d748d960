"""Retrieval: embeddings, exact and ScaNN search, self-exclusion, persistence,
refusal of mismatched or damaged files, the exact fallback, and the encode and
index stages run through the stage runner with a fake autoencoder."""
import importlib.util
import json
import logging
import sys

import numpy as np
import pytest

from rissole_jax import blocks, retrieval as R
from rissole_jax.defaults import base_config
from rissole_jax.errors import ConfigError, IndexMismatch

HAS_SCANN = importlib.util.find_spec("scann") is not None
needs_scann = pytest.mark.skipif(not HAS_SCANN, reason="ScaNN is not installed here")


def scann(structure):
  return pytest.param("scann", structure, marks=needs_scann)


def clustered(n, dim=32, clusters=20, seed=0, noise=0.3):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim))
  x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim))
  return R.normalize(x.astype(np.float32))


def config(**retrieval):
  c = base_config()
  c.retrieval.update(**{"k": 5, **retrieval})
  return c


def latents(n, seed=0):
  """(n, 4, 4, 2) latents: clustered, so neighbours mean something."""
  return clustered(n, 32, seed=seed).reshape(n, 4, 4, 2)


# ---------------------------------------------------------------------------
# Embeddings and exact search.

def test_embed_full_and_first_block():
  z = np.random.default_rng(0).standard_normal((7, 8, 8, 4)).astype(np.float32)
  full = R.embed(z, config())
  assert full.shape == (7, 256) and full.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(full, R.normalize(z.reshape(7, -1)), rtol=1e-6)
  c = config(embedding="first_block")
  c.blocks.grid = (2, 4)
  first = R.embed(z, c)
  assert first.shape == (7, 4 * 2 * 4) == (7, R.embedding_dim(z.shape[1:], c))
  np.testing.assert_allclose(first, R.normalize(blocks.split(z, (2, 4))[:, 0].reshape(7, -1)),
                             rtol=1e-6)
  c.blocks.grid = (3, 3)
  with pytest.raises(ConfigError, match="does not divide"):
    R.embed(z, c)
  with pytest.raises(ConfigError, match="embedding"):
    R.embed(z, config(embedding="pixels"))


def test_exact_search_matches_argsort():
  db, q = clustered(700, seed=1), clustered(9, seed=2)
  ids, scores = R.exact_search(db, q, 6, query_batch=4)  # several batches and a padded one
  ref = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :6]
  np.testing.assert_array_equal(ids, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ref, 1), rtol=1e-5)


# ---------------------------------------------------------------------------
# Self-exclusion, recall, structures.

@pytest.mark.parametrize("backend,structure", [("exact", "auto"), scann("brute"),
                                                scann("ah")])
def test_self_excluded_by_id_even_with_duplicates(backend, structure):
  emb = clustered(1200, seed=3)
  emb[100:104] = emb[7]    # item 7 has 4 exact twins
  emb[200:220] = emb[300]  # and a group of 21 identical items: more than k + 1
  index = R.Index.build(emb, config(backend=backend, structure=structure))
  ids, _ = index.search(emb, 5, exclude_ids=np.arange(len(emb)))
  assert ids.shape == (1200, 5) and ids.dtype == np.int32
  assert not (ids == np.arange(1200)[:, None]).any()
  assert set(ids[7][:4]) == {100, 101, 102, 103}  # twins stay neighbours
  group = set(range(200, 220)) | {300}
  for i in (300, 200, 219):
    assert set(ids[i]) <= group - {i} and len(set(ids[i])) == 5
  assert (ids >= 0).all() and (ids < 1200).all()


@needs_scann
@pytest.mark.parametrize("structure", ["ah", "tree"])
def test_scann_recall_against_exact(structure):
  emb, q = clustered(4000, seed=4), clustered(300, seed=5)
  # Isotropic clusters are hard for AH alone: a deeper reorder makes up for it.
  c = config(backend="scann", structure=structure, num_leaves=40, num_leaves_to_search=4,
             reorder=200)
  index = R.Index.build(emb, c)
  assert index.backend == "scann" and index.params["structure"] == structure
  ids, scores = index.search(q, 10)
  _, exact = R.exact_search(emb, q, 10)
  assert R.recall_at_k(emb, q, ids, exact) >= 0.9
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@needs_scann
def test_tree_rows_with_too_few_candidates_are_completed():
  # ~10 items per leaf, one leaf searched, 21 wanted: ScaNN pads with NaN.
  emb = clustered(2000, seed=4)
  index = R.Index.build(emb, config(backend="scann", structure="tree", num_leaves=200,
                                    num_leaves_to_search=1, k=20))
  _, raw = index._raw(emb[:50], 21)
  assert not np.isfinite(raw).all()
  ids, scores = index.search(emb[:50], 20, np.arange(50))
  assert np.isfinite(scores).all() and all(len(set(r)) == 20 for r in ids)
  assert not (ids == np.arange(50)[:, None]).any()


def test_recall_counts_ties_as_found():
  db = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
  q = np.eye(4, dtype=np.float32)[:1]
  _, exact = R.exact_search(db, q, 1)
  assert R.recall_at_k(db, q, np.array([[1]]), exact) == 1.0  # the twin of the top hit
  assert R.recall_at_k(db, q, np.array([[2]]), exact) == 0.0


def test_plan_follows_size_and_overrides():
  r = base_config().retrieval
  r.update(brute_max=100, ah_max=1000)
  assert R.plan(99, 10, r)["structure"] == "brute"
  assert R.plan(100, 10, r) == {"structure": "ah", "dims_per_block": 2, "anisotropic_threshold": 0.2,
                                "reorder": 100, "training_sample_size": 100}
  p = R.plan(10_000, 10, r)
  assert (p["structure"], p["num_leaves"], p["num_leaves_to_search"]) == ("tree", 100, 5)
  r.update(num_leaves=50, num_leaves_to_search=7, dims_per_block=4, anisotropic_threshold=0.1,
           reorder=33, training_sample_size=5000, structure="tree")
  assert R.plan(500, 10, r) == {"structure": "tree", "num_leaves": 50, "num_leaves_to_search": 7,
                                "dims_per_block": 4, "anisotropic_threshold": 0.1, "reorder": 33,
                                "training_sample_size": 5000}
  r.structure = "lsh"
  with pytest.raises(ConfigError, match="structure"):
    R.plan(10, 1, r)


def test_k_not_smaller_than_database_is_refused():
  emb = clustered(6)
  with pytest.raises(ConfigError, match="retrieval.k=6 must be smaller than the database size"):
    R.Index.build(emb, config(k=6, backend="exact"))
  index = R.Index.build(emb, config(k=5, backend="exact"))
  with pytest.raises(ConfigError, match="retrieval.k=6"):
    index.search(emb, 6, exclude_ids=np.arange(6))


# ---------------------------------------------------------------------------
# Persistence and refusal.

@pytest.mark.parametrize("backend,structure", [scann("tree"), ("exact", "auto")])
def test_save_load_round_trip(tmp_path, backend, structure):
  emb, q = clustered(2000, seed=6), clustered(50, seed=7)
  c = config(backend=backend, structure=structure, num_leaves=20, num_leaves_to_search=3)
  index = R.Index.build(emb, c, meta={"fingerprint": "ae1", "embedding": "full"})
  index.save(tmp_path)
  again = R.Index.load(tmp_path, {"fingerprint": "ae1", "n": 2000})
  assert (again.backend, again.params) == (index.backend, index.params)
  for a, b in zip(index.search(q, 5, np.arange(50)), again.search(q, 5, np.arange(50))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(IndexMismatch, match="different autoencoder"):
    R.Index.load(tmp_path, {"fingerprint": "ae2"})
  with pytest.raises(IndexMismatch, match="different config"):
    R.Index.load(tmp_path, {"embedding": "first_block"})


@needs_scann
def test_truncated_or_missing_index_files_are_refused(tmp_path):
  index = R.Index.build(clustered(2000), config(backend="scann", structure="ah"))
  index.save(tmp_path)
  biggest = max((tmp_path / "scann").iterdir(), key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])
  with pytest.raises(IndexMismatch, match="truncated"):
    R.Index.load(tmp_path)
  biggest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
  with pytest.raises(IndexMismatch, match="checksum"):
    R.Index.load(tmp_path)
  biggest.unlink()
  with pytest.raises(IndexMismatch, match="missing"):
    R.Index.load(tmp_path)
  (tmp_path / "index.json").unlink()
  with pytest.raises(IndexMismatch, match="index.json is missing"):
    R.Index.load(tmp_path)


def test_exact_fallback_when_scann_is_unavailable(monkeypatch, caplog, tmp_path):
  monkeypatch.setitem(sys.modules, "scann", None)  # `import scann` now fails
  with caplog.at_level(logging.WARNING, logger="rissole_jax.retrieval"):
    index = R.Index.build(clustered(300), config(backend="auto"))
  assert index.backend == "exact"
  warnings = [r for r in caplog.records if "exact search" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
  with pytest.raises(ConfigError, match="backend='scann' but ScaNN cannot be imported"):
    R.Index.build(clustered(300), config(backend="scann"))
  if not HAS_SCANN:
    return
  # A ScaNN index saved elsewhere: a clear error, not a crash.
  monkeypatch.delitem(sys.modules, "scann")
  R.Index.build(clustered(300), config(backend="scann")).save(tmp_path)
  monkeypatch.setitem(sys.modules, "scann", None)
  with pytest.raises(ConfigError, match="ScaNN cannot be imported"):
    R.Index.load(tmp_path)


# ---------------------------------------------------------------------------
# The database on disk.

def write_database(tmp_path, c, fingerprint="ae1", n=600, m=40):
  train, held = latents(n), latents(m, seed=9)
  labels = np.arange(n, dtype=np.int32) % 10
  R.save_latents(tmp_path / "encode", fingerprint, "toy",
                 {"train": (train, labels, "toy:train"),
                  "heldout": (held, np.zeros(m, np.int32), "toy:heldout")})
  metrics = R.index_database(tmp_path / "index", c, tmp_path / "encode")
  return train, held, metrics


def test_database_round_trip_and_refusals(tmp_path):
  c = config(backend="auto", embedding="first_block")
  c.blocks.grid = (2, 2)
  train, held, metrics = write_database(tmp_path, c)
  assert metrics["recall_at_k"] == 1.0 and metrics["n_database"] == 600  # brute force
  db = R.load_database(c, tmp_path, fingerprint="ae1")
  np.testing.assert_array_equal(db.latents, train)
  assert db.neighbours.shape == (600, 5) and db.neighbours.dtype == np.int32
  assert db.heldout_neighbours.shape == (40, 5)
  assert not (db.neighbours == np.arange(600)[:, None]).any()
  exact, _ = R.exact_search(R.embed(train, c), R.embed(held, c), 5)
  np.testing.assert_array_equal(db.heldout_neighbours, exact)
  ids, _ = db.load_index(c).search(R.embed(held, c), 5)
  np.testing.assert_array_equal(ids, db.heldout_neighbours)

  with pytest.raises(IndexMismatch, match="another autoencoder"):
    R.load_database(c, tmp_path, fingerprint="ae2")
  with pytest.raises(IndexMismatch, match=r"different config:\n  embedding"):
    R.load_database(config(), tmp_path)  # full embedding asked, first_block built
  c.retrieval.k = 4
  with pytest.raises(IndexMismatch, match="k: 5"):
    R.load_database(c, tmp_path)
  c.retrieval.k = 5
  # The encode stage redone with another autoencoder: the index is stale.
  R.save_latents(tmp_path / "encode", "ae2", "toy", {"train": (train, np.zeros(600, np.int32), "t")})
  with pytest.raises(IndexMismatch, match="different autoencoder"):
    R.load_database(c, tmp_path)
  R.save_latents(tmp_path / "encode", "ae1", "toy", {"train": (train, np.zeros(600, np.int32), "t")})
  R.load_database(c, tmp_path)
  (tmp_path / "index" / "neighbours_train.npy").unlink()
  with pytest.raises(IndexMismatch, match="neighbours_train.npy is missing.*Fix: delete"):
    R.load_database(c, tmp_path)
  (tmp_path / "encode" / "train-00000.npy").write_bytes(b"\x93NUMPY")
  with pytest.raises(IndexMismatch, match="train-00000.npy is truncated"):
    R.load_database(c, tmp_path)


class FakeAutoencoder:
  """Average-pools 32x32x1 images to 8x8 and makes 4 channels of it."""
  latent_shape, f, fingerprint = (8, 8, 4), 4, "fake-ae"

  def __init__(self):
    self.batch_sizes = set()

  def encode(self, images, batch_size=256):
    self.batch_sizes.add(batch_size)
    x = images.reshape(len(images), 8, 4, 8, 4).mean((2, 4))
    return np.stack([x, x * x, np.abs(x) - 0.5, np.round(x)], -1).astype(np.float32)


def test_build_database_swap(tmp_path):
  from rissole_jax.data import ArraySource
  rng = np.random.default_rng(0)
  source = ArraySource("toy:train", rng.integers(0, 255, (300, 32, 32, 1)), np.arange(300) % 3)
  c = config()
  c.encode.batch_size = 32
  ae, said = FakeAutoencoder(), []
  db = R.build_database(ae, source, c, tmp_path, say=lambda *a: said.append(a[0] % a[1:]))
  assert ae.batch_sizes == {32}  # encode.batch_size acts
  assert db.latents.shape == (300, 8, 8, 4) and len(db.heldout_latents) == 0
  assert db.neighbours.shape == (300, 5) and not (db.neighbours == np.arange(300)[:, None]).any()
  np.testing.assert_array_equal(db.labels, np.arange(300) % 3)
  again = R.build_database(ae, source, c, tmp_path, say=lambda *a: said.append(a[0] % a[1:]))
  assert "reusing" in said[-1]
  np.testing.assert_array_equal(again.neighbours, db.neighbours)


def test_encode_and_index_stages(smoke_config, tmp_path, monkeypatch):
  from rissole_jax import main
  from rissole_jax.stages import encode
  monkeypatch.setattr(encode, "load_autoencoder", lambda config, d: FakeAutoencoder())
  c = smoke_config
  results = main.run(c, tmp_path, only=("encode", "index"), progress=False)
  enc, idx = tmp_path / "encode", tmp_path / "index"
  meta = json.loads((enc / "meta.json").read_text())
  assert meta["fingerprint"] == "fake-ae" and meta["dataset"] == "mnist_embedded"
  _, splits = R.read_latents(enc)   # the fake has no codebook: float32 shards
  train, held = splits["train"][0], splits["heldout"][0]
  assert train.dtype == held.dtype == np.float32 and meta["codes"] is False
  assert train.shape[1:] == held.shape[1:] == (8, 8, 4) and len(train) > len(held) > 0
  assert splits["train"][1].dtype == np.int32
  nb_train, nb_held = np.load(idx / "neighbours_train.npy"), np.load(idx / "neighbours_heldout.npy")
  k = c.retrieval.k
  assert nb_train.shape == (len(train), k) and nb_held.shape == (len(held), k)
  assert nb_train.dtype == nb_held.dtype == np.int32
  assert not (nb_train == np.arange(len(train))[:, None]).any()
  m = json.loads((idx / "metrics.json").read_text())
  for key in ("recall_at_k", "build_seconds", "queries_per_second", "exact_queries_per_second"):
    assert key in m and key in results["index"]
  assert m["recall_at_k"] >= 0.99  # a small database: brute force
  assert m["train_label_agreement"] > 0.5  # pooled MNIST digits find their own class
  db = R.load_database(c, tmp_path, fingerprint="fake-ae")
  assert db.dataset == "mnist_embedded" and db.k == k
