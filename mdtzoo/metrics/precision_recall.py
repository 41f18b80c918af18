"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ``ManifoldEstimator`` computes it.

    precision, recall = precision_recall(real_features, fake_features, k=3)   # (N, D) each

Each set's manifold is the union of balls around its points; a point's radius is the squared
distance to its k-th nearest neighbour *counting itself at distance 0* (ADM partitions each
distance row at positions 0..k and takes position k). A sample is covered if it lies within
the radius (<=) of ANY point of the other set. Precision = fraction of fake points on the real
manifold, recall = fraction of real points on the fake manifold.

Distances are blockwise (``batch_size`` rows x ``batch_size`` columns), so 50,000 x 10,000
feature sets need ~batch_size² floats at a time. ADM computes blocks in float16 (float32 if
that overflows); we use float32, which can move a point that sits on a ball's edge (see
docs/evaluation.md).
"""

from __future__ import annotations

import numpy as np


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances u: (n, D), v: (m, D) -> (n, m) float32, clamped at 0 like ADM."""
    u, v = u.astype(np.float32, copy=False), v.astype(np.float32, copy=False)
    d = np.einsum("ij,ij->i", u, u)[:, None] - 2 * (u @ v.T) + np.einsum("ij,ij->i", v, v)[None, :]
    return np.maximum(d, 0, out=d)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 10_000) -> np.ndarray:
    """Radius of each point: its (k+1)-th smallest squared distance to the set, self included.

    features: (N, D) -> (N,) float32. Rows and columns are processed in blocks; a row keeps
    its k+1 smallest distances seen so far.
    """
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors to find k nearest neighbours, got {n}")
    radii = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, batch_size):
        rows = features[r0 : r0 + batch_size]
        best = None  # (rows, <= k+1): the smallest distances so far, unordered
        for c0 in range(0, n, batch_size):
            d = pairwise_sq_distances(rows, features[c0 : c0 + batch_size])
            cand = d if best is None else np.concatenate([best, d], axis=1)
            best = np.partition(cand, k, axis=1)[:, : k + 1] if cand.shape[1] > k + 1 else cand
        radii[r0 : r0 + batch_size] = np.partition(best, k, axis=1)[:, k]
    return radii


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 10_000
) -> tuple[float, float]:
    """(precision, recall) of fake (M, D) against real (N, D) features, k-NN manifolds."""
    real, fake = np.asarray(real_features), np.asarray(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {real.shape} and {fake.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = manifold_radii(fake, k, batch_size)
    real_covered = np.zeros(len(real), dtype=bool)  # real point inside some fake ball -> recall
    fake_covered = np.zeros(len(fake), dtype=bool)  # fake point inside some real ball -> precision
    for r0 in range(0, len(real), batch_size):
        r1 = r0 + batch_size
        for f0 in range(0, len(fake), batch_size):
            f1 = f0 + batch_size
            d = pairwise_sq_distances(real[r0:r1], fake[f0:f1])  # (real block, fake block)
            real_covered[r0:r1] |= (d <= fake_radii[None, f0:f1]).any(axis=1)
            fake_covered[f0:f1] |= (d <= real_radii[r0:r1, None]).any(axis=0)
    return float(fake_covered.mean()), float(real_covered.mean())
