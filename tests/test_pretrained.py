"""The model shipped in the package (rissole_jax/pretrained): in step with the
code, its provenance recorded, and its samples digits that the evaluate
classifier recognises."""
import numpy as np

from rissole_jax import Sampler, pretrained
from rissole_jax.inference import modelfile
from rissole_jax.pretrained import remake

REMAKE = (f"Fix: remake it ({pretrained.remake_command('mnist')}, about 10 minutes on 2 cores) "
          "and commit rissole_jax/pretrained/mnist.rissole.")


def test_shipped_model_is_in_step_with_the_code():
  manifest, _ = modelfile.read(pretrained.path("mnist"))
  assert manifest["version"] == modelfile.VERSION, (
      f"the shipped model is model-file format {manifest['version']}; this code writes "
      f"{modelfile.VERSION}. {REMAKE}")
  config = pretrained.config("mnist")
  assert manifest["model_fingerprint"] == modelfile.model_fingerprint(config), (
      "the default config no longer makes the shipped model (its diffusion-stage fingerprint "
      f"changed). {REMAKE}")
  assert manifest["weights"] == "int8"
  prov = manifest["provenance"]
  assert prov["command"].startswith("python -m rissole_jax.pretrained.remake mnist")
  assert prov["commit"] and prov["n_samples"] == config.sample.num
  assert set(prov["int8_vs_float"]) == set(remake.METRICS) and prov["verdict"]
  assert pretrained.path("mnist").stat().st_size < 2.5 * 2**20


def test_shipped_model_samples_digits_the_classifier_recognises(tmp_path_factory):
  from rissole_jax.data import HELDOUT, TRAIN, load_all, load_source
  from rissole_jax.metrics import classifier as clf_lib
  s = Sampler.pretrained("mnist")
  assert s.manifest["provenance"]["name"] == "mnist"
  images, queries = s.sample(16, seed=0, return_queries=True, progress=False)
  data = s.config.data
  # The evaluate stage's classifier, trained for fewer steps (held-out accuracy ~0.96).
  clf = clf_lib.load_or_train(*load_all(load_source(data, TRAIN)),
                              tmp_path_factory.mktemp("classifier"), 150, 64, 0,
                              heldout=load_all(load_source(data, HELDOUT)))
  assert clf.heldout_accuracy > 0.9
  probs = clf.probs(images)
  assert (probs.max(-1) > 0.9).mean() >= 0.7          # confidently digits (noise: ~0)
  assert (probs.argmax(-1) == s.db.labels[queries]).mean() >= 0.6   # and their query's digit
  assert len(set(probs.argmax(-1))) >= 4


def test_remake_verdict_and_table():
  row = lambda lo, hi: {"floor": 2.5, "float": 9.0, "float_lo": 8.0, "float_hi": 10.0,
                        "int8": 9.1, "diff": 0.1, "lo": lo, "hi": hi}
  same = {"fd": row(-0.5, 0.7), "recall": row(-0.01, 0.02)}
  assert remake.verdict(same).startswith("no measurable difference")
  better = {**same, "fd": {**row(-0.3, -0.1), "diff": -0.2}}
  assert remake.verdict(better).startswith("no loss against the float model: beyond the noise, "
                                           "fd -0.2 [-0.3, -0.1]; no measurable difference in recall")
  worse = {**same, "recall": {**row(-0.03, -0.01), "diff": -0.02}}
  assert remake.verdict(worse).startswith("worse than the float model beyond the noise in recall")
  text = remake.table({"int8_vs_float": same, "verdict": remake.verdict(same), "n_samples": 2000,
                       "seed": 0})
  assert "| fd | 2.5 | 9 [8, 10] | 9.1 | +0.1 [-0.5, +0.7] |" in text
