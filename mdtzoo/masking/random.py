"""`masking.random`: the MDT / MAE per-sample random masking (argsort of uniform noise)."""

from __future__ import annotations

import torch

from mdtzoo.masking.base import MaskOut, check_ratio, from_shuffle, keep_count
from mdtzoo.registry import MASKING


def random_shuffle(batch: int, num_tokens: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) independent uniformly random permutations: argsort of U[0,1) noise, as MAE does."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return torch.argsort(noise, dim=1)


@MASKING.register("random")
class RandomMasking:
    """Uniform random masking: each sample keeps int(N(1-ratio)) tokens (MDT v1, ratio 0.3)."""

    def __init__(self, ratio: float = 0.3):
        self.ratio = check_ratio(ratio)

    def __call__(
        self, batch: int, grid: tuple[int, int], *, device=None, generator: torch.Generator | None = None
    ) -> MaskOut:
        """grid: (rows, cols) of the token grid, N = rows * cols."""
        n = grid[0] * grid[1]
        return from_shuffle(random_shuffle(batch, n, device, generator), keep_count(n, self.ratio))

    def __repr__(self) -> str:
        return f"RandomMasking(ratio={self.ratio})"
