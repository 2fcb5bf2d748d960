"""Stage 'evaluate': the numbers a user picks a model by (see docs/metrics.md).

Reads DIR/sample/samples.npy (uint8 (n, H, W, C)) and compares it with a
fixed reference of real images (evaluate.reference: by default half of all
the dataset's images, the other half the pool of the real-data floor), never
with reconstructions:
  classifier/*     Fréchet distance, KID, precision/recall, density/coverage
                   in a small CNN's features ("classifier FD": quick, NOT
                   comparable with Inception FID), each with a 95% bootstrap
                   interval (_lo, _hi), the real-data floor (floor/<metric>/
                   mean, std, min, max, se) and the gap to it (_gap, _gap_lo,
                   _gap_hi); confident fraction, the CNN's accuracy
  inception/*      the same with fid (if the weights are installed; its own n)
  seam_score       cross-block seams (1.0: as invisible as in real images)
  memorization/*   nearest-training-image distance ratios
  reconstruction/* the VQ-GAN's reconstructions of the held-out images
                   against the same images: the autoencoder's ceiling
Also writes DIR/evaluate/bootstrap.npz (every metric's bootstrap replicates,
read by the benchmark table) and floors.json (every floor draw).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from rissole_jax.stages import workdir as wd
from rissole_jax.data import HELDOUT, to_float, to_uint8
from rissole_jax.errors import ConfigError, DataError, check_choice
from rissole_jax.metrics import classifier as clf_lib
from rissole_jax.metrics import floor as floor_lib
from rissole_jax.metrics.protocol import REFERENCES, Protocol, with_floor
from rissole_jax.metrics import frechet, inception, memorization, prdc, seams
from rissole_jax.metrics import scores as scores_lib
from rissole_jax import files


def inception_mode(value) -> str:
  """'auto' | 'required' | 'off' from the config value (strings or booleans)."""
  v = str(value).strip().lower()
  if v in ("auto", ""):
    return "auto"
  if v in ("true", "1", "on", "yes", "required"):
    return "required"
  if v in ("false", "0", "off", "no", "none"):
    return "off"
  raise ConfigError(f"evaluate.inception={value!r}: use 'auto', 'required' (or True) or "
                    "'off' (or False).")


def load_samples(sample_dir) -> np.ndarray:
  path = sample_dir / "samples.npy"
  if not path.exists():
    raise DataError(f"No samples at {path}. Fix: run the sample stage first "
                    "(python -m rissole_jax.main ... --only sample).")
  fix = (f"Fix: rerun the pipeline: the sample stage ({sample_dir}) remakes it.")
  try:
    x = files.load_npy(path, fix)
  except DataError:
    wd.mark_unfinished(sample_dir)
    raise
  if x.dtype != np.uint8 or x.ndim != 4:
    raise DataError(f"{path} must hold uint8 images (n, H, W, C); got {x.dtype} {x.shape}.")
  return x


def feature_metrics(real: np.ndarray, fake: np.ndarray, ev) -> dict:
  """FD, KID and precision/recall of `fake` against `real` features."""
  out = {"fd": frechet.frechet_distance_features(real, fake)}
  out["kid"], out["kid_std"] = frechet.kid(real, fake, ev.kid_subsets, ev.kid_subset_size)
  k = min(ev.pr_k, len(real) - 1, len(fake) - 1)
  out["precision"], out["recall"] = prdc.precision_recall(real, fake, k)
  return out


def _seam_metrics(samples, real, grid, ctx) -> dict:
  size = samples.shape[1]
  try:
    return {"seam_score": seams.seam_score(samples, real, grid),
            "seam_ratio_real": seams.boundary_ratio(real, grid)}
  except ValueError as e:  # a 1x1 grid has no seams; a grid that does not divide the image
    ctx.log("seam score skipped: %s (image %d px, grid %s)", e, size, tuple(grid))
    return {}


def _reconstructions(ctx, heldout) -> tuple[np.ndarray, str] | None:
  """VQ-GAN reconstructions of the held-out images and the autoencoder's
  fingerprint, or None when there is no trained autoencoder in this workdir."""
  if "vqgan" not in ctx.config.stages or not ctx.dir("vqgan").is_dir():
    return None
  try:
    from rissole_jax.models.autoencoder import load_autoencoder
    ae = load_autoencoder(ctx.config, ctx.dir("vqgan"))
  except (ImportError, DataError, FileNotFoundError) as e:
    ctx.log("reconstruction metrics skipped: %s", str(e).splitlines()[0])
    return None
  batch = ctx.config.encode.batch_size
  recon = ae.decode(ae.encode(to_float(heldout), batch), batch)
  return to_uint8(recon), ae.fingerprint


def _inception(net, images, ctx, desc) -> np.ndarray:
  """Inception features with a progress bar (minutes on a CPU)."""
  with ctx.progress(total=len(images), desc=desc) as bar:
    return net(images, progress=bar.update)


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
  t0 = time.perf_counter()
  yield
  seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def run(ctx) -> dict:
  cfg, ev = ctx.config, ctx.config.evaluate
  mode = inception_mode(ev.inception)
  check_choice("evaluate.reference", ev.reference, REFERENCES)   # before any work
  if ev.floor_draws < 1 or ev.bootstrap < 0:
    raise ConfigError(f"evaluate.floor_draws={ev.floor_draws}, evaluate.bootstrap="
                      f"{ev.bootstrap}: every metric needs its floor (at least 1 draw; 5 by "
                      "default) and the bootstrap at least 0 replicates (200 by default).")
  seconds: dict = {}
  # Look the weights up first: "required" without them fails before any work.
  weights = None
  if mode != "off":
    weights = inception.find_weights(ev.get("inception_weights"), required=mode == "required")
    if weights is None:
      ctx.log("Inception FID skipped: weights not installed (%s)", inception.INSTALL_HINT)
  samples = load_samples(ctx.dir("sample"))
  with _timed(seconds, "load_data"):
    proto = Protocol(cfg, log=ctx.log)
    held, ref_images, pool, train = proto.held, proto.reference_images, proto.pool, proto.train
  if samples.shape[1:] != held.shape[1:]:
    raise DataError(f"samples are {samples.shape[1:]} images, the held-out split "
                    f"{held.shape[1:]}: the sample stage must produce the dataset's size.")
  n = proto.scored_n(len(samples))
  if n < len(samples):
    ctx.log("WARNING: the floor pool holds %d real images: scoring the first %d of %d samples "
            "so that the floor has the same n", len(pool), n, len(samples))
  scored = samples[:n]
  ctx.log("evaluating %d samples against a reference of %d real images (%s); real-data floor: "
          "%d draws of %d from a pool of %d", n, len(ref_images), ev.reference, ev.floor_draws,
          n, len(pool))
  metrics: dict = {"n_samples": len(samples), "n_scored": n, "n_reference": len(ref_images),
                   "n_floor_pool": len(pool), "n_heldout": len(held),
                   "floor_draws": ev.floor_draws, "bootstrap_replicates": ev.bootstrap}
  floors, replicates = {}, {}

  # Classifier features: always (seconds on a CPU once the classifier is cached).
  with _timed(seconds, "classifier_train"):
    clf = proto.clf
  with _timed(seconds, "classifier_metrics"):
    c, reps = proto.score(scored, cfg.seed)
    replicates.update({f"classifier/{m}": r for m, r in reps.items()})
  floors["classifier"] = proto.floor(n)   # (cached by the score above)
  c["heldout_accuracy"] = clf.heldout_accuracy
  if clf.task == "labels":
    c["confident_fraction"] = float((clf.probs(scored).max(-1) > ev.confidence).mean())
    c["confident_fraction_real"] = float((clf.probs(held).max(-1) > ev.confidence).mean())
  metrics["classifier"] = c

  with _timed(seconds, "seams"):
    metrics.update(_seam_metrics(samples, held, cfg.blocks.grid, ctx))
  with _timed(seconds, "memorization"):
    metrics["memorization"] = memorization.memorization_metrics(samples, train, held, ev.near_copy)

  net = None
  if weights is not None:
    net = inception.InceptionFeatures(weights, ev.inception_batch)
    with _timed(seconds, "inception"):
      # Its own n: on a CPU the network runs at ~2 images/s (docs/metrics.md).
      n_inc = min(ev.inception_num, n)
      inc_ref = ref_images[:ev.inception_reference] if ev.inception_reference else ref_images
      key = {**proto.data_key, "n_reference": len(inc_ref), "features": "inception_pool3",
             "weights": net.weights_hash}
      i_ref, _, _ = frechet.cached_features(
          proto.cache, key, lambda: _inception(net, inc_ref, ctx, "inception reference"))
      i_samp = _inception(net, scored[:n_inc], ctx, "inception samples")
      ireference = scores_lib.Reference(i_ref, ev.pr_k, ev.dc_k)
      ipoint, ireps = ireference.score(i_samp, ev.bootstrap, cfg.seed)
      ic = scores_lib.summarise(ipoint, ireps)
      replicates.update({f"inception/{'fid' if m == 'fd' else m}": r for m, r in ireps.items()})
      floors["inception"] = floor_lib.real_floor(
          ireference, len(pool), lambda rows: _inception(net, pool[rows], ctx, "inception floor"),
          n_inc, proto.seeds, proto.cache, {**key, **clf_lib.numerics()}, log=ctx.log,
          replicates=ev.bootstrap)
      with_floor(ic, ipoint, floors["inception"])
      metrics["inception"] = {**_renamed(ic), "n_scored": n_inc, "n_reference": len(inc_ref)}

  if ev.reconstruction:
    with _timed(seconds, "reconstruction"):
      rec = _reconstructions(ctx, held)
      if rec is not None:
        recon, ae_fp = rec
        r = {"classifier_fd": frechet.frechet_distance_features(clf.features(held),
                                                                clf.features(recon)),
             "seam_score": _seam_metrics(recon, held, cfg.blocks.grid, ctx).get("seam_score"),
             "mse": float(np.mean((to_float(recon) - to_float(held)) ** 2))}
        if net is not None:
          hkey = {"dataset": proto.data_key["dataset"], "split": HELDOUT, "n": len(held),
                  "shape": held.shape[1:], "content": frechet.content_hash(held),
                  "features": "inception_pool3", "weights": net.weights_hash}
          i_held, _, _ = frechet.cached_features(
              proto.cache, hkey, lambda: _inception(net, held, ctx, "inception held-out"))
          i_rec, _, _ = frechet.cached_features(
              proto.cache, {**hkey, "reconstructed_by": ae_fp},
              lambda: _inception(net, recon, ctx, "inception reconstructions"))
          r["fid"] = frechet.frechet_distance_features(i_held, i_rec)
        metrics["reconstruction"] = {k: v for k, v in r.items() if v is not None}

  metrics["seconds_by_part"] = seconds
  if ctx.is_main:
    save_bootstrap(ctx.stage_dir, replicates, n=n, seed=cfg.seed)
    files.atomic_write_json(ctx.stage_dir / "floors.json", floors)
  _log_summary(ctx, metrics)
  return metrics


def _renamed(d: dict) -> dict:
  """fd -> fid in every key (Inception's Fréchet distance is FID)."""
  out = {}
  for k, v in d.items():
    k2 = "fid" + k[2:] if k.startswith("fd") else k
    out[k2] = _renamed(v) if isinstance(v, dict) else v
  return out


BOOTSTRAP_FILE = "bootstrap.npz"


def save_bootstrap(stage_dir, replicates: dict, n: int, seed: int) -> None:
  """The bootstrap replicates of every metric ("classifier/fd", ...), for the
  benchmark's row-to-row differences."""
  import io
  buf = io.BytesIO()
  np.savez(buf, **{k.replace("/", "__"): np.asarray(v, np.float64) for k, v in replicates.items()},
           _n=np.int64(n), _seed=np.int64(seed))
  files.atomic_write_bytes(stage_dir / BOOTSTRAP_FILE, buf.getvalue())


def load_bootstrap(stage_dir) -> dict[str, np.ndarray]:
  """{metric key: replicates} saved by the evaluate stage; {} if absent."""
  path = stage_dir / BOOTSTRAP_FILE
  if not path.exists():
    return {}
  try:
    with np.load(path) as z:
      return {k.replace("__", "/"): z[k] for k in z.files if not k.startswith("_")}
  except (OSError, ValueError):
    return {}


def _log_summary(ctx, m) -> None:
  def line(name, d, key, fmt="%.3f"):
    if key not in d:
      return
    f = d.get("floor", {}).get(key if key != "fid" else "fid")
    text = f"{name} {fmt % d[key]}"
    if f"{key}_lo" in d:
      text += f" [{fmt % d[key + '_lo']}, {fmt % d[key + '_hi']}]"
    if f:
      text += f"; real-data floor {fmt % f['mean']} ± {fmt % f['std']}, gap {fmt % d[key + '_gap']}"
    ctx.log("%s", text)
  c = m["classifier"]
  ctx.log("%d samples against %d reference images; 95%% bootstrap intervals in brackets",
          m["n_scored"], m["n_reference"])
  for key in ("fd", "kid", "precision", "recall", "density", "coverage"):
    line(f"classifier {key}" + (" (not comparable with Inception FID)" if key == "fd" else ""),
         c, key, "%.5f" if key == "kid" else "%.3f")
  if "inception" in m:
    line("Inception FID", m["inception"], "fid")
  if "seam_score" in m:
    ctx.log("seam score %.3f (1.0: as in real images)", m["seam_score"])
  mem = m["memorization"]
  ctx.log("memorisation: median ratio %.3f, near copies %.1f%%", mem["median_ratio"],
          100 * mem["near_copy_fraction"])
