"""Fréchet distance between Gaussians fitted to features (FID on pool_3, sFID on mixed_6/conv).

    mu, sigma = gaussian_stats(features)          # features: (N, D)
    frechet_distance(mu, sigma, mu_ref, sigma_ref)

Follows ``FIDStatistics.frechet_distance`` of ADM's ``evaluations/evaluator.py`` (itself
TTUR's ``fid.py``): float64, ``scipy.linalg.sqrtm`` of the covariance product, and an
``eps·I`` fallback for singular products.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D), float64, covariance with ddof=1 as np.cov.

    ADM keeps mu in float32 (np.mean of float32 activations); float64 differs by ~1e-7 relative.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D) to fit a Gaussian, got {features.shape}")
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)


class RunningGaussian:
    """mu and sigma accumulated over batches of features, for sets too large to hold at once.

    Sums are taken around the first batch's mean (the shifted-data algorithm) so that
    ``E[x x^T] - mu mu^T`` does not cancel catastrophically.
    """

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, features: np.ndarray) -> None:
        """features: (B, D)."""
        x = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with ddof=1, equal to gaussian_stats of all batches."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return self.shift + mean, sigma


def _is_singular(sigma: np.ndarray) -> bool:
    return np.linalg.matrix_rank(sigma, hermitian=True) < sigma.shape[0]


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), float64.

    mu: (D,), sigma: (D, D). If the covariance product is singular (a rank-deficient sigma,
    e.g. fewer samples than dimensions or a constant feature) or its square root is not
    finite, ``eps`` is added to both diagonals and the root taken again, with a warning - ADM's
    fallback. ADM detects the singular case only by a non-finite sqrtm: the scipy it ran
    (< 1.12) returned NaN/Inf for singular products, while scipy >= 1.12 returns a finite
    root, so we test the rank explicitly to take the same branch ADM took. As in ADM, the traces
    stay those of the raw covariances, so the fallback shifts the value by up to -2·D·eps
    (-0.004 for D = 2048) when variances are tiny. A tiny imaginary
    part of the root (numerical noise) is dropped; a large one (> 1e-3 on the diagonal) raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not match means of shape {mu1.shape}")
    diff = mu1 - mu2

    covmean = None
    if not (_is_singular(sigma1) or _is_singular(sigma2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's own accuracy warnings: the finite check below decides
            covmean = linalg.sqrtm(sigma1 @ sigma2)
    if covmean is None or not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: the covariance product is singular; adding {eps} to the diagonal "
            "of both covariances (ADM's fallback)",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Fréchet distance: the square root of the covariance product is not finite")

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: sqrt of the covariance product has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g} (are the covariances symmetric positive semi-definite?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
