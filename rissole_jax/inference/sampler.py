"""The one sampling API: a trained model, its database, and what to do with them.

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
VQ-GAN decode) is one jitted function (program.py), compiled once per
settings and batch size; a request smaller than a compiled batch is padded to
it. The rest of inference/: queries.py (pseudo-queries), database.py (the
database in memory), sources.py (user images as a database), configs.py and
loading.py (a workdir's config and parts), modelfile.py (the one-file
export), quantize.py (int8), stablehlo.py (the jax.export program).
"""
from __future__ import annotations

import collections
import copy
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax.data.pipeline import local_slice, to_float, to_uint8
from rissole_jax.diffusion.latents import normalise
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.inference import loading, pictures, sources
from rissole_jax.inference.database import SamplingDatabase
from rissole_jax.inference.program import (Settings, check_settings, couples_blocks,
                                           make_sample_fn, nfe, params_for, skip_plan)
from rissole_jax.inference.queries import pseudo_queries, query_neighbours
from rissole_jax.models import unet
from rissole_jax.runtime import parallel
from rissole_jax.store import codes as codes_lib

log = logging.getLogger(__name__)


class Sampler:
  """A trained RISSOLE model with its database: sample, make variations of
  user images, swap the database, show figures. See the module docstring."""

  def __init__(self, config, ae, model, params, stats: dict, db: SamplingDatabase, mesh=None,
               students: dict | None = None):
    self.config, self.ae, self.model, self.params = config, ae, model, params
    # Distilled students (the distill stage's), steps -> params: sampler="distilled".
    self.students = dict(students or {})
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
    self.manifest = None         # a model file's manifest (provenance), if loaded from one
    self.quantization = "none"   # quantized(): 'int8_weights' or 'int8'
    # The decoder the program runs and its params: the autoencoder's, int8 once quantized.
    self.decode_fn, self.decoder_params = ae.decode_fn, ae.params
    if unet.uses_retrieval(model.variant) and db.neighbours.shape[1] != stats["k"]:
      raise DataError(f"the denoiser was trained with k={stats['k']} neighbours; the database "
                      f"{db.name} has k={db.neighbours.shape[1]}.")
    if tuple(db.latents.shape[1:]) != tuple(stats["latent_shape"]):
      raise DataError(f"database latents {tuple(db.latents.shape[1:])} do not match the "
                      f"denoiser's {tuple(stats['latent_shape'])}.")

  # -- construction ------------------------------------------------------------

  @classmethod
  def from_parts(cls, parts: loading.Parts) -> "Sampler":
    out = cls(parts.config, parts.ae, parts.model, parts.params, parts.stats, parts.db,
              parts.mesh, parts.students)
    out.manifest = parts.manifest
    return out

  @classmethod
  def from_workdir(cls, path, config=None, mesh=None) -> "Sampler":
    """The model and database of a finished workdir (stages vqgan, encode, index,
    diffusion), checked against their stage records. `config`: the config it
    was made with (default: read back from the stage records)."""
    return cls.from_parts(loading.load_workdir(path, config, mesh))

  @classmethod
  def load(cls, path, mesh=None) -> "Sampler":
    """A sampler from a model file written by `save` (python -m rissole_jax.export)."""
    from rissole_jax.inference import modelfile
    return cls.from_parts(modelfile.load(path, mesh))

  @classmethod
  def pretrained(cls, name: str = "mnist", mesh=None) -> "Sampler":
    """A model shipped inside the package (rissole_jax/pretrained: "mnist" is
    the default main job's model); its provenance is in `.manifest`."""
    from rissole_jax import pretrained
    return cls.load(pretrained.path(name), mesh)

  def save(self, path, weights: str = "float32", provenance: dict | None = None) -> dict:
    """Writes everything sampling needs into one file; returns its parts' sizes.
    weights="int8": every conv/dense kernel stored as int8 (a quarter of the
    bytes; read back as float32). See inference/modelfile.py."""
    from rissole_jax.inference import modelfile
    return modelfile.save(self, path, weights, provenance)

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
    params_for(self, s)   # a distilled sampler needs a student of its steps
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
               desc: str = "sample", keep=None, return_latents: bool = False,
               decode: bool = True, follow: bool = False):
    """One image per row of database ids (num, k): image i denoised with those
    neighbours and noise from fold_in(PRNGKey(seed), i). uint8 (num, H, W, C).
    keep: (latents (num, h, w, c), bool (h, w)): where the mask is True, image
    i's latent is replaced by latents[i] before decoding (inpainting).
    With return_latents, also the latents decoded (num, h, w, c); with
    decode=False (and keep given) the images are not made (None). follow
    (with keep, in a model that couples blocks): the kept latents also enter
    the trajectory (program.sample_latents' `known`)."""
    if not decode and (keep is None or not return_latents):
      raise ValueError("decode=False is for keep=... with return_latents=True.")
    settings = settings or self.settings()
    ids = np.asarray(neighbour_ids, np.int64)
    num = len(ids)
    if num == 0:
      return np.zeros((0, *self.image_shape), np.uint8)
    bs = self._batch_size(settings, num, batch_size or self.config.sample.batch_size)
    follow = bool(follow and keep is not None and couples_blocks(self.model))
    fn = self._compiled(settings, decode=keep is None, follow=follow)
    pidx, pcount = parallel.process_info()
    sl = local_slice(bs, pidx, pcount)
    key = parallel.put_replicated(jax.random.PRNGKey(seed), self.mesh)
    params = params_for(self, settings)
    lat = self._normalised()
    out = np.empty((num, *self.image_shape), np.uint8)
    z_out = np.empty((num, *self.stats["latent_shape"]), np.float32) if return_latents else None
    if keep is not None:
      kept, where = np.asarray(keep[0], np.float32), np.asarray(keep[1], bool)[..., None]
      merge_decode = self._merge_decode()
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
        start_arr = parallel.put_replicated(np.int32(start), self.mesh)
        if keep is not None:
          rows = np.arange(start, start + bs).clip(max=num - 1)
        if follow:
          z, img = fn(params, self.decoder_params, nb, key, start_arr,
                      parallel.put_batch(kept[rows][sl], self.mesh, self._rules),
                      parallel.put_replicated(where[..., 0], self.mesh))
        else:
          z, img = fn(params, self.decoder_params, nb, key, start_arr)
        if keep is not None:   # the user's blocks, exactly, then one decode of the whole latent
          if decode:
            z, img = merge_decode(self.decoder_params, z, kept[rows], where)
          else:
            z = img = np.where(where, kept[rows], parallel.to_host(z))
        img = parallel.to_host(img)
        times.append(time.perf_counter() - t0)
        m = min(bs, num - start)
        if decode:
          out[start:start + m] = to_uint8(img[:m])
        if z_out is not None:
          z_out[start:start + m] = parallel.to_host(z)[:m]
        bar.update(m)
    finally:
      bar.close()
    steady = times[1:] or times
    self.last_timings = {"batch_size": bs, "batches": len(times), "seconds_first_batch": times[0],
                         "seconds_per_batch": float(np.median(steady)),
                         "samples_per_sec": bs / float(np.median(steady)),
                         "nfe_per_sample": nfe(settings, self.config, self.model)}
    if not decode:
      out = None
    return (out, z_out) if return_latents else out

  def _merge_decode(self):
    """jit(fn(decoder params, sampled z, kept z, where) -> (z, images))."""
    if "merge_decode" not in self._fns:
      decode = self.decode_fn

      def fn(ae_params, z, kept, where):
        z = jnp.where(where, kept, z)
        return z, decode(ae_params, z)
      self._fns["merge_decode"] = jax.jit(fn)
    return self._fns["merge_decode"]

  def _normalised(self) -> np.ndarray:
    if self._db_norm is None:
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

  def _compiled(self, settings: Settings, decode: bool = True, follow: bool = False):
    """The jitted sampler for `settings` (jit keeps one executable per batch
    size); decode=False: the same program returning the latents twice, not
    decoded (inpainting merges the kept blocks first, then decodes once);
    follow: it takes the kept latents and their mask too (inpainting a model
    that couples blocks)."""
    key = (settings, "latents" if not decode else "images", "follow" if follow else "")
    key = settings if key[1:] == ("images", "") else key
    if key not in self._fns:
      fn = make_sample_fn(self.model, self.schedule, self.config.diffusion.prediction, settings,
                          self.decode_fn if decode else (lambda _, z: z), self.stats,
                          skip_plan(self.model, self.config, settings), follow)

      def counted(params, ae_params, nb, key, start, *known):
        if decode:   # trace_counts: the sampling program's traces
          self.trace_counts[(settings, nb.shape[0])] += 1  # runs once per trace
        return fn(params, ae_params, nb, key, start, *known)

      repl = parallel.replicated(self.mesh)
      bsh = lambda nd: parallel.batch_sharding(self.mesh, self._rules, nd)
      extra = (bsh(4), repl) if follow else ()
      self._fns[key] = jax.jit(counted, in_shardings=(None, repl, bsh(5), repl, repl, *extra),
                               out_shardings=(bsh(4), bsh(4)))
    return self._fns[key]

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

  def inpaint(self, images, keep, num_per_image: int = 4, *, seed: int = 0,
              return_latents: bool = False, follow: bool = True, **kw):
    """Completions of each image from the blocks `keep` says to keep
    (inference/editing.block_mask: "top", "bottom", "left", "right", a bool
    (gh, gw) block mask, or an (H, W) pixel mask rounded to blocks). The
    kept blocks choose the neighbours (a distance over the kept blocks only,
    never the image itself); each missing block is generated from those
    neighbours' blocks at its position; the kept blocks' latents are the
    user's encoded image, exactly. uint8 (len(images), num_per_image, H, W, C)
    (and the latents with return_latents). Keyword arguments as for `sample`.

    In a model that denoises every block on its own (the default), the kept
    blocks reach the others through retrieval alone. In models that couple
    blocks (program.couples_blocks: a whole-canvas model, or prev_block), with
    `follow` (default) the kept blocks also enter the trajectory: a
    whole-canvas model sees them forward-noised at every step (RePaint-style),
    a prev_block model conditions each next block on the kept one;
    follow=False leaves them to retrieval alone (docs/RESULTS.md compares)."""
    from rissole_jax.inference import editing
    self._check_editing(num_per_image)
    mask = editing.block_mask(keep, self.config.blocks.grid, self.config.data.image_size)
    z = self.encode_images(images)
    exclude = [np.flatnonzero(m) for m in self._copies_of(z)]
    settings = self._settings_from(kw)
    rep = lambda a: np.repeat(a, num_per_image, 0)
    out, lat = self._complete(rep(z), mask, rep(np.arange(len(z))), exclude, seed, settings,
                              desc="inpaint", follow=follow, **kw)
    shape = (len(z), num_per_image)
    out = out.reshape(*shape, *out.shape[1:])
    return (out, lat.reshape(*shape, *z.shape[1:])) if return_latents else out

  def outpaint(self, image, canvas, at=(0, 0), num_per_image: int = 4, *, seed: int = 0,
               return_latents: bool = False, **kw):
    """The image placed at block `at` (row, col) of a larger canvas of
    `canvas` (rows, cols) blocks, and the rest generated: uint8
    (num_per_image, rows*bh, cols*bw, C) images of the whole canvas (bh, bw:
    a block's size in pixels), and their latents with return_latents.

    The canvas is filled one training-size window at a time
    (editing.next_window: the window with the most blocks already there):
    each window is an inpainting whose kept blocks are the canvas's known
    blocks in it, so the denoiser only ever sees a canvas of the size and
    block positions it was trained on, whatever its backbone (the U-Net's
    learned position has one entry per training block). The user's blocks
    stay exactly as encoded; the canvas is decoded as one latent.
    Keyword arguments as for `sample`."""
    from rissole_jax.inference import editing
    self._check_editing(num_per_image)
    grid = tuple(int(g) for g in self.config.blocks.grid)
    (rows, cols), at = editing.check_canvas(canvas, at, grid)
    z = self.encode_images([image])                                   # (1, h, w, c)
    h, w, ch = z.shape[1:]
    bh, bw = h // grid[0], w // grid[1]
    exclude = [np.flatnonzero(m) for m in self._copies_of(z)] * num_per_image
    settings = self._settings_from(kw)
    Z = np.zeros((num_per_image, rows * bh, cols * bw, ch), np.float32)
    Z[:, at[0] * bh:at[0] * bh + h, at[1] * bw:at[1] * bw + w] = z[0]
    known = np.zeros((rows, cols), bool)
    known[at[0]:at[0] + grid[0], at[1]:at[1] + grid[1]] = True
    step = 0
    while (win := editing.next_window(known, grid, at)) is not None:
      r, c = win
      rs, cs = slice(r * bh, r * bh + h), slice(c * bw, c * bw + w)
      mask = known[r:r + grid[0], c:c + grid[1]].copy()
      # each window its own noise, a pure function of (seed, window number)
      wseed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0] >> 1)
      _, lat = self._complete(Z[:, rs, cs], mask, np.arange(num_per_image), exclude, wseed,
                              settings, desc=f"outpaint {step + 1}", decode=False, **kw)
      Z[:, rs, cs] = lat
      known[r:r + grid[0], c:c + grid[1]] = True
      step += 1
    images = to_uint8(parallel.to_host(self._decode_canvas()(self.decoder_params, Z)))
    return (images, Z) if return_latents else images

  def _check_editing(self, num_per_image: int) -> None:
    if num_per_image < 1:
      raise ConfigError(f"num_per_image={num_per_image}: ask for at least one.")
    if not unet.uses_retrieval(self.model.variant):
      raise ConfigError(f"editing needs a model that retrieves (variant {self.model.variant!r} "
                        "does not): the kept blocks reach the rest through the neighbours they "
                        "select. Fix: use a rissole, full or rdm model.")

  def _settings_from(self, kw: dict) -> Settings:
    """The sampling settings named in `kw` (removed from it)."""
    return self.settings(**{k: kw.pop(k, None) for k in
                            ("sampler", "steps", "eta", "guidance", "order", "spacing", "t_break")})

  def _complete(self, z, mask, rows, exclude, seed, settings, decode: bool = True,
                follow: bool = True, **kw):
    """(images or None, latents) completing each latent z[i] (training size)
    from its blocks where `mask` (gh, gw) is True; exclude[rows[i]]: database
    ids its neighbours never are (copies of the user's image)."""
    from rissole_jax.inference import editing
    ids = editing.masked_neighbours(self.db.latents, z, mask, int(self.stats["k"]),
                                    [exclude[i] for i in rows])
    lm = editing.latent_mask(mask, z.shape[1:3])
    out, lat = self.generate(ids, seed=seed, settings=settings, keep=(z, lm),
                             return_latents=True, decode=decode, follow=follow, **kw)
    return out, lat

  def _decode_canvas(self):
    """jit(decode) for latents of any size (the VQ-GAN is convolutional)."""
    if "decode_canvas" not in self._fns:
      decode = self.decode_fn
      self._fns["decode_canvas"] = jax.jit(lambda p, z: decode(p, jnp.asarray(z)))
    return self._fns["decode_canvas"]

  # -- another database ------------------------------------------------------------

  def with_database(self, source, *, directory=None, progress: bool = True) -> "Sampler":
    """A sampler that retrieves from another database: a folder of images (a
    path, or "folder:PATH"), an array of images (N, H, W[, C]) or a list of
    images, or a dataset name ("mnist_embedded", "celeb_a", ...: its train
    split). Encoded and indexed once, cached under `directory` (default: a
    folder keyed by the autoencoder and the source in the user cache)."""
    from rissole_jax import retrieval
    src = sources.database_source(source, self.config)
    k = int(self.stats["k"])
    if len(src) < k + 1:
      raise DataError(f"the database {src.name} has {len(src)} images, but the model retrieves "
                      f"k={k} neighbours (never an item itself), so it needs at least {k + 1}. "
                      "Fix: add images, or use a model trained with a smaller retrieval.k.")
    if directory is None:
      from rissole_jax.runtime.cache import user_cache_dir
      directory = user_cache_dir() / "databases" / sources.database_key(
          self.ae.fingerprint, src.name, self.config, self.image_shape)
    db = retrieval.build_database(self.ae, src, self.config, Path(directory),
                                  say=log.info, progress=_bar if progress else None)
    out = copy.copy(self)   # same model: the same compiled code serves it
    out.db = SamplingDatabase.from_retrieval(db, codes_lib.codebook_of(self.ae.params))
    out._db_norm = None
    return out

  def quantized(self, mode: str) -> "Sampler":
    """This sampler with its denoiser and VQ-GAN decoder quantized to int8
    ('int8_weights': int8 weights, float compute; 'int8': int8 weights and
    activations with static scales calibrated on the database), see
    rissole_jax/inference/quantize.py. 'none' returns this sampler."""
    from rissole_jax.inference import quantize
    quantize.check_mode(mode)
    if mode == self.quantization:
      return self
    if self.quantization != "none":
      raise ConfigError(f"this sampler is already quantized ({self.quantization}); quantize the "
                        "float one.")
    q = quantize.quantize_parts(self, mode)
    out = copy.copy(self)
    out.model, out.params, out.quantization, out.students = q.model, q.params, mode, q.students
    out.decode_fn, out.decoder_params = q.decode_fn, q.ae_params
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
