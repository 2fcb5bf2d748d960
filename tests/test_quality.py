"""The quality instrument (issue 23): closed forms, hand-computed toy cases, the
real-data floor, bootstrap intervals and the benchmark's beyond-the-noise
marks. Synthetic features only: no trained model, a few seconds in all."""
from __future__ import annotations

import numpy as np
import pytest

from rissole_jax.metrics import floor as floor_lib
from rissole_jax.metrics import frechet, prdc, scores


def gaussian(n, d, seed, shift=0.0, scale=1.0):
  """n draws of one correlated Gaussian (the same mixing for every seed)."""
  mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
  return np.random.default_rng(seed).normal(size=(n, d)) @ mix * scale + shift


# ---- Fréchet distance: the closed form ----------------------------------------------


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
  # A rotated full covariance and c^2 times it: |dmu|^2 + (1 - c)^2 tr(S).
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s = q @ np.diag(a) @ q.T
  closed = ((mu1 - mu2) ** 2).sum() + (1 - 1.7) ** 2 * a.sum()
  assert frechet.frechet_distance(mu1, s, mu2, 1.7 ** 2 * s) == pytest.approx(closed, rel=1e-10)
  # From features: the scorer's FD is the plain FD, and many draws approach the closed form.
  x = rng.normal(size=(20000, d)) * np.sqrt(a) + mu1
  y = rng.normal(size=(20000, d)) * np.sqrt(b) + mu2
  closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  ref = scores.Reference(x[:1000])
  assert ref.score(y[:800])[0]["fd"] == pytest.approx(
      frechet.frechet_distance_features(x[:1000], y[:800]), rel=1e-9)
  assert frechet.frechet_distance_features(x, y) == pytest.approx(closed, rel=0.03)


def test_the_scorer_agrees_with_the_plain_metrics_in_both_fd_routes():
  real, fake = gaussian(120, 8, 0), gaussian(90, 8, 1, shift=0.3)
  point, _ = scores.Reference(real, pr_k=3, dc_k=5).score(fake)
  assert point["fd"] == pytest.approx(frechet.frechet_distance_features(real, fake), rel=1e-9)
  assert (point["precision"], point["recall"]) == prdc.precision_recall(real, fake, 3)
  assert (point["density"], point["coverage"]) == pytest.approx(prdc.density_coverage(real, fake, 5))
  # KID over the whole sets: the unbiased MMD^2 written out.
  k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
  kxx, kyy = k(real, real), k(fake, fake)
  n, m = len(real), len(fake)
  mmd = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
         - 2 * k(real, fake).mean())
  assert point["kid"] == pytest.approx(mmd, rel=1e-9)
  # More dimensions than vectors: the n-space route gives the same FD.
  real, fake = gaussian(40, 64, 2), gaussian(30, 64, 3, shift=0.2)
  point, reps = scores.Reference(real).score(fake, replicates=3)
  assert point["fd"] == pytest.approx(frechet.frechet_distance_features(real, fake), rel=1e-8)
  assert len(reps["fd"]) == 3 and np.isfinite(reps["fd"]).all()


# ---- density and coverage: a hand-computed toy ------------------------------------------


def test_density_and_coverage_on_a_toy_set_against_hand_computed_values():
  """Real points 0, 1, 2, 10, 11 on a line: with k=1 every ball has radius 1.
  Samples 0.5, 1.5, 9.5, 20:
    density: 0.5 is in the balls of 0 and 1, 1.5 in those of 1 and 2, 9.5 in
      that of 10 (11 is 1.5 away), 20 in none: (2 + 2 + 1 + 0) / (k=1 * 4) = 1.25
    coverage: 0, 1, 2 and 10 have a sample within 1, 11 does not: 4/5 = 0.8
    precision (k=1, boundary inside): 3 of the 4 samples are in a real ball: 0.75
    recall: the outlying sample 20 has a ball of radius 10.5 (to 9.5), which
      with 9.5's (radius 8) holds every real point: 1.0. Coverage uses only the
      real balls, so the outlier buys it nothing."""
  line = lambda xs: np.stack([np.asarray(xs, float), np.zeros(len(xs))], 1)  # noqa: E731
  real, fake = line([0, 1, 2, 10, 11]), line([0.5, 1.5, 9.5, 20])
  assert prdc.density_coverage(real, fake, k=1) == (1.25, 0.8)
  assert prdc.precision_recall(real, fake, k=1) == (0.75, 1.0)
  point, _ = scores.Reference(real, pr_k=1, dc_k=1).score(fake)
  assert (point["density"], point["coverage"], point["precision"], point["recall"]) == (
      1.25, 0.8, 0.75, 1.0)


def test_density_is_about_one_and_coverage_high_for_samples_like_the_real_set():
  real, same = gaussian(1000, 8, 0), gaussian(1000, 8, 1)
  density, coverage = prdc.density_coverage(real, same, k=5)
  assert 0.85 < density < 1.15 and coverage > 0.9
  # Samples collapsed on one region: dense where they are, covering little.
  collapsed = gaussian(1000, 8, 2, scale=0.2)
  density, coverage = prdc.density_coverage(real, collapsed, k=5)
  assert density > 1.2 and coverage < 0.3


# ---- the real-data floor ------------------------------------------------------------------


def test_floor_of_real_vs_real_is_small_and_of_noise_vs_real_large(tmp_path):
  everything = gaussian(1200, 16, 0)
  ref_feats, pool = everything[:600], everything[600:]
  reference = scores.Reference(ref_feats)
  calls = []

  def features_of(rows):
    calls.append(len(rows))
    return pool[rows]

  key = {"dataset": "toy", "features": "identity"}
  fl = floor_lib.real_floor(reference, len(pool), features_of, 200, [0, 1, 2], tmp_path, key,
                            replicates=50)
  assert set(fl) == set(scores.METRICS) and len(fl["fd"]["draws"]) == 3
  assert all(fl[m]["se"] > 0 for m in scores.METRICS)
  assert len(calls) == 1  # one call for the union of the draws
  again = floor_lib.real_floor(reference, len(pool), features_of, 200, [0, 1, 2], tmp_path, key,
                               replicates=50)
  assert again == fl and len(calls) == 1  # cached
  floor_lib.real_floor(reference, len(pool), features_of, 200, [0, 1, 3], tmp_path, key,
                       replicates=50)
  assert len(calls) == 2  # other seeds: another floor

  # New real images from the same distribution score inside the floor's range ...
  real_point, real_reps = reference.score(gaussian(200, 16, 7), replicates=100, seed=0)
  spread = max(fl["fd"]["std"], 1e-9)
  assert abs(real_point["fd"] - fl["fd"]["mean"]) < 4 * spread + 0.1 * fl["fd"]["mean"]
  assert abs(real_point["coverage"] - fl["coverage"]["mean"]) < 0.1
  # ... noise is far above it, and its gap's interval is far from 0.
  noise = np.random.default_rng(8).uniform(-3, 3, (200, 16))
  point, reps = reference.score(noise, replicates=100, seed=0)
  summary = scores.summarise(point, reps)
  gaps = floor_lib.gaps(point, summary, fl)
  assert point["fd"] > 5 * fl["fd"]["mean"] and gaps["fd_gap_lo"] > 20 * spread
  assert point["coverage"] < 0.5 * fl["coverage"]["mean"]
  assert gaps["coverage_gap_hi"] < 0


def test_floor_draws_come_from_the_pool_without_replacement():
  rows = floor_lib.draw_rows(50, 20, seed=3)
  assert len(np.unique(rows)) == 20 and rows.max() < 50
  assert np.array_equal(rows, floor_lib.draw_rows(50, 20, seed=3))
  with pytest.raises(ValueError, match="pool"):
    floor_lib.draw_rows(10, 20, seed=0)


# ---- bootstrap intervals -------------------------------------------------------------------


def test_two_sample_seeds_of_one_model_give_overlapping_intervals():
  reference = scores.Reference(gaussian(800, 16, 0))
  s1 = scores.summarise(*reference.score(gaussian(400, 16, 1), replicates=200, seed=0))
  s2 = scores.summarise(*reference.score(gaussian(400, 16, 2), replicates=200, seed=1))
  worse = scores.summarise(*reference.score(gaussian(400, 16, 3, shift=0.5), replicates=200))
  for m in scores.METRICS:
    assert s1[f"{m}_lo"] <= s1[m] <= s1[f"{m}_hi"], m
    assert s1[f"{m}_lo"] < s2[f"{m}_hi"] and s2[f"{m}_lo"] < s1[f"{m}_hi"], m
  assert worse["fd_lo"] > s1["fd_hi"]  # a shifted model is told apart


# ---- the benchmark table -------------------------------------------------------------------


def _row(name, reference, feats, seed, fl):
  from rissole_jax.benchmark import QUALITY
  point, reps = reference.score(feats, replicates=200, seed=seed)
  summary = scores.summarise(point, reps)
  cols = {key.split("/")[1]: col for col, key, _ in QUALITY if key.startswith("classifier/")}
  row = {"name": name, "n samples": len(feats), "intervals": {}, "floor": {}}
  for m, col in cols.items():
    row[col] = point[m]
    row["intervals"][col] = [summary[f"{m}_lo"], summary[f"{m}_hi"]]
    row["floor"][col] = [fl[m]["mean"], fl[m]["std"], fl[m]["se"]]
  return row, {f"classifier/{m}": r for m, r in reps.items()}


def test_benchmark_marks_a_reseeded_model_within_noise_and_a_worse_one_worse():
  from rissole_jax import benchmark
  everything = gaussian(1600, 16, 0)
  reference = scores.Reference(everything[:800])
  pool = everything[800:]
  fl = floor_lib.real_floor(reference, len(pool), lambda rows: pool[rows], 400, [0, 1, 2],
                            replicates=50)
  # The "model": a slightly too narrow Gaussian; sampled with two seeds, and damaged.
  rows, reps = [], {}
  for name, feats, seed in (("base", gaussian(400, 16, 11, scale=0.9), 0),
                            ("base_seed1", gaussian(400, 16, 12, scale=0.9), 1),
                            ("damaged", gaussian(400, 16, 13, scale=0.9, shift=0.4), 2)):
    row, reps[name] = _row(name, reference, feats, seed, fl)
    rows.append(row)
  benchmark.compare(rows, reps)
  verdicts = {r["name"]: r["verdict"] for r in rows}
  assert verdicts == {"base": "baseline", "base_seed1": "within noise", "damaged": "worse"}
  assert rows[2]["vs_baseline"]["FD (classifier)"]["mark"] == "worse"
  assert rows[2]["vs_baseline"]["FD (classifier)"]["lo"] > 0
  table = benchmark.markdown(rows)
  cells = table.split("\n\n")[0]
  assert "**worse**" in cells and "**better**" not in cells
  assert cells.count("**worse**") == len([m for m in rows[2]["vs_baseline"].values()
                                          if m["mark"] == "worse"])
  assert "- `base_seed1`: within noise, no measurable difference from `base`." in table
  assert "- `damaged`: worse than `base`: FD (classifier) worse" in table
  assert "Real-data floor" in table and "not a tie" in table
  # A row without replicates is not judged.
  rows.append({"name": "old", "FD (classifier)": 1.0})
  benchmark.compare(rows, reps)
  assert rows[-1]["verdict"] == "not compared"


def test_benchmark_directions_coverage_past_the_floor_is_not_worse():
  """recall and coverage: higher is better, even past the floor; precision and
  density: nearer the floor; FD lower."""
  from rissole_jax import benchmark
  rng = np.random.default_rng(0)
  cols = {"FD (classifier)": ("classifier/fd", 9.0, 6.0, 2.5),
          "precision": ("classifier/precision", 0.97, 0.98, 0.895),
          "coverage": ("classifier/coverage", 0.954, 0.971, 0.945),
          "recall": ("classifier/recall", 0.65, 0.69, 0.895)}
  base, row, reps = {"name": "base"}, {"name": "v"}, {"base": {}, "v": {}}
  base["floor"] = {}
  for col, (key, a, b, floor) in cols.items():
    base[col], row[col], base["floor"][col] = a, b, [floor, 0.0, 0.0]
    noise = rng.normal(0, 1e-3, 200)
    reps["base"][key], reps["v"][key] = a + noise, b + noise
  benchmark.compare([base, row], reps)
  marks = {c: m["mark"] for c, m in row["vs_baseline"].items()}
  assert marks == {"FD (classifier)": "better", "precision": "worse", "coverage": "better",
                   "recall": "better"}


def test_benchmark_reads_the_evaluate_stage_files(tmp_path):
  """collect/load_replicates read what the evaluate stage writes (metrics.json
  with intervals and floors, bootstrap.npz) and compare marks from them."""
  from rissole_jax import benchmark, files
  from rissole_jax.stages.evaluate import save_bootstrap
  from rissole_jax.stages.workdir import flat_numbers
  reference = scores.Reference(gaussian(300, 8, 0))
  pool = gaussian(300, 8, 1)
  fl = floor_lib.real_floor(reference, len(pool), lambda rows: pool[rows], 150, [0, 1],
                            replicates=20)
  for name, feats, seed in (("a", gaussian(150, 8, 2), 0), ("b", gaussian(150, 8, 3, shift=1.0), 1)):
    point, reps = reference.score(feats, replicates=100, seed=seed)
    c = scores.summarise(point, reps)
    c.update(floor_lib.gaps(point, c, fl))
    c["floor"] = {m: {k: v for k, v in f.items() if k != "draws"} for m, f in fl.items()}
    stage = tmp_path / name / "evaluate"
    stage.mkdir(parents=True)
    files.atomic_write_json(stage / "metrics.json", flat_numbers({"classifier": c,
                                                                   "n_scored": 150}))
    save_bootstrap(stage, {f"classifier/{m}": r for m, r in reps.items()}, n=150, seed=seed)
  rows = [{"name": n, **benchmark.collect(tmp_path / n)} for n in ("a", "b")]
  assert rows[0]["FD (classifier)"] > 0 and len(rows[0]["intervals"]["FD (classifier)"]) == 2
  assert rows[0]["floor"]["coverage"][0] == pytest.approx(fl["coverage"]["mean"])
  benchmark.compare(rows, benchmark.load_replicates(tmp_path, rows))
  assert rows[1]["verdict"] == "worse"
  assert "- `b`: worse than `a`" in benchmark.markdown(rows)


def test_sampling_bench_rows_reuse_the_baseline_model(tmp_path):
  """configs/bench/sampling.py: every row differs from the baseline only from
  the sample stage on, so the runner links the trained stages instead of
  training again (and every row's override acts: its sample stage differs)."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from configs.bench import sampling
  from rissole_jax.benchmark import with_overrides
  from rissole_jax.stages import stage_records
  bench = sampling.get_config()
  fps = lambda overrides: {r.directory.name: r.fingerprint for r in stage_records(
      with_overrides(bench.base, dict(overrides)), tmp_path)}
  base = fps({})
  assert bench.runs[0] == (bench.baseline, {})
  for name, overrides in bench.runs[1:]:
    row = fps(overrides)
    assert all(row[s] == base[s] for s in ("vqgan", "encode", "index", "diffusion")), name
    assert row["sample"] != base["sample"], name


def _bench_fingerprints(name: str, tmp_path):
  """(configs/bench/<name>.py's config, {row: {stage: fingerprint}})."""
  import importlib
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from rissole_jax.benchmark import with_overrides
  from rissole_jax.stages import stage_records
  bench = importlib.import_module(f"configs.bench.{name}").get_config()
  return bench, {row: {r.directory.name: r.fingerprint for r in stage_records(
      with_overrides(bench.base, dict(o)), tmp_path)} for row, o in bench.runs}


def test_variety_bench_rows_share_what_they_can(tmp_path):
  """configs/bench/variety.py: every row reuses the baseline's VQ-GAN, latents
  and index; the guided rows reuse the `dropout` row's denoiser; every
  override acts (each row's last stage differs from every other row's)."""
  bench, fps = _bench_fingerprints("variety", tmp_path)
  base = fps[bench.baseline]
  for name, row in fps.items():
    assert all(row[s] == base[s] for s in ("vqgan", "encode", "index")), name
    if name.startswith("dropout_g"):
      assert row["diffusion"] == fps["dropout"]["diffusion"], name
  assert fps["pp_dropout_g1.5"]["diffusion"] == fps["pp_dropout"]["diffusion"]
  assert len({row["sample"] for row in fps.values()}) == len(fps)


@pytest.mark.parametrize("preset", ["pg", "pr"])
def test_lego_skip_bench_rows_reuse_the_trained_lego_model(tmp_path, preset):
  """configs/bench/lego_skip.py: every row is the LEGO model of the bench
  matrix's rissole_lego_<preset> row with only t_break changed."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from configs.bench import default, lego_skip
  from rissole_jax.benchmark import with_overrides
  from rissole_jax.stages import stage_records
  bench, matrix = lego_skip.get_config(preset), default.get_config()
  fps = lambda base, o: {r.directory.name: r.fingerprint for r in stage_records(
      with_overrides(base, dict(o)), tmp_path)}
  lego_row = dict(matrix.runs)[f"rissole_lego_{preset}"]
  trained = fps(matrix.base, lego_row)
  rows = {name: fps(bench.base, o) for name, o in bench.runs}
  assert rows["t0"] == {k: v for k, v in trained.items()}
  for name, row in rows.items():
    assert all(row[s] == trained[s] for s in ("vqgan", "encode", "index", "diffusion")), name
  assert len({row["sample"] for row in rows.values()}) == len(rows)


def test_distill_bench_rows_share_one_model_and_one_distill_stage(tmp_path):
  """configs/bench/distill.py: every row samples the baseline's trained model;
  the student rows of the default distill settings share one distill stage,
  the longer-round rows another; every row's sample stage differs."""
  bench, fps = _bench_fingerprints("distill", tmp_path)
  base = fps[bench.baseline]
  for name, row in fps.items():
    assert all(row[s] == base[s] for s in ("vqgan", "encode", "index", "diffusion")), name
  students = [n for n in fps if n.startswith("distilled_")]
  assert len({fps[n]["distill"] for n in students if "long" not in n}) == 1
  assert len({fps[n]["distill"] for n in students}) == 2
  assert len({row["sample"] for row in fps.values()}) == len(fps)
