"""Stage 'evaluate': the numbers a user picks a model by (see docs/metrics.md).

Reads DIR/sample/samples.npy (uint8 (n, H, W, C)) and compares it with the
held-out real images, never with reconstructions or training images:
  classifier/*     Fréchet distance, KID, precision/recall in a small CNN's
                   features ("classifier FD": quick, NOT comparable with
                   Inception FID), confident fraction, the CNN's accuracy
  inception/*      FID, KID, precision/recall (if the weights are installed)
  seam_score       cross-block seams (1.0: as invisible as in real images)
  memorization/*   nearest-training-image distance ratios
  reconstruction/* the VQ-GAN's reconstructions of the held-out images
                   against the same images: the autoencoder's ceiling
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from rissole_jax.stages import workdir as wd
from rissole_jax.data import HELDOUT, TRAIN, load_all, load_source, to_float, to_uint8
from rissole_jax.errors import ConfigError, DataError
from rissole_jax.metrics import classifier as clf_lib
from rissole_jax.metrics import frechet, inception, memorization, prdc, seams
from rissole_jax import files

CLASSIFIER_SEED = 0  # the classifier is a measuring instrument: one per dataset, not per run


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


def load_capped(source, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The whole source, or a fixed random subset of `cap` rows if it is larger."""
  if cap <= 0 or len(source) <= cap:
    return load_all(source)
  rows = np.sort(np.random.default_rng(seed).choice(len(source), cap, replace=False))
  parts = [source.get(rows[s:s + 512]) for s in range(0, cap, 512)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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
  seconds: dict = {}
  cache = frechet.cache_dir(ev.get("cache_dir"))
  # Look the weights up first: "required" without them fails before any work.
  weights = None
  if mode != "off":
    weights = inception.find_weights(ev.get("inception_weights"), required=mode == "required")
    if weights is None:
      ctx.log("Inception FID skipped: weights not installed (%s)", inception.INSTALL_HINT)
  samples = load_samples(ctx.dir("sample"))
  with _timed(seconds, "load_data"):
    train_src, held_src = load_source(cfg.data, TRAIN), load_source(cfg.data, HELDOUT)
    train, train_labels = load_capped(train_src, ev.max_train_images, cfg.seed)
    held, held_labels = load_capped(held_src, ev.max_heldout_images, cfg.seed)
  if samples.shape[1:] != held.shape[1:]:
    raise DataError(f"samples are {samples.shape[1:]} images, the held-out split "
                    f"{held.shape[1:]}: the sample stage must produce the dataset's size.")
  ctx.log("evaluating %d samples against %d held-out images (%d training images)",
          len(samples), len(held), len(train))
  metrics: dict = {"n_samples": len(samples), "n_heldout": len(held)}
  data_key = {"dataset": held_src.name, "split": HELDOUT, "n": len(held),
              "shape": held.shape[1:], "content": frechet.content_hash(held)}

  # Classifier features: always (seconds on a CPU once the classifier is cached).
  with _timed(seconds, "classifier_train"):
    labelled = (train_labels >= 0).all()
    clf = clf_lib.load_or_train(train, train_labels if labelled else None, cache,
                                ev.classifier_steps, ev.classifier_batch, CLASSIFIER_SEED,
                                heldout=(held, held_labels), log=ctx.log)
  with _timed(seconds, "classifier_metrics"):
    f_held, f_samp = clf.features(held), clf.features(samples)
    c = feature_metrics(f_held, f_samp, ev)
    c["heldout_accuracy"] = clf.heldout_accuracy
    if clf.task == "labels":
      c["confident_fraction"] = float((clf.probs(samples).max(-1) > ev.confidence).mean())
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
      key = {**data_key, "features": "inception_pool3", "weights": net.weights_hash}
      i_held, _, _ = frechet.cached_features(
          cache, key, lambda: _inception(net, held, ctx, "inception held-out"))
      i_samp = _inception(net, samples, ctx, "inception samples")
      metrics["inception"] = feature_metrics(i_held, i_samp, ev)
      metrics["inception"]["fid"] = metrics["inception"].pop("fd")

  if ev.reconstruction:
    with _timed(seconds, "reconstruction"):
      rec = _reconstructions(ctx, held)
      if rec is not None:
        recon, ae_fp = rec
        r = {"classifier_fd": frechet.frechet_distance_features(f_held, clf.features(recon)),
             "seam_score": _seam_metrics(recon, held, cfg.blocks.grid, ctx).get("seam_score"),
             "mse": float(np.mean((to_float(recon) - to_float(held)) ** 2))}
        if net is not None:
          key = {**data_key, "features": "inception_pool3", "weights": net.weights_hash,
                 "reconstructed_by": ae_fp}
          i_rec, _, _ = frechet.cached_features(
              cache, key, lambda: _inception(net, recon, ctx, "inception reconstructions"))
          r["fid"] = frechet.frechet_distance_features(i_held, i_rec)
        metrics["reconstruction"] = {k: v for k, v in r.items() if v is not None}

  metrics["seconds_by_part"] = seconds
  _log_summary(ctx, metrics)
  return metrics


def _log_summary(ctx, m) -> None:
  c = m["classifier"]
  ctx.log("classifier FD (not comparable with Inception FID) %.3f, precision %.3f, "
          "recall %.3f", c["fd"], c["precision"], c["recall"])
  if "inception" in m:
    ctx.log("Inception FID %.3f, KID %.5f", m["inception"]["fid"], m["inception"]["kid"])
  if "seam_score" in m:
    ctx.log("seam score %.3f (1.0: as in real images)", m["seam_score"])
  mem = m["memorization"]
  ctx.log("memorisation: median ratio %.3f, near copies %.1f%%", mem["median_ratio"],
          100 * mem["near_copy_fraction"])
