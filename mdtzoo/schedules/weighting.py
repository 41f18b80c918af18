"""Loss weightings: ``weighting.uniform``, ``weighting.min_snr``, ``weighting.snr_trunc``.

A weighting instance maps the per-sample SNR to a weight on the MSE of whatever the
model predicts (``predict`` = "eps", "x0" or "v"):

    weight = weighting(snr, predict)          snr: (B,) float, weight: (B,)

Weightings from the literature are stated as a weight w(snr) on the x0-MSE. The three
targets' errors are related by (x_t fixed, snr = ᾱ/(1-ᾱ)):

    |ε - ε̂|² = snr · |x0 - x̂0|²        |v - v̂|² = (snr + 1) · |x0 - x̂0|²

so the same objective on the ε-MSE is w(snr)/snr and on the v-MSE is w(snr)/(snr+1).
"""

from __future__ import annotations

import torch

from mdtzoo.registry import WEIGHTING

PREDICTIONS = ("eps", "x0", "v")


def x0_mse_factor(snr: torch.Tensor, predict: str) -> torch.Tensor:
    """How many x0-MSEs one MSE of the ``predict`` target is worth: 1, snr or snr+1.  snr: (B,)."""
    if predict == "x0":
        return torch.ones_like(snr)
    if predict == "eps":
        return snr
    if predict == "v":
        return snr + 1
    raise ValueError(f"unknown prediction target {predict!r}; expected one of {PREDICTIONS}")


class X0Weighting:
    """Base for weightings defined as a weight on the x0-MSE; converts to the model's target."""

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, snr: torch.Tensor, predict: str = "eps") -> torch.Tensor:
        """snr: (B,) -> weight on the ``predict``-MSE, (B,)."""
        return self.x0_weight(snr) / x0_mse_factor(snr, predict)


@WEIGHTING.register("uniform")
class Uniform:
    """Weight 1 on the MSE of the model's own target (DiT, MDT v1)."""

    def __call__(self, snr: torch.Tensor, predict: str = "eps") -> torch.Tensor:
        x0_mse_factor(snr, predict)  # validates ``predict``
        return torch.ones_like(snr)

    def __repr__(self) -> str:
        return "Uniform()"


@WEIGHTING.register("min_snr")
class MinSNR(X0Weighting):
    """Min-SNR-γ (Hang et al. 2023; MDT v2 uses γ=5): x0 weight min(snr, γ), ε weight min(snr, γ)/snr."""

    def __init__(self, gamma: float = 5.0):
        if gamma <= 0:
            raise ValueError(f"min_snr: gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        # For v this gives min(snr, γ)/(snr + 1), as in the min-SNR paper. (The MDT v2
        # reference applies min(snr, γ)/snr to v too; it only ever trains ε models.)
        return torch.clamp(snr, max=self.gamma)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"


@WEIGHTING.register("snr_trunc")
class TruncatedSNR(X0Weighting):
    """Truncated SNR (Salimans & Ho 2022): x0 weight max(snr, floor); ε weight max(1, floor/snr)."""

    def __init__(self, floor: float = 1.0):
        if floor < 0:
            raise ValueError(f"snr_trunc: floor must be >= 0, got {floor}")
        self.floor = float(floor)

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        # Equals the ε-MSE at high SNR and keeps weight `floor` on x0 at low SNR,
        # where the plain ε-MSE gives the x0 error almost no weight.
        return torch.clamp(snr, min=self.floor)

    def __repr__(self) -> str:
        return f"TruncatedSNR(floor={self.floor})"
