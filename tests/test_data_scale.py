"""The database at scale: code-index shards, the gather of codes on the
device, reduced embeddings, refusals. (Two processes against one, and bytes
per device on an 8-device mesh: tests/test_parallel.py.)"""
import json
import os

import jax
import numpy as np
import pytest

from rissole_jax.store import codes as codes_lib
from rissole_jax import retrieval as R
from rissole_jax.store import shards
from rissole_jax.defaults import base_config
from rissole_jax.errors import IndexMismatch
from rissole_jax.train import diffusion as dif
from rissole_jax import files

SHAPE = (4, 4, 2)
ROOT = os.path.join(os.path.dirname(__file__), "..")


def codebook_database(n, seed=0, size=16):
  """(codebook (size, 2), codes (n, 4, 4) uint8, float latents): clustered
  rows, so that neighbours mean something."""
  rng = np.random.default_rng(seed)
  cb = rng.standard_normal((size, SHAPE[-1])).astype(np.float32)
  templates = rng.integers(0, size, (8, *SHAPE[:2]))
  codes = templates[rng.integers(0, 8, n)]
  flip = rng.random(codes.shape) < 0.2
  codes = np.where(flip, rng.integers(0, size, codes.shape), codes).astype(np.uint8)
  return cb, codes, cb[codes]


def config(**retrieval):
  c = base_config()
  c.retrieval.update(**{"k": 5, "backend": "exact", **retrieval})
  return c


def write(root, c, n=300, m=20, shard_rows=64, fingerprint="ae1", seed=0):
  cb, codes, lat = codebook_database(n + m, seed)
  labels = np.arange(n + m, dtype=np.int32) % 8
  R.save_latents(root / "encode", fingerprint, "toy",
                 {"train": (lat[:n], labels[:n], "toy:train"),
                  "heldout": (lat[n:], labels[n:], "toy:heldout")},
                 codebook=cb, shard_rows=shard_rows)
  return cb, codes, lat


def test_code_shards_decode_to_the_latents_exactly(tmp_path):
  c = config()
  cb, codes, lat = write(tmp_path, c)
  meta = json.loads((tmp_path / "encode" / "meta.json").read_text())
  assert meta["codes"] and meta["dtype"] == "uint8" and meta["shards"] == {"train": 5, "heldout": 1}
  shard = np.load(tmp_path / "encode" / "train-00001.npy")
  np.testing.assert_array_equal(shard, codes[64:128])   # rows [64, 128): shard 1
  m, splits = R.read_latents(tmp_path / "encode")
  np.testing.assert_array_equal(splits["train"][0], lat[:300])   # bit for bit
  R.index_database(tmp_path / "index", c, tmp_path / "encode")
  db = R.load_database(c, tmp_path, fingerprint="ae1")
  np.testing.assert_array_equal(db.codes, codes[:300])
  np.testing.assert_array_equal(db.latents, lat[:300])
  view = R.load_database(c, tmp_path, mmap=True).rows   # the shards, read on use
  assert isinstance(view, shards.RowView) and view.shape == (300, 4, 4)
  np.testing.assert_array_equal(view[50:200], codes[50:200])   # across shards 0..3
  ids = np.array([[299, 0], [64, 63]])
  np.testing.assert_array_equal(view[ids], codes[ids])
  np.testing.assert_array_equal(np.asarray(view), codes[:300])
  assert db.rows.nbytes * 4 * SHAPE[-1] == db.latents.nbytes   # 1 byte vs 4 * c
  assert not (db.neighbours == np.arange(300)[:, None]).any()   # never itself, in any shard
  # The sharded search equals one exact search over the whole table.
  full = R.embed(lat[:300], c)
  ids, _ = R.exact_search(full, full, 6)
  want = np.stack([row[row != i][:5] for i, row in enumerate(ids)])
  np.testing.assert_array_equal(db.neighbours, want)


def test_three_way_search_split_inside_shards_equals_one(tmp_path):
  """3 processes search even shares of the rows (grid of 16: train rows
  0..96..192..300, held out 0..0..16..20), boundaries inside the 64-row
  shards: the tables are one process's bytes; parts that leave rows out or
  cover rows twice are refused with the fix."""
  c = config(reduce="pca", reduce_dim=8, query_batch=16)
  write(tmp_path, c)
  enc, one, three = tmp_path / "encode", tmp_path / "one", tmp_path / "three"
  R.index_database(one, c, enc)
  R.build_index(three, c, enc)
  got = [R.search_share(three, c, enc, p, 3)["queries_searched"] for p in range(3)]
  assert got == [96, 96 + 16, 108 + 4]
  assert sorted(p.name for p in (three / "parts").iterdir()) == [
      "heldout-0000000000.npy", "heldout-0000000016.npy", "train-0000000000.npy",
      "train-0000000096.npy", "train-0000000192.npy"]
  parts = {p.name: p.read_bytes() for p in (three / "parts").iterdir()}
  R.assemble_tables(three, c, enc)
  for name in ("neighbours_train.npy", "neighbours_heldout.npy"):
    assert (three / name).read_bytes() == (one / name).read_bytes(), name
  # Parts of a 2-process search mixed in (rows 0..144 over 96..192): refused.
  (three / "parts").mkdir()
  for name, data in parts.items():
    (three / "parts" / name).write_bytes(data)
  R.search_share(three, c, enc, 0, 2)
  with pytest.raises(IndexMismatch, match=r"rows 96..192 of the train.*mixed.*--only index"):
    R.assemble_tables(three, c, enc)
  (three / "parts" / "train-0000000096.npy").unlink()
  (three / "parts" / "train-0000000192.npy").unlink()
  with pytest.raises(IndexMismatch, match=r"no part for rows 144..300 of the train.*--only index"):
    R.assemble_tables(three, c, enc)


def test_device_gather_of_codes_equals_the_float_gather():
  cb, codes, lat = codebook_database(50)
  stats = dif.database_stats(codes, cb)
  ref = dif.latent_stats(lat)
  np.testing.assert_allclose(stats["mean"], ref["mean"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["std"], ref["std"], rtol=1e-5)
  table = np.stack([(np.arange(50) + d) % 50 for d in (1, 2, 3)], 1).astype(np.int32)
  ids = np.array([3, 7, 49, 0, 3], np.int32)
  gather = jax.jit(dif.device_gather_step(lambda state, key, z0, nb: (z0, nb)))
  z0, nb = gather(None, None, codes, table, ids, dif.normalise(cb, stats))
  f0, fnb = gather(None, None, dif.normalise(lat, stats).astype(np.float32), table, ids)
  np.testing.assert_array_equal(np.asarray(z0), np.asarray(f0))
  np.testing.assert_array_equal(np.asarray(nb), np.asarray(fnb))
  host = jax.jit(dif.host_gather_step(lambda state, key, z0, nb: (z0, nb)))
  h0, hnb = host(None, None, codes[ids], codes[table[ids]], dif.normalise(cb, stats))
  np.testing.assert_array_equal(np.asarray(h0), np.asarray(f0))
  np.testing.assert_array_equal(np.asarray(hnb), np.asarray(fnb))


def test_incomplete_mixed_and_foreign_shards_are_refused(tmp_path):
  enc = tmp_path / "encode"
  cb, codes, lat = write(tmp_path, config())
  info = {"train": (300, 64, "toy:train")}
  (enc / "train-00003.json").unlink()   # a process never wrote its shard
  with pytest.raises(IndexMismatch, match=r"train-00003.json is missing.*--only encode"):
    shards.finish(enc, "ae1", "toy", cb, info, SHAPE)
  # Shard 3 rewritten by another autoencoder: mixed runs.
  shards.write_shard(enc, "train", 3, 192, codes[192:256], np.zeros(64, np.int32), "ae2")
  with pytest.raises(IndexMismatch, match=r"another autoencoder.*mixed.*--only encode"):
    shards.finish(enc, "ae1", "toy", cb, info, SHAPE)
  # Latents of another codebook cannot be stored as codes of this one.
  from rissole_jax.errors import DataError
  with pytest.raises(DataError, match="another VQ-GAN.*--only encode"):
    R.save_latents(tmp_path / "other", "ae1", "toy", {"train": (lat + 0.5, np.zeros(320), "t")},
                   codebook=cb)
  # A database of another codebook is refused by the sampler's database.
  shards.write_shard(enc, "train", 3, 192, codes[192:256], np.zeros(64, np.int32), "ae1")
  shards.finish(enc, "ae1", "toy", cb, {"train": (300, 64, "t"), "heldout": (20, 64, "h")}, SHAPE)
  c = config()
  R.index_database(tmp_path / "index", c, enc)
  db = R.load_database(c, tmp_path)
  from rissole_jax.inference.database import SamplingDatabase
  assert SamplingDatabase.from_retrieval(db, cb).codes is not None
  with pytest.raises(DataError, match="another codebook.*--only encode,index"):
    SamplingDatabase.from_retrieval(db, cb + 1.0)


def test_legacy_float_workdir_is_still_read(tmp_path):
  """An encode folder from before the shards: {split}.npy float latents."""
  from rissole_jax.stages import workdir as wd
  _, _, lat = codebook_database(120)
  enc = tmp_path / "encode"
  enc.mkdir()
  files.atomic_save_npy(enc / "train.npy", lat[:100])
  files.atomic_save_npy(enc / "train_labels.npy", np.zeros(100, np.int32))
  files.atomic_save_npy(enc / "heldout.npy", lat[100:])
  files.atomic_save_npy(enc / "heldout_labels.npy", np.zeros(20, np.int32))
  R.write_manifest(enc / "meta.json", ["train.npy", "train_labels.npy", "heldout.npy",
                                       "heldout_labels.npy"],
                   {"fingerprint": "old", "dataset": "toy", "latent_shape": list(SHAPE),
                    "shapes": {"train": [100, *SHAPE], "heldout": [20, *SHAPE]},
                    "sources": {"train": "t", "heldout": "h"}})
  c = config()
  R.index_database(tmp_path / "index", c, enc)
  db = R.load_database(c, tmp_path)
  assert db.codebook is None and db.codes is None
  np.testing.assert_array_equal(db.latents, lat[:100])
  np.testing.assert_array_equal(db.heldout_latents, lat[100:])


def test_reduced_embeddings(tmp_path):
  """pca and pool act (dimension, saved projection used for queries), and
  auto picks pca only once the full embeddings pass reduce_above_mb."""
  cb, codes, lat = codebook_database(400, size=64)
  c = config(reduce="pca", reduce_dim=8)
  red = R.fit_reduction(codes, cb, SHAPE, c)
  assert red.kind == "pca" and red.matrix.shape == (32, 8)
  emb = R.embed_rows(codes, cb, c, red)
  assert emb.shape == (400, 8)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(emb, R.embed(lat, c, red), rtol=1e-6)
  pool = R.fit_reduction(codes, cb, SHAPE, config(reduce="pool", reduce_dim=8))
  assert pool.pool == 2 and R.embed(lat, c, pool).shape == (400, 8)   # 2x2 cells x 2 channels
  auto = config(reduce_dim=8)
  assert R.reduction_kind(400, SHAPE, auto) == "none"
  assert R.reduction_kind(20_000, SHAPE, auto) == "pca"   # past brute force: reduced
  auto.retrieval.reduce_above_mb = 0
  assert R.reduction_kind(400, SHAPE, auto) == "pca"
  # Through the index: the projection is saved, and queries go through it.
  write(tmp_path, c, n=300, m=20, seed=1)
  m = R.index_database(tmp_path / "index", c, tmp_path / "encode")
  assert m["dim"] == 8 and 0 < m["recall_at_k_full_space"] <= 1
  db = R.load_database(c, tmp_path)
  index = db.load_index(c)
  assert index.reduction.matrix.shape == (32, 8)
  ids, _ = index.search(index.embed(db.heldout_latents, c), 5)
  np.testing.assert_array_equal(ids, db.heldout_neighbours)
  with pytest.raises(IndexMismatch, match="reduce"):
    R.load_database(config(), tmp_path)   # built reduced, asked for the full space


def test_gs_data_dir_reads_the_gcsfuse_mount(tmp_path, monkeypatch):
  """data.data_dir=gs://BUCKET/PATH: every worker reads ~/gcs/BUCKET/PATH, the
  mount launch/tpu_pod.sh makes; unmounted, the URL goes to tfds as it is."""
  from rissole_jax.data import sources
  monkeypatch.setenv("HOME", str(tmp_path))
  assert sources.resolve_data_dir("gs://bucket/tfds") == "gs://bucket/tfds"
  (tmp_path / "gcs" / "bucket" / "tfds").mkdir(parents=True)
  assert sources.resolve_data_dir("gs://bucket/tfds") == str(tmp_path / "gcs/bucket/tfds")
  assert sources.resolve_data_dir("/data/tfds") == "/data/tfds"
  assert str(sources._cache_dir("gs://other/x")).startswith(str(tmp_path / ".cache"))


def test_data_scale_benchmark_runs_tiny(tmp_path):
  """The scale benchmark end to end at a tiny size, 2 processes (seconds)."""
  import subprocess
  import sys
  out = tmp_path / "rows.json"
  subprocess.run([sys.executable, "-m", "rissole_jax.benchmarks.data_scale", "--items=600",
                  "--processes=2", "--latent=4,4,2", "--codebook=16", "--heldout=40",
                  "--shard_rows=256", "--k=3", "--reduce_dim=8", "--batch=8", "--nopin",
                  "--query_batch=64",
                  f"--out={out}"], check=True, timeout=300, capture_output=True,
                 env={**os.environ, "PYTHONPATH": ROOT})
  row = json.loads(out.read_text())["rows"][0]
  assert row["processes"] == 2 and len(row["workers"]) == 2
  # An even split of the rows (on a grid of 64): 320 + 280 train, 0 + 40 held out.
  assert [w["search"]["queries_searched"] for w in row["workers"]] == [320, 320]
  for w in row["workers"]:
    assert w["encode_peak_bytes"] > 0
    assert set(w["gather"]) == {"device", "sharded", "host"}
  assert row["workers"][0]["assemble"]["recall_at_k"] == 1.0
