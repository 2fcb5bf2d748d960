"""Datasets (embedded MNIST, tfds catalogue, image folders) and the input pipeline."""
from rissole_jax.data.pipeline import (RowCount, TrainStream, eval_batches, load_all, to_float,
                                       to_uint8)
from rissole_jax.data.sources import (HELDOUT, TRAIN, ArraySource, DataError, load_source)
