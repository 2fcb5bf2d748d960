"""The one sampling path: a trained model, its database, and what to do with them.

  from rissole_jax import Sampler
  s = Sampler.from_workdir("runs/mnist")      # or Sampler.load("mnist.rissole")
  images = s.sample(64, seed=0)               # uint8 (64, H, W, C)
  s.grid(images)                              # a PIL image (shown inline in notebooks)
  more = s.variations("digit.png", num_per_image=8)
  other = s.with_database("folder:~/photos")  # retrieve from another database

The `sample` stage, `python -m rissole_jax.sample` and the notebook all call
this class. A sample is a pure function of (model, database, settings, seed,
its index): its pseudo-query, neighbours and noise depend only on those, never
on the batch it is drawn in, so the same seed gives the same images whatever
the batch size, padding or number of devices (up to float rounding).

The whole sampler (every timestep, all blocks of all images, the merge and the
VQ-GAN decode) is one jitted function, compiled once per settings and batch
size; a request smaller than a compiled batch is padded to it.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax.store import codes as codes_lib
from rissole_jax.runtime import parallel
from rissole_jax.inference import pictures
from rissole_jax.data.pipeline import local_slice, to_float, to_uint8
from rissole_jax.diffusion import solvers as samplers
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.models import lego, mapped, unet

log = logging.getLogger(__name__)

PSEUDO_QUERIES = ("uniform", "frequent")
NEEDED_STAGES = ("vqgan", "encode", "index", "diffusion")


# ---------------------------------------------------------------------------
# Settings of one sampling call.

@dataclasses.dataclass(frozen=True)
class Settings:
  """What a compiled sampler depends on (besides the model and batch size)."""
  sampler: str = "ddim"
  steps: int = 100
  eta: float = 1.0
  guidance: float = 1.0
  order: int = 2                   # DPM-Solver++
  spacing: str = "time_uniform"    # DDIM, DPM-Solver++
  lower_order_final: bool = True   # DPM-Solver++
  clip_x0: float = 0.0             # static thresholding of the predicted x0 (0: off)
  t_break: float = 0.0   # LEGO: the fraction of the trajectory run without sample.skip.bricks

  @classmethod
  def from_config(cls, s, **overrides) -> "Settings":
    base = cls(sampler=s.sampler, steps=int(s.steps), eta=float(s.eta),
               guidance=float(s.guidance_scale), t_break=float(s.skip.t_break),
               **samplers.options(s))
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given)


def check_settings(settings: Settings, config) -> None:
  """Refuses settings the model or the sampler cannot use, naming the fix."""
  v = config.model.variant
  samplers.check_config(settings, config.diffusion.timesteps)
  if not 0.0 <= settings.eta <= 1.0:
    raise ConfigError(f"sample.eta={settings.eta} must be in [0, 1].")
  if not 0.0 <= settings.t_break <= 1.0:
    raise ConfigError(f"sample.skip.t_break={settings.t_break} must be in [0, 1].")
  if settings.t_break > 0 and config.model.get("backbone", "unet") != "lego":
    raise ConfigError(f"sample.skip.t_break={settings.t_break} skips LEGO bricks, but this "
                      f"model's backbone is {config.model.get('backbone', 'unet')!r}. Fix: set it to 0.")
  if settings.guidance != 1.0:
    if not unet.uses_retrieval(v):
      raise ConfigError(f"sample.guidance_scale={settings.guidance}: variant {v!r} has no "
                        "retrieval condition to guide with. Fix: set it to 1.")
    if config.diffusion.cond_dropout <= 0:
      raise ConfigError(
          f"sample.guidance_scale={settings.guidance} needs a model trained with condition "
          "dropout (classifier-free guidance), but diffusion.cond_dropout=0. Fix: set "
          "sample.guidance_scale=1, or retrain with e.g. --config.diffusion.cond_dropout=0.1.")


def check_config(config) -> None:
  """The sample section, refused early with the fix."""
  s = config.sample
  check_settings(Settings.from_config(s), config)
  from rissole_jax.inference import quantize
  quantize.check_mode(s.get("quantize", "none"))
  if s.pseudo_query not in PSEUDO_QUERIES:
    raise ConfigError(f"Unknown sample.pseudo_query {s.pseudo_query!r}: use one of {PSEUDO_QUERIES}.")
  if s.num < 1 or s.batch_size < 1:
    raise ConfigError("sample.num and sample.batch_size must be positive.")


def nfe(settings: Settings, config, model) -> int:
  """Network evaluations per image (each over all its blocks at once)."""
  steps = samplers.num_steps(settings, config.diffusion.timesteps)
  steps *= 1 if settings.guidance == 1.0 else 2
  return steps * (blk.num_blocks(config.blocks.grid) if model.prev_block else 1)


# ---------------------------------------------------------------------------
# Pseudo-queries and their neighbours.

def retrieval_counts(neighbours: np.ndarray) -> np.ndarray:
  """How often each database item is among the training queries' neighbours."""
  return np.bincount(np.asarray(neighbours).ravel(), minlength=len(neighbours))


def pseudo_queries(neighbours: np.ndarray, num: int, mode: str, seed: int) -> np.ndarray:
  """`num` database ids: uniform, or 'frequent' (RDM): in proportion to how
  often an item is retrieved, so never-retrieved outliers are never queries.
  Without replacement while there are enough candidates (a fixed random
  ranking, Gumbel top-k, so the first m of `num` queries are the `m` queries);
  beyond that uniform goes round again and 'frequent' draws with replacement."""
  n = len(neighbours)
  rng = np.random.default_rng([seed, 0x5A3])
  if mode == "uniform":
    return np.concatenate([rng.permutation(n) for _ in range(-(-num // n))])[:num].astype(np.int64)
  if mode != "frequent":
    raise ConfigError(f"Unknown sample.pseudo_query {mode!r}: use one of {PSEUDO_QUERIES}.")
  counts = retrieval_counts(neighbours).astype(np.float64)
  if num > np.count_nonzero(counts):
    return rng.choice(n, size=num, p=counts / counts.sum()).astype(np.int64)
  with np.errstate(divide="ignore"):
    keys = np.log(counts) + rng.gumbel(size=n)
  return np.argsort(-keys, kind="stable")[:num].astype(np.int64)


def query_neighbours(neighbours: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """(num, k) neighbour ids of each query, refusing any query among its own."""
  ids = np.asarray(neighbours)[queries]
  bad = np.flatnonzero(np.any(ids == np.asarray(queries)[:, None], axis=1))
  if len(bad):
    raise DataError(f"{len(bad)} pseudo-queries (e.g. id {int(queries[bad[0]])}) are among "
                    "their own neighbours: a sample could copy its query. The neighbour "
                    "table must exclude each item itself; rebuild the index.")
  return ids


# ---------------------------------------------------------------------------
# The sampler: a pure function of (params, autoencoder params, neighbours, keys).

def _row_keys(keys, n: int):
  """(B, 2) image keys -> (B*n, 2) block keys, example-major (as unet.fold)."""
  per = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(keys)
  return per.reshape(-1, keys.shape[-1])


def skip_plan(model, config, settings: Settings):
  """LEGO brick skipping for these settings (lego.skip_plan), None otherwise."""
  if settings.t_break == float(config.sample.skip.t_break):
    return lego.skip_plan(model, config)
  c = config.copy_and_resolve_references()
  c.sample.skip.t_break = settings.t_break
  return lego.skip_plan(model, c)


def sample_latents(model, params, schedule, prediction: str, settings: Settings, nb, keys,
                   plan=None):
  """Normalised latents (B, h, w, c) for neighbours' normalised latents nb
  (B, k, h, w, c) and one key per image (B, 2); every block of every image at
  once (or block by block in raster order with use_prev_block). Each row's
  starting noise and step noise come from its own key. plan: LEGO bricks
  skipped over part of the trajectory (skip_plan), None for all bricks."""
  B, shape = nb.shape[0], nb.shape[2:]

  def run(cond, row_keys, row_shape, model=model, params=params):
    def model_fn(active=None):
      def pred_fn(x, t, keep):
        return model.apply({"params": params}, x, t, **cond,
                           keep=keep if model.learn_null else None,
                           **({} if active is None else {"active": active}))
      return samplers.guided(pred_fn, schedule, prediction, settings.guidance)
    # The low-noise part of the trajectory runs another stack: two loops.
    split = {} if plan is None else {"model_fn_low": model_fn(plan[1]), "t_switch": plan[2]}
    x_T = jax.vmap(lambda k: samplers.normal(jax.random.fold_in(k, 0), row_shape))(row_keys)
    run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(row_keys)
    return samplers.run_sampler(settings.sampler, schedule, model_fn(plan and plan[0]), x_T,
                                run_keys, settings.steps, settings.eta, **split,
                                **samplers.options(settings))

  if not model.blocks:
    return run(unet.condition(model, nb, B), keys, shape)
  n = blk.num_blocks(model.grid)
  bshape = blk.block_shape(shape, model.grid)
  if not model.prev_block:
    x = run(unet.condition(model, nb, B), _row_keys(keys, n), bshape)
    return blk.merge(unet.unfold(x, n), model.grid)
  # Raster order: block i starts once block i-1 is finished and conditions on it.
  nbb = jnp.moveaxis(blk.split(nb, model.grid), 2, 0) if model.retrieval else None  # (n, B, k, ...)

  def one_block(prev, inputs):
    i, nb_i = inputs
    cond = {"pos": jnp.full((B,), i, jnp.int32), "neighbours": nb_i, "prev": prev}
    # Rows of one block: the per-block model (block i's weights, if not shared).
    m_i, p_i = mapped.for_rows(model, params, i)
    x = run(cond, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), bshape, m_i, p_i)
    return x, x

  _, xs = jax.lax.scan(one_block, jnp.zeros((B, *bshape), nb.dtype),
                       (jnp.arange(n, dtype=jnp.int32), nbb))
  return blk.merge(jnp.moveaxis(xs, 0, 1), model.grid)


def latents_fn(model, schedule, config):
  """fn(params, nb, key) -> normalised latents with config.sample's settings
  (image i's key is fold_in(key, i)): the sampler without the decode, for
  tests and benchmarks."""
  settings = Settings.from_config(config.sample)
  plan = skip_plan(model, config, settings)

  def fn(params, nb, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(nb.shape[0]))
    return sample_latents(model, params, schedule, config.diffusion.prediction, settings, nb,
                          keys, plan)
  return fn


def make_sample_fn(model, schedule, prediction: str, settings: Settings, decode_fn, stats,
                   plan=None):
  """fn(params, ae_params, nb, key, start) -> (latents, images in [-1, 1]) for
  one jit: image i of the batch is image start + i of the request, and its
  key is fold_in(key, start + i)."""
  mean, std = jnp.asarray(stats["mean"]), jnp.asarray(stats["std"])

  def fn(params, ae_params, nb, key, start):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, start + i))(jnp.arange(nb.shape[0]))
    z = sample_latents(model, params, schedule, prediction, settings, nb, keys, plan) * std + mean
    return z, decode_fn(ae_params, z)
  return fn


# ---------------------------------------------------------------------------
# The database sampling retrieves from.

@dataclasses.dataclass
class Database:
  """Latents (exact codebook vectors when the autoencoder has a codebook), their
  code indices, labels and neighbour table; the retrieval index is loaded or
  built when first needed (retrieval for user images)."""
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
  def from_retrieval(cls, db, codebook: np.ndarray | None) -> "Database":
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
    return cls(latents, np.asarray(db.neighbours, np.int32), np.asarray(db.labels, np.int32),
               db.dataset, codes, saved=db)

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


# ---------------------------------------------------------------------------
# A finished workdir.

def workdir_config(root: Path):
  """The config a workdir was made with: the defaults, overridden by every
  stage record's config sections (each stage records the sections it reads)."""
  from rissole_jax import defaults
  from rissole_jax.stages import STAGES
  root = Path(root)
  first = root / "vqgan" / "stage.json"
  if not root.is_dir():
    raise DataError(f"{root} is not a folder. Fix: pass the --workdir of a finished run.")
  if not first.exists():
    raise DataError(f"{root} has no finished 'vqgan' stage ({first} is missing): it is not a "
                    "rissole_jax workdir, or nothing has run there yet. Fix: "
                    f"python -m rissole_jax.main --config CONFIG --workdir {root}")
  config = defaults.recorded_base()   # a model key a record lacks: its first value
  for name in STAGES:
    path = root / name / "stage.json"
    if path.exists():
      try:
        sections = json.loads(path.read_text())["config"]
      except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is damaged ({e}). Fix: re-run that stage with --overwrite, "
                        f"or restore the file.") from e
      merge_config(config, sections)
  return config


def merge_config(config, values: dict) -> None:
  """Sets `values` (nested dicts, as JSON gives them: lists for tuples) into an
  ml_collections config, in place; keys the defaults lack are added."""
  import ml_collections as mlc
  with config.unlocked():
    for k, v in values.items():
      if isinstance(v, dict) and isinstance(config.get(k), mlc.ConfigDict):
        merge_config(config[k], v)
      else:
        config[k] = _tuples(v)


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def check_stages(config, root: Path, needed=NEEDED_STAGES) -> None:
  """Each needed stage finished with this config, or DataError naming the
  stage and the command that makes it."""
  from rissole_jax.stages import stage_records
  for rec in stage_records(config, Path(root)):
    if rec.name not in needed or rec.is_done():
      continue
    state = rec.load()
    why = ("has not run" if state is None else
           "was made with another config than the stages before it" if
           state.get("fingerprint") != rec.fingerprint else "has not finished")
    raise DataError(
        f"stage '{rec.name}' in {root} {why}, so there is no trained model to sample from. "
        f"Fix: python -m rissole_jax.main --config CONFIG --workdir {root} "
        f"(add --only {rec.name} if the stages before it are done; it resumes where it stopped).")


# ---------------------------------------------------------------------------
# The API.

class Sampler:
  """A trained RISSOLE model with its database: sample, make variations of
  user images, swap the database, show figures. See the module docstring."""

  def __init__(self, config, ae, model, params, stats: dict, db: Database, mesh=None):
    self.config, self.ae, self.model, self.params = config, ae, model, params
    self.stats, self.db = stats, db
    self.mesh = mesh or parallel.make_mesh(config.mesh)
    self.schedule = make_schedule(config.diffusion)
    rules = config.mesh.logical_axis_rules
    self._rules = rules
    self._shards = int(np.prod([self.mesh.shape[a] for a in parallel.batch_axes(self.mesh, rules)]))
    self._fns: dict = {}
    self.trace_counts: collections.Counter = collections.Counter()  # (settings, batch) -> traces
    self.last_timings: dict = {}
    self._db_norm = None
    self.quantize = "none"
    self._decoder = (ae.decode_fn, ae.params)   # (decode_fn, its params): int8 once quantized
    if unet.uses_retrieval(model.variant) and db.neighbours.shape[1] != stats["k"]:
      raise DataError(f"the denoiser was trained with k={stats['k']} neighbours; the database "
                      f"{db.name} has k={db.neighbours.shape[1]}.")
    if tuple(db.latents.shape[1:]) != tuple(stats["latent_shape"]):
      raise DataError(f"database latents {tuple(db.latents.shape[1:])} do not match the "
                      f"denoiser's {tuple(stats['latent_shape'])}.")

  # -- construction ------------------------------------------------------------

  @classmethod
  def from_workdir(cls, path, config=None, mesh=None) -> "Sampler":
    """The model and database of a finished workdir (stages vqgan, encode, index,
    diffusion), checked against their stage records. `config`: the config it
    was made with (default: read back from the stage records)."""
    from rissole_jax import retrieval
    from rissole_jax.train import diffusion as dif
    from rissole_jax.train.vqgan import load_autoencoder
    root = Path(path)
    config = config if config is not None else workdir_config(root)
    check_stages(config, root)
    mesh = mesh or parallel.make_mesh(config.mesh)
    ae = load_autoencoder(config, root / "vqgan")
    model, params, stats = dif.load_denoiser(config, root, mesh)
    db = retrieval.load_database(config, root, ae.fingerprint)
    dif.check_database(db)
    return cls(config, ae, model, params, stats,
               Database.from_retrieval(db, codes_lib.codebook_of(ae.params)), mesh)

  @classmethod
  def load(cls, path, mesh=None) -> "Sampler":
    """A sampler from a model file written by `save` (python -m rissole_jax.export)."""
    from rissole_jax.inference import modelfile
    return modelfile.load(path, mesh)

  def save(self, path) -> dict:
    """Writes everything sampling needs into one file; returns its parts' sizes."""
    from rissole_jax.inference import modelfile
    return modelfile.save(self, path)

  def __repr__(self) -> str:
    return (f"Sampler({self.model.variant}, {unet.count_params(self.params):,} denoiser "
            f"parameters, database {self.db.name!r} of {len(self.db)}, k={self.stats['k']}, "
            f"{self._shards} device(s) {jax.devices()[0].platform})")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.config.data.image_size,) * 2 + (self.config.data.channels,)

  def settings(self, **overrides) -> Settings:
    """The config's sampling settings with `overrides` (None: keep)."""
    s = Settings.from_config(self.config.sample, **overrides)
    check_settings(s, self.config)
    return s

  # -- sampling ----------------------------------------------------------------

  def sample(self, num: int, *, seed: int = 0, sampler: str | None = None,
             steps: int | None = None, eta: float | None = None, guidance: float | None = None,
             order: int | None = None, spacing: str | None = None,
             t_break: float | None = None, batch_size: int | None = None,
             pseudo_query: str | None = None, progress: bool = True,
             return_queries: bool = False):
    """`num` new images, uint8 (num, H, W, C), each from a pseudo-query drawn
    from the database (config.sample.pseudo_query unless given) and that
    query's neighbours. With return_queries, also the query ids (num,)."""
    if num < 1:
      raise ConfigError(f"num={num}: ask for at least one image.")
    settings = self.settings(sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                             order=order, spacing=spacing, t_break=t_break)
    queries = pseudo_queries(self.db.neighbours, num, pseudo_query or self.config.sample.pseudo_query,
                             seed)
    images = self.generate(query_neighbours(self.db.neighbours, queries), seed=seed,
                           settings=settings, batch_size=batch_size, progress=progress)
    return (images, queries) if return_queries else images

  def generate(self, neighbour_ids: np.ndarray, *, seed: int = 0, settings: Settings | None = None,
               batch_size: int | None = None, progress: bool = True,
               desc: str = "sample") -> np.ndarray:
    """One image per row of database ids (num, k): image i denoised with those
    neighbours and noise from fold_in(PRNGKey(seed), i). uint8 (num, H, W, C)."""
    settings = settings or self.settings()
    ids = np.asarray(neighbour_ids, np.int64)
    num = len(ids)
    if num == 0:
      return np.zeros((0, *self.image_shape), np.uint8)
    bs = self._batch_size(settings, num, batch_size or self.config.sample.batch_size)
    fn = self._compiled(settings)
    pidx, pcount = parallel.process_info()
    sl = local_slice(bs, pidx, pcount)
    key = parallel.put_replicated(jax.random.PRNGKey(seed), self.mesh)
    lat = self._normalised()
    out = np.empty((num, *self.image_shape), np.uint8)
    times = []
    from tqdm.auto import tqdm
    bar = tqdm(total=num, desc=desc, dynamic_ncols=True, leave=False,
               disable=not progress or pidx != 0)
    try:  # an interrupt (Ctrl-C) returns nothing half-made; the object stays usable
      for start in range(0, num, bs):
        chunk = ids[start:start + bs]
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)])  # static shape
        nb = parallel.put_batch(lat[chunk][sl], self.mesh, self._rules)
        t0 = time.perf_counter()
        _, img = fn(self.params, self._decoder[1], nb, key,
                    parallel.put_replicated(np.int32(start), self.mesh))
        img = parallel.to_host(img)
        times.append(time.perf_counter() - t0)
        m = min(bs, num - start)
        out[start:start + m] = to_uint8(img[:m])
        bar.update(m)
    finally:
      bar.close()
    steady = times[1:] or times
    self.last_timings = {"batch_size": bs, "batches": len(times), "seconds_first_batch": times[0],
                         "seconds_per_batch": float(np.median(steady)),
                         "samples_per_sec": bs / float(np.median(steady)),
                         "nfe_per_sample": nfe(settings, self.config, self.model)}
    return out

  def _normalised(self) -> np.ndarray:
    if self._db_norm is None:
      from rissole_jax.train.diffusion import normalise
      self._db_norm = normalise(self.db.latents, self.stats).astype(np.float32)
    return self._db_norm

  def _batch_size(self, settings: Settings, num: int, batch_size: int) -> int:
    """The batch to run `num` images in: `batch_size` (rounded to the devices)
    for big requests; for smaller ones the smallest batch already compiled for
    these settings that holds them, else the next power of two (so a growing
    request compiles a few times at most). Results do not depend on it."""
    if batch_size < 1:
      raise ConfigError(f"batch_size={batch_size} must be positive.")
    up = lambda b: -(-b // self._shards) * self._shards
    cap = up(batch_size)
    want = min(cap, up(1 << max(0, int(num) - 1).bit_length()))
    compiled = [b for (s, b) in self.trace_counts if s == settings and want <= b <= cap]
    return min(compiled) if compiled else want

  def _compiled(self, settings: Settings):
    """The jitted sampler for `settings` (jit keeps one executable per batch size)."""
    if settings not in self._fns:
      fn = make_sample_fn(self.model, self.schedule, self.config.diffusion.prediction, settings,
                          self._decoder[0], self.stats, skip_plan(self.model, self.config, settings))

      def counted(params, ae_params, nb, key, start):
        self.trace_counts[(settings, nb.shape[0])] += 1  # runs once per trace
        return fn(params, ae_params, nb, key, start)

      repl = parallel.replicated(self.mesh)
      bsh = lambda nd: parallel.batch_sharding(self.mesh, self._rules, nd)
      self._fns[settings] = jax.jit(counted, in_shardings=(None, repl, bsh(5), repl, repl),
                                    out_shardings=(bsh(4), bsh(4)))
    return self._fns[settings]

  # -- user images ---------------------------------------------------------------

  def encode_images(self, images) -> np.ndarray:
    """User images (paths, PIL images or arrays; any size or mode) -> quantized
    latents (N, h, w, c), after the folder source's conversion."""
    from rissole_jax.data.images import to_model_images
    size, ch = self.config.data.image_size, self.config.data.channels
    return self.ae.encode(to_float(to_model_images(images, size, ch)))

  def retrieve(self, latents: np.ndarray) -> np.ndarray:
    """(M, k) database ids nearest to each latent, never a database item equal
    to the latent itself (a user image that is in the database)."""
    k = int(self.stats["k"])
    latents = np.asarray(latents, np.float32)
    same = [np.flatnonzero(m) for m in self._copies_of(latents)]
    width = max([len(s) for s in same] + [1])
    exclude = np.full((len(latents), width), -1, np.int64)
    for i, s in enumerate(same):
      exclude[i, :len(s)] = s
    if k + width > len(self.db):
      raise DataError(f"the database {self.db.name!r} has {len(self.db)} items; retrieving "
                      f"k={k} neighbours besides the query's own copies needs {k + width}.")
    index = self.db.index(self.config)
    ids, _ = index.search(index.embed(latents, self.config), k, exclude)
    return ids

  def _copies_of(self, latents: np.ndarray):
    """Per latent, a bool per database item: is it the same latent (the same
    codes, or to float noise without a codebook)?"""
    codebook = codes_lib.codebook_of(self.ae.params)
    for z in latents:
      if self.db.codes is not None and codebook is not None:
        yield np.all(self.db.codes == codes_lib.to_codes(z[None], codebook)[0], axis=(1, 2))
      else:
        yield np.all(np.abs(self.db.latents - z) <= 1e-5 * (1 + np.abs(z)), axis=(1, 2, 3))

  def variations(self, images, num_per_image: int = 4, *, seed: int = 0, **kw) -> np.ndarray:
    """New images like each given one: it is encoded, its k nearest neighbours
    are retrieved from the database (never itself), and `num_per_image` images
    are sampled from them. uint8 (len(images), num_per_image, H, W, C).
    Keyword arguments as for `sample` (sampler, steps, eta, guidance, ...)."""
    if num_per_image < 1:
      raise ConfigError(f"num_per_image={num_per_image}: ask for at least one.")
    ids = self.retrieve(self.encode_images(images))
    settings = self.settings(**{k: kw.pop(k, None) for k in
                                ("sampler", "steps", "eta", "guidance", "order", "spacing",
                                 "t_break")})
    out = self.generate(np.repeat(ids, num_per_image, 0), seed=seed, settings=settings,
                        desc="variations", **kw)
    return out.reshape(len(ids), num_per_image, *out.shape[1:])

  # -- another database ------------------------------------------------------------

  def with_database(self, source, *, directory=None, progress: bool = True) -> "Sampler":
    """A sampler that retrieves from another database: a folder of images (a
    path, or "folder:PATH"), an array of images (N, H, W[, C]) or a list of
    images, or a dataset name ("mnist_embedded", "celeb_a", ...: its train
    split). Encoded and indexed once, cached under `directory` (default: a
    folder keyed by the autoencoder and the source in the user cache)."""
    from rissole_jax import retrieval
    src = database_source(source, self.config)
    k = int(self.stats["k"])
    if len(src) < k + 1:
      raise DataError(f"the database {src.name} has {len(src)} images, but the model retrieves "
                      f"k={k} neighbours (never an item itself), so it needs at least {k + 1}. "
                      "Fix: add images, or use a model trained with a smaller retrieval.k.")
    if directory is None:
      directory = cache_dir() / "databases" / _database_key(self, src)
    db = retrieval.build_database(self.ae, src, self.config, Path(directory),
                                  say=log.info, progress=_bar if progress else None)
    out = copy.copy(self)   # same model: the same compiled code serves it
    out.db, out._db_norm = Database.from_retrieval(db, codes_lib.codebook_of(self.ae.params)), None
    return out

  def quantized(self, mode: str) -> "Sampler":
    """This sampler with its denoiser and VQ-GAN decoder quantized to int8
    ('int8_weights': int8 weights, float compute; 'int8': int8 weights and
    activations with static scales calibrated on the database), see
    rissole_jax/inference/quantize.py. 'none' returns this sampler."""
    from rissole_jax.inference import quantize
    quantize.check_mode(mode)
    if mode == self.quantize:
      return self
    if self.quantize != "none":
      raise ConfigError(f"this sampler is already quantized ({self.quantize}); quantize the "
                        "float one.")
    q = quantize.quantize_parts(self, mode)
    out = copy.copy(self)
    out.model, out.params, out._decoder, out.quantize = q.model, q.params, (q.decode_fn, q.ae_params), mode
    out._fns, out.trace_counts = {}, collections.Counter()   # another program
    return out

  # -- pictures ------------------------------------------------------------------

  def decode(self, ids) -> np.ndarray:
    """uint8 images of database items."""
    return to_uint8(self.ae.decode(self.db.latents[np.asarray(ids)]))

  def neighbours(self, num: int = 8, *, seed: int = 0, queries=None):
    """PIL image: rows of [query | its k neighbours] for `num` pseudo-queries
    (or the given database ids)."""
    q = (pseudo_queries(self.db.neighbours, num, self.config.sample.pseudo_query, seed)
         if queries is None else np.asarray(queries))
    nb = query_neighbours(self.db.neighbours, q)
    return pictures.to_pil(pictures.figure(self.decode(q), self.decode_rows(nb)))

  def figure(self, num: int = 8, *, seed: int = 0, **kw):
    """PIL image: rows of [query | neighbours | sample], as the paper's Figure 2."""
    images, q = self.sample(num, seed=seed, return_queries=True, **kw)
    nb = query_neighbours(self.db.neighbours, q)
    return pictures.to_pil(pictures.figure(self.decode(q), self.decode_rows(nb), images))

  def decode_rows(self, ids: np.ndarray) -> np.ndarray:
    """uint8 images (m, k, H, W, C) of database ids (m, k)."""
    return self.decode(ids.ravel()).reshape(*ids.shape, *self.image_shape)

  @staticmethod
  def grid(images, cols: int | None = None):
    """PIL image of uint8 images (n, H, W, C) (or (m, n, H, W, C): one row each)."""
    images = np.asarray(images)
    if images.ndim == 5:
      cols = cols or images.shape[1]
      images = images.reshape(-1, *images.shape[2:])
    return pictures.to_pil(pictures.tile(images, cols or pictures.grid_columns(len(images))))


def _bar(total: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def cache_dir() -> Path:
  """$RISSOLE_CACHE, else ~/.cache/rissole_jax (rissole_jax.runtime.cache)."""
  from rissole_jax.runtime.cache import user_cache_dir
  return user_cache_dir()


def database_source(source, config):
  """A data Source for `source`: a folder (path or "folder:PATH"; every image
  in it, named by its file list so a changed folder is re-encoded), images
  (an (N, H, W[, C]) array or a list; named by their bytes), or a dataset
  name (its train split)."""
  from rissole_jax.data import ArraySource, load_source
  from rissole_jax.data.sources import FolderSource
  size, ch = config.data.image_size, config.data.channels
  if isinstance(source, (str, os.PathLike)):
    spec = str(source)
    path = spec[len("folder:"):] if spec.startswith("folder:") else spec
    if spec.startswith("folder:") or os.sep in spec or Path(os.path.expanduser(path)).is_dir():
      src = FolderSource(path, "train", size, ch, heldout_fraction=0.0,
                         bad_images=config.data.get("bad_images", "error"))
      listing = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in src.files)
      src.name = f"folder:{Path(path).expanduser().resolve()}:{_digest(listing.encode())}"
      return src
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
      data.name, data.classes = spec, ()
    return load_source(data, "train")
  from rissole_jax.data.images import to_model_images
  images = to_model_images(source, size, ch)
  return ArraySource(f"array:{_digest(images.tobytes())}", images)


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _database_key(sampler: Sampler, src) -> str:
  from rissole_jax.stages import workdir as wd
  return wd.fingerprint({"autoencoder": sampler.ae.fingerprint, "source": src.name,
                         "retrieval": sampler.config.retrieval.to_dict(),
                         "size": sampler.image_shape})
