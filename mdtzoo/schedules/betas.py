"""Noise schedules: ``schedule.linear``, ``schedule.cosine``, ``schedule.scaled_linear``.

Each returns the float64 betas β_1..β_T as a numpy array of shape (num_steps,); every
other table (ᾱ, posterior coefficients) is derived from them in float64 by
mdtzoo.diffusion.gaussian, and only cast to float32 when gathered into tensors.
"""

from __future__ import annotations

import math

import numpy as np

from mdtzoo.registry import SCHEDULE


@SCHEDULE.register("linear")
def linear(
    num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02, reference_steps: int = 1000
) -> np.ndarray:
    """DDPM linear betas 1e-4 -> 0.02 at T=1000, scaled by 1000/T for other T (IDDPM)."""
    # IDDPM's rescaling keeps the total noise Σβ (and so ᾱ_T) about the same for any T.
    scale = reference_steps / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


@SCHEDULE.register("cosine")
def cosine(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), betas capped at 0.999."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    # β_i = 1 - ᾱ(i+1)/ᾱ(i); the cap avoids the singularity at u = 1 where ᾱ -> 0.
    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float64)


@SCHEDULE.register("scaled_linear")
def scaled_linear(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion's schedule: linspace of sqrt(β) from 0.00085 to 0.012, squared."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 - β_s), float64, shape (T,)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
