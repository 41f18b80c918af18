"""Evaluation metrics of the ADM suite (what the MDT paper reports), on numpy feature arrays.

    frechet_distance(mu1, sigma1, mu2, sigma2)       # FID (pool_3) and sFID (mixed_6/conv)
    inception_score(probs, split_size=5000)          # probs: (N, 1008) softmax outputs
    precision_recall(real_features, fake_features)   # improved P/R, k = 3

The Inception-v3 feature extractor lives in ``mdtzoo.metrics.inception`` (imported on demand:
it needs a local weights file); reference batches in ``mdtzoo.metrics.reference``; the
registered metrics (``metrics.fid``, ``metrics.sfid``, ``metrics.inception_score``,
``metrics.precision_recall``) in ``mdtzoo.metrics.suite``. docs/evaluation.md has the details.
"""

from mdtzoo.metrics.frechet import RunningGaussian, frechet_distance, gaussian_stats
from mdtzoo.metrics.inception_score import class_sorted_gap, inception_score
from mdtzoo.metrics.precision_recall import manifold_radii, pairwise_sq_distances, precision_recall
from mdtzoo.metrics.suite import ADM_SUITE, Features, extract_features  # registers the metrics
from mdtzoo.metrics.reference import Reference, load_reference, make_reference, open_images

__all__ = [
    "ADM_SUITE",
    "Features",
    "Reference",
    "RunningGaussian",
    "class_sorted_gap",
    "extract_features",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "load_reference",
    "make_reference",
    "manifold_radii",
    "open_images",
    "pairwise_sq_distances",
    "precision_recall",
]
