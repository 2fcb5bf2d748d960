"""The data half at scale: the encode and index stages and the train step's
gather on synthetic code indices of the ImageNet100 shape (28x28x32 latents,
512 codes: uint16), with 1 and 2 processes (jax.distributed on localhost).

  python -m rissole_jax.benchmarks.data_scale --items 20000,160000,1280000 \\
      --processes 1,2 --out docs/data_scale.json
  python -m rissole_jax.benchmarks.data_scale --real_encode /work/runs/final/encode

Per (items, processes) row, for each process: wall time and peak resident
memory (VmHWM, reset between phases) of encode, index (process 0: fit the
reduced embedding, build, save; all: load, search its share of the rows), and the
gather (one train step's batch, each diffusion.train.gather placement);
bytes of the database per host and per device; recall@k of the reduced
embedding against exact search in the full space (the index stage's
metric). Neighbour tables of 1 and 2 processes are compared byte for byte.

The encoder is synthetic: images carry their row id, and the "encoder"
returns that row's code indices (1,000 templates, a quarter of each
template's positions replaced by hashed codes), as a VQ-GAN's quantizer does;
so encode times the stage's own work (shards, manifests), not a network.

--real_encode: recall@k of each reduced embedding against exact search in
the full space on real latents (an encode folder; held-out queries).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from rissole_jax import files
from rissole_jax.runtime import host

def define_flags() -> None:
  """This CLI's flags, defined when it runs (not on import: other benchmark
  modules define flags of the same names, and any set of modules may be
  imported together)."""
  flags.DEFINE_list("items", ["20000"], "Database sizes (train items).")
  flags.DEFINE_list("processes", ["1", "2"], "Process counts to run each size with, in this "
                    "order (repeats allowed, e.g. 1,2,1,2, to interleave on a shared machine).")
  flags.DEFINE_string("latent", "28,28,32", "Latent shape h,w,c.")
  flags.DEFINE_integer("codebook", 512, "Codebook size.")
  flags.DEFINE_integer("k", 10, "Neighbours per item.")
  flags.DEFINE_integer("heldout", 1000, "Held-out queries.")
  flags.DEFINE_integer("shard_rows", 16384, "encode.shard_rows.")
  flags.DEFINE_integer("reduce_dim", 256, "retrieval.reduce_dim.")
  flags.DEFINE_integer("query_batch", 1024, "retrieval.query_batch (also the grid of the "
                       "processes' shares of the queries).")
  flags.DEFINE_integer("batch", 128, "Train batch for the gather.")
  flags.DEFINE_bool("pin", True, "Pin process p to CPU core p (one core per process, as one "
                    "host per process on a pod).")
  flags.DEFINE_string("root", None, "Scratch folder (default: a temporary one, removed).")
  flags.DEFINE_string("out", None, "JSON file for the rows.")
  flags.DEFINE_integer("search_rows", 0, "Search only this many rows of each process's share of "
                       "each split (0: all); the time of the whole share is extrapolated from them.")
  flags.DEFINE_string("index_from", None, "An index folder of an earlier run of the same size "
                      "(ROOT/n{items}_p{count}/index, kept with --root): copied instead of built.")
  flags.DEFINE_bool("reuse_build", False, "For the second and later process counts of a size, "
                    "copy the first count's index instead of building it again (the build is "
                    "process 0's alone: the same work for any count).")
  flags.DEFINE_integer("recall_max_items", 200_000, "Assemble the tables and measure recall "
                       "against exact search in the full space up to this size.")
  flags.DEFINE_string("real_encode", None, "An encode folder: recall of reduced embeddings.")
  flags.DEFINE_integer("worker", -1, "Internal: run as this process of a run.")
  flags.DEFINE_integer("n", 0, "Internal: the run's size.")
  flags.DEFINE_string("reuse_from", None, "Internal: the index folder to copy instead of building.")
FLAGS = flags.FLAGS

_CLUSTERS = 1000


class SyntheticSource:
  """n rows whose "images" are their global row ids (3 bytes)."""

  def __init__(self, name: str, n: int, offset: int = 0):
    self.name, self._n, self._offset = name, n, offset

  def __len__(self):
    return self._n

  def get(self, ids):
    g = np.asarray(ids, np.int64) + self._offset
    images = np.stack([(g >> s) & 255 for s in (16, 8, 0)], 1).astype(np.uint8)
    return images, (g % _CLUSTERS).astype(np.int32)


class SyntheticAutoencoder:
  """Row id -> code indices of a template with hashed codes in a quarter of
  its positions; a codebook of unit-scale vectors."""

  def __init__(self, latent_shape, codebook_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.latent_shape, self.f = tuple(latent_shape), 8
    h, w, c = self.latent_shape
    cb = rng.standard_normal((codebook_size, c)).astype(np.float32)
    self.params = {"quantizer": {"codebook": cb}}
    self.templates = rng.integers(0, codebook_size, (_CLUSTERS, h, w))
    self.size = codebook_size
    self.fingerprint = f"synthetic-{h}x{w}x{c}-{codebook_size}-{seed}"

  def encode_codes(self, images, batch_size=256):
    from rissole_jax.store.codes import code_dtype
    b = np.rint((np.asarray(images) + 1.0) * 127.5).astype(np.int64)
    ids = (b[:, 0] << 16) | (b[:, 1] << 8) | b[:, 2]
    h, w, _ = self.latent_shape
    pos = np.arange(h * w, dtype=np.uint64)
    x = ids.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15) + pos * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    flip = (x & np.uint64(3)) == 0
    hashed = (x >> np.uint64(8)) % np.uint64(self.size)
    codes = np.where(flip, hashed, self.templates[ids % _CLUSTERS].reshape(len(ids), -1))
    return codes.reshape(len(ids), h, w).astype(code_dtype(self.size))


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM, the peak resident set
  except OSError:
    pass


def _peak_bytes() -> int:
  try:
    for line in open("/proc/self/status"):
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def worker(pidx: int, n: int, root: Path) -> dict:
  """One process of a run: encode, index, gather; returns its measurements."""
  from rissole_jax.runtime import parallel
  parallel.initialize_distributed()
  import logging

  import jax

  from rissole_jax import retrieval

  from rissole_jax.store import shards
  from rissole_jax.stages.context import Context
  from rissole_jax.defaults import base_config
  from rissole_jax.stages import encode as encode_stage
  from rissole_jax.train import diffusion as dif
  p, count = parallel.process_info()
  shape = tuple(int(s) for s in FLAGS.latent.split(","))
  c = base_config()
  c.data.name = "synthetic"
  c.encode.update(shard_rows=FLAGS.shard_rows, batch_size=256)
  c.retrieval.update(k=FLAGS.k, reduce_dim=FLAGS.reduce_dim, query_batch=FLAGS.query_batch)
  ae = SyntheticAutoencoder(shape, FLAGS.codebook)
  sources = {"train": SyntheticSource("synthetic:train", n),
             "heldout": SyntheticSource("synthetic:heldout", FLAGS.heldout, offset=n)}
  encode_stage.load_autoencoder = lambda config, d: ae
  encode_stage.load_source = lambda data, split: sources[split]
  log = logging.getLogger("data_scale")
  row = {"process": p, "processes": count}

  def phase(name, fn):
    parallel.sync(f"before-{name}")
    _reset_peak()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn()
    parallel.sync(f"after-{name}")  # as the stage runner: process 0 writes last
    row[f"{name}_s"] = time.perf_counter() - t0
    row[f"{name}_cpu_s"] = _cpu_seconds() - c0
    row[f"{name}_peak_bytes"] = _peak_bytes()
    return out

  ctx = lambda stage: Context(config=c, root=root, stage=stage, logger=log, process_index=p,
                              process_count=count, progress_bars=False)
  (root / "encode").mkdir(parents=True, exist_ok=True)
  (root / "index").mkdir(parents=True, exist_ok=True)
  row["baseline_bytes"] = _peak_bytes()
  row["encode"] = phase("encode", lambda: encode_stage.run(ctx("encode")))
  enc, idx_dir = root / "encode", root / "index"
  if FLAGS.reuse_from:
    row["build_reused_from"] = FLAGS.reuse_from
  row["build"] = phase("build", lambda: (_copy_index(Path(FLAGS.reuse_from), idx_dir)
                                         if FLAGS.reuse_from else
                                         retrieval.build_index(idx_dir, c, enc)) if p == 0 else {})
  idx = json.loads((idx_dir / "index.json").read_text())
  row["index_bytes"] = sum(f["bytes"] for f in idx["files"].values())
  row["index_structure"] = idx["params"]
  limit = FLAGS.search_rows or None
  row["search"] = phase("search", lambda: retrieval.search_share(idx_dir, c, enc, p, count,
                                                                 limit=limit))
  qb = c.retrieval.query_batch
  share = sum(b - a for a, b in (shards.share(m, p, count, qb) for m in (n, FLAGS.heldout)))
  searched = row["search"]["queries_searched"]
  row["search"]["queries_of_this_process"] = share
  # The whole share, from the rows searched (all of them unless --search_rows);
  # loading the index is paid once, not per row.
  load_s = row["search_s"] - row["search"]["neighbours_seconds"]
  row["search_s_share"] = load_s + row["search"]["neighbours_seconds"] * share / max(searched, 1)
  if p == 0 and not limit:
    row["assemble"] = phase0 = {}
    t0 = time.perf_counter()
    if n <= FLAGS.recall_max_items:
      phase0.update(retrieval.assemble_tables(idx_dir, c, enc))
    phase0["seconds"] = time.perf_counter() - t0
  parallel.sync("assembled")
  if not (idx_dir / "neighbours.json").exists():  # not assembled: the gather needs a table
    assemble_tables_only(idx_dir, c, enc, p)

  # One train step's gather (the step itself left out): batch ids -> latents
  # of the batch and of its k neighbours, for each placement.
  db = retrieval.load_database(c, root, mmap=True)
  mesh = parallel.make_mesh(c.mesh)
  stats = dif.database_stats(db.rows, db.codebook)
  cbn = dif.normalise(db.codebook, stats).astype(np.float32)
  rules = c.mesh.logical_axis_rules
  sink = lambda state, key, z0, nb: (z0.sum() + nb.sum(), None)
  rng = np.random.default_rng(0)
  row["gather"] = {}
  for gather in dif.GATHERS:
    _reset_peak()
    (rows, cb, table), placed = dif.place_database(db.rows, cbn, db.neighbours, gather, mesh)
    batches = [rng.integers(0, n, FLAGS.batch).astype(np.int32) for _ in range(12)]
    if gather == "host":
      fn = jax.jit(dif.host_gather_step(sink))
      call = lambda ids: fn(None, None, *parallel.put_batch((rows[ids], rows[table[ids]]), mesh, rules), cb)
    else:
      take = dif.take if gather == "device" else parallel.take_sharded(mesh)
      fn = jax.jit(dif.device_gather_step(sink, take))
      call = lambda ids: fn(None, None, rows, table, parallel.put_batch(ids, mesh, rules), cb)
    jax.block_until_ready(call(batches[0]))  # compile
    times = []
    for ids in batches[1:]:
      t0 = time.perf_counter()
      jax.block_until_ready(call(ids))
      times.append(time.perf_counter() - t0)
    row["gather"][gather] = {"step_s_median": float(np.median(times)),
                             "peak_bytes": _peak_bytes(), **placed}
    del rows, table, cb
  parallel.sync("done")
  return row


def assemble_tables_only(idx_dir, c, enc, p):
  """With --search_rows the tables have holes: fill the rows not searched
  with random neighbours (the gather only needs ids), then write them."""
  from rissole_jax import retrieval
  from rissole_jax.runtime import parallel
  from rissole_jax.store import shards
  if p == 0:
    meta = shards.read_meta(enc)
    n, rng, tables = meta["rows"]["train"], np.random.default_rng(0), {}
    for split in ("train", "heldout"):
      rows = meta["rows"].get(split, 0)
      parts = sorted((int(q.stem.rsplit("-", 1)[1]), len(np.load(q, mmap_mode="r")))
                     for q in (idx_dir / "parts").glob(f"{split}-*.npy"))
      pos = 0
      for start, length in parts + [(rows, 0)]:
        if start > pos:  # a hole: rows pos..start
          t = (np.arange(pos, start)[:, None] + rng.integers(1, n, (start - pos, FLAGS.k))) % n
          np.save(idx_dir / "parts" / f"{split}-{pos:010d}.npy", t.astype(np.int32))
        pos = start + length
      tables[split] = retrieval.table_from_parts(idx_dir, split, rows, FLAGS.k)
      files.atomic_save_npy(idx_dir / f"neighbours_{split}.npy", tables[split])
    info = {"fingerprint": meta["fingerprint"], "embedding": "full", "grid": None,
            "latent_shape": meta["latent_shape"], "k": FLAGS.k, "n_train": n,
            "n_heldout": len(tables["heldout"]),
            "reduce": retrieval.reduction_kind(n, meta["latent_shape"], c)}
    files.write_manifest(idx_dir / "neighbours.json",
                             ["neighbours_train.npy", "neighbours_heldout.npy"], info)
  parallel.sync("tables")


def _copy_index(src: Path, dst: Path) -> dict:
  """--reuse_build: the index files of an earlier run of the same size."""
  import shutil
  for name in ("scann", "embeddings.npy", "projection.npy"):
    if (src / name).is_dir():
      shutil.copytree(src / name, dst / name)
    elif (src / name).exists():
      shutil.copy(src / name, dst / name)
  shutil.copy(src / "index.json", dst / "index.json")
  (dst / "parts").mkdir(exist_ok=True)
  return {"reused": str(src)}


def run_size(n: int, count: int, root: Path, reuse_from: Path | None = None) -> dict:
  """Starts `count` worker processes for a database of n items; their rows."""
  port = socket.socket()
  port.bind(("localhost", 0))
  addr = f"localhost:{port.getsockname()[1]}"
  port.close()
  procs = []
  for p in range(count):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if count > 1:
      env.update(RISSOLE_COORDINATOR=addr, RISSOLE_NUM_PROCESSES=str(count),
                 RISSOLE_PROCESS_ID=str(p))
    args = [sys.executable, "-m", "rissole_jax.benchmarks.data_scale", f"--worker={p}",
            f"--n={n}", f"--root={root}", *[a for a in sys.argv[1:] if not a.startswith(
                ("--root", "--out", "--items", "--processes", "--index_from"))]]
    if reuse_from is not None:
      args.append(f"--reuse_from={reuse_from}")
    # Pinned before it starts: every thread of the worker (NumPy's BLAS pool,
    # ScaNN's, XLA's) inherits the core, not just its main thread.
    pin = ((lambda core=p % os.cpu_count(): os.sched_setaffinity(0, {core}))
           if FLAGS.pin and hasattr(os, "sched_setaffinity") else None)
    procs.append(subprocess.Popen(args, env=env, preexec_fn=pin))
  codes = [pr.wait() for pr in procs]
  if any(codes):
    raise RuntimeError(f"a worker failed (exit codes {codes}); see its output above")
  return [json.loads((root / f"worker{p}.json").read_text()) for p in range(count)]


def real_recall(encode_dir: str) -> dict:
  """recall@k of each reduced embedding vs exact search in the full space."""
  from rissole_jax import retrieval as R
  from rissole_jax.defaults import base_config
  meta, splits = R.read_latents(Path(encode_dir))
  train, held = splits["train"][0], splits["heldout"][0]
  c = base_config()
  c.retrieval.k = FLAGS.k
  d = int(np.prod(train.shape[1:]))
  out = {"items": len(train), "queries": len(held), "latent_shape": list(train.shape[1:]),
         "k": FLAGS.k, "rows": []}
  choices = [("pca", r) for r in (8, 16, 32, 64, 128) if r < d] + [("pool", r) for r in (16, 64)]
  for kind, r in choices:
    c.retrieval.update(reduce=kind, reduce_dim=r)
    red = R.fit_reduction(train, None, train.shape[1:], c)
    emb, q = R.embed(train, c, red), R.embed(held, c, red)
    ids, _ = R.exact_search(emb, q, FLAGS.k)
    rec = R.recall_in_full_space(Path(encode_dir), meta, None, c, held, ids, FLAGS.k)
    dim = emb.shape[1]
    out["rows"].append({"reduce": kind, "reduce_dim": r, "dim": dim, "recall_at_k": rec})
    print(f"{kind:5s} reduce_dim={r:4d} -> {dim:4d} dims: recall@{FLAGS.k} {rec:.4f} "
          f"(full space: {d} dims)", flush=True)
  return out


def main(argv):
  del argv
  if FLAGS.worker >= 0:
    root = Path(FLAGS.root)
    row = worker(FLAGS.worker, FLAGS.n, root)
    (root / f"worker{FLAGS.worker}.json").write_text(json.dumps(row, default=float))
    return
  if FLAGS.real_encode:
    result = real_recall(FLAGS.real_encode)
  else:
    result = {"latent": FLAGS.latent, "codebook": FLAGS.codebook, "k": FLAGS.k,
              "pin": FLAGS.pin, "cpu": f"{host.cpu_name()} x{os.cpu_count()}", "rows": []}
    base = Path(FLAGS.root or tempfile.mkdtemp(prefix="data_scale."))
    for n in (int(s) for s in FLAGS.items):
      tables, roots = {}, []
      for j, count in enumerate(int(s) for s in FLAGS.processes):  # repeats: 1,2,1,2
        root = base / (f"n{n}_p{count}" + (f"_{j}" if count in tables else ""))
        print(f"--- {n} items, {count} process(es); load {os.getloadavg()}", flush=True)
        reuse = (Path(FLAGS.index_from) if FLAGS.index_from else
                 roots[0] / "index" if FLAGS.reuse_build and roots else None)
        rows = run_size(n, count, root, reuse)
        roots.append(root)
        nb = root / "index" / "neighbours_train.npy"
        # With --search_rows the tables are partly random: nothing to compare.
        tables[count] = nb.read_bytes() if nb.exists() and not FLAGS.search_rows else None
        result["rows"].append({"items": n, "processes": count, "load": os.getloadavg(),
                               "workers": rows,
                               "same_tables_as_1": (tables[count] == tables[min(tables)]
                                                    if tables[count] else None)})
        _summary(result["rows"][-1])
        if FLAGS.out:  # a long run keeps what it measured so far
          Path(FLAGS.out).write_text(json.dumps(result, indent=1, default=float))
      if not FLAGS.root:
        import shutil
        for root in roots:
          shutil.rmtree(root, ignore_errors=True)
    if not FLAGS.root:
      base.rmdir()
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(result, indent=1, default=float))


def _summary(r):
  mb = lambda b: f"{b / 2**20:.0f} MiB"
  for w in r["workers"]:
    print(f"  p{w['process']}: encode {w['encode_s']:.1f}s ({mb(w['encode_peak_bytes'])}), "
          f"build {w['build_s']:.1f}s{' (copied)' if 'build_reused_from' in w else ''} "
          f"({mb(w['build_peak_bytes'])}, cpu {w['build_cpu_s']:.1f}s), "
          f"search {w['search_s']:.1f}s of {w['search']['queries_searched']} of "
          f"{w['search']['queries_of_this_process']} queries, share "
          f"{w['search_s_share']:.1f}s ({mb(w['search_peak_bytes'])}, cpu {w['search_cpu_s']:.1f}s), "
          "gather " + ", ".join(f"{g} {v['step_s_median'] * 1e3:.1f}ms "
                                f"{mb(v['database_bytes_per_device'])}/dev"
                                for g, v in w.get("gather", {}).items()), flush=True)
    if "assemble" in w:
      print(f"  assemble: {w['assemble']}", flush=True)
  print(f"  tables identical to 1 process: {r['same_tables_as_1']}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
