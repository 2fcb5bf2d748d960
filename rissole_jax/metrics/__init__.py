"""Sample-quality metrics (see docs/metrics.md).

  frechet      statistics, frechet_distance, kid, cached reference features
  inception    the FID InceptionV3 in Flax, weights lookup (never downloaded)
  classifier   a small CNN trained once per dataset: quick "classifier FD"
  prdc         k-NN precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020)
  scores       every feature metric against a fixed reference, with bootstrap replicates
  floor        the real-data floor: the same metrics for real images, cached
  seams        cross-block seam score (1.0: as invisible as in real images)
  memorization nearest-training-image distance ratios
"""
from rissole_jax.metrics.frechet import (cached_features, frechet_distance,
                                         frechet_distance_features, kid, statistics)
from rissole_jax.metrics.inception import (InceptionFeatures, InceptionWeightsMissing,
                                           find_weights)
from rissole_jax.metrics.memorization import memorization_metrics, nearest_distances
from rissole_jax.metrics.prdc import density_coverage, precision_recall
from rissole_jax.metrics.seams import boundary_ratio, seam_score, shuffle_blocks
