"""Timestep respacing (IDDPM): sample with a subset of the training steps.

``space_timesteps(1000, "250")`` picks the kept original steps; ``respace_betas`` turns
the full betas into the betas of a shorter chain with the same ᾱ at the kept steps. The
diffusion keeps the map index -> original step, so the network always sees original t.
"""

from __future__ import annotations

import numpy as np

from mdtzoo.schedules.betas import alphas_cumprod


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The original steps to keep, sorted ascending (IDDPM's section rounding, exactly).

    section_counts:
      "250" or 250   -> 250 steps with fractional stride (T-1)/(N-1), rounded:
                        {0, 4, 8, ..., 995, 999} for T=1000.
      "10,15,20"     -> the T steps are cut into 3 near-equal sections, taking 10, 15
                        and 20 steps from them (each section from its own start).
      "ddim50"       -> DDIM's uniform stride: range(0, T, k) for the k giving 50 steps
                        ({0, 20, ..., 980}); raises if no integer stride gives exactly N.
    A section of count 1 keeps only its first step (so "1" keeps {0}, as IDDPM does).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps of {num_timesteps} with an integer stride")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [int(x) for x in section_counts.split(",")]
    else:
        counts = [int(x) for x in section_counts]

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index the way IDDPM does, so float rounding (and
        # Python's round-half-to-even) give bit-for-bit the same steps.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the chain that visits only ``kept`` steps: β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}} (float64)."""
    ac = alphas_cumprod(betas)
    kept_ac = ac[np.asarray(sorted(kept))]
    prev = np.concatenate([[1.0], kept_ac[:-1]])
    return 1.0 - kept_ac / prev
