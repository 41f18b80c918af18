"""Per-sample loss pieces: Gaussian KL, discretised Gaussian log-likelihood, (weighted) means.

All functions are elementwise on tensors of the same (broadcastable) shape, in nats;
callers reduce with ``flat_mean`` and convert to bits/dim by dividing by log 2.
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    num_levels: int = 256,
    edge: float = 0.999,
    min_prob: float = 1e-12,
) -> torch.Tensor:
    """log P(x) for data in [-1, 1] quantised to ``num_levels`` levels, under N(means, e^(2 log_scales)).

    x, means, log_scales: (B, C, H, W) -> (B, C, H, W) log-probabilities in nats.
    Each value owns the bin x ± 1/(num_levels - 1); values beyond ±``edge`` take the whole
    tail (the DDPM decoder L_0; IDDPM's thresholds). The CDF is the exact normal CDF
    (IDDPM uses a tanh approximation, off by < 2e-4 in probability).
    """
    half_bin = 1.0 / (num_levels - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + half_bin))
    cdf_min = torch.special.ndtr(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=min_prob))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=min_prob))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=min_prob))
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_delta))


def flat_mean(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean over all but the batch dim; with ``weight``, Σ w·x / Σ w.

    x: (B, C, H, W); weight: None or broadcastable to x, e.g. (B, 1, H, W) -> (B,).
    The weighted sums run over the broadcast weight, so a (B, 1, H, W) map counts each
    channel of a selected position; a sample whose weights are all 0 gets 0.
    """
    if weight is None:
        return x.mean(dim=tuple(range(1, x.ndim)))
    w = torch.broadcast_to(weight.to(x.dtype), x.shape)
    dims = tuple(range(1, x.ndim))
    num, den = (w * x).sum(dim=dims), w.sum(dim=dims)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(num))


def token_weight(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """A per-token mask (B, N), tokens row-major over ``grid``, as a pixel weight map (B, 1, H, W).

    With MaskOut's mask (1 = removed) this is the ``token_weight`` that restricts the loss
    to the removed tokens (paper Table 5e, "masked only"); H = grid[0]·p, W = grid[1]·p.
    """
    rows, cols = grid
    m = mask.reshape(mask.shape[0], 1, rows, cols).to(torch.float32)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
