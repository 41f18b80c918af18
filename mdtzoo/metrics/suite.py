"""The ADM suite as registered metrics: each maps (sample features, reference) to named numbers.

    feats = extract_features(batches, extractor)               # Features of the samples
    METRICS.build("fid", samples=feats, ref=reference)         # {"fid": 3.94}

A metric is ``fn(samples: Features, ref: Reference, **options) -> dict[str, float]``;
options are gin-bindable (``metrics.inception_score.split_size = 5000``). A new metric
(KID, CLIP score, ...) is one registered function; ``evaluate`` runs the names it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from mdtzoo.metrics.frechet import frechet_distance, gaussian_stats
from mdtzoo.metrics.inception_score import inception_score
from mdtzoo.metrics.precision_recall import precision_recall
from mdtzoo.registry import METRICS

# An extractor maps uint8 images (B, H, W, 3) to {"pool": (B, Dp), "spatial": (B, Ds), "probs": (B, C)}.
Extractor = Callable[[np.ndarray], Mapping[str, np.ndarray]]
FEATURE_KEYS = ("pool", "spatial", "probs")


@dataclass
class Features:
    """Per-image features of a set: pool (N, 2048), spatial (N, 2023), probs (N, 1008); labels (N,) or None."""

    pool: np.ndarray
    spatial: np.ndarray
    probs: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pool)


def extract_features(batches: Iterable[np.ndarray], extractor: Extractor, labels: np.ndarray | None = None) -> Features:
    """Run ``extractor`` over uint8 batches (B, H, W, 3) and stack its outputs (float32)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    for batch in batches:
        out = extractor(batch)
        for k in FEATURE_KEYS:
            v = np.asarray(out[k], dtype=np.float32)
            parts[k].append(v.reshape(len(v), -1))
    if not parts["pool"]:
        raise ValueError("no images to extract features from")
    return Features(**{k: np.concatenate(v) for k, v in parts.items()}, labels=labels)


@METRICS.register("inception_score")
def inception_score_metric(samples: Features, ref=None, split_size: int = 5000) -> dict[str, float]:
    """Inception Score: 1008-way softmax, consecutive unshuffled splits of 5000 (ADM)."""
    return {"inception_score": inception_score(samples.probs, split_size=split_size, labels=samples.labels)}


@METRICS.register("fid")
def fid_metric(samples: Features, ref) -> dict[str, float]:
    """FID: Fréchet distance of pool_3 (2048-d) Gaussians, float64, 1e-6 fallback (ADM)."""
    return {"fid": frechet_distance(*gaussian_stats(samples.pool), ref.mu, ref.sigma)}


@METRICS.register("sfid")
def sfid_metric(samples: Features, ref) -> dict[str, float]:
    """sFID: Fréchet distance of mixed_6/conv[..., :7] (17x17x7 = 2023-d) Gaussians (ADM)."""
    return {"sfid": frechet_distance(*gaussian_stats(samples.spatial), ref.mu_s, ref.sigma_s)}


@METRICS.register("precision_recall")
def precision_recall_metric(samples: Features, ref, k: int = 3, batch_size: int = 10_000) -> dict[str, float]:
    """Improved precision/recall on pool_3: k=3 NN balls, reference subset of 10k (ADM)."""
    precision, recall = precision_recall(ref.pool, samples.pool, k=k, batch_size=batch_size)
    return {"precision": precision, "recall": recall}


# ADM prints these, in this order (evaluations/evaluator.py main()).
ADM_SUITE = ("inception_score", "fid", "sfid", "precision_recall")
