"""`masking.random_jitter`: random masking whose ratio is drawn per call (MDT v2)."""

from __future__ import annotations

import torch

from mdtzoo.masking.base import MaskOut, check_ratio, from_shuffle
from mdtzoo.masking.random import random_shuffle
from mdtzoo.registry import MASKING


@MASKING.register("random_jitter")
class RandomJitterMasking:
    """Random masking with ratio ~ U[ratio, ratio+span), one draw per call (MDT v2: 0.3, 0.2).

    The reference MDT v2 hides ``+ 0.2`` inside forward(); here it is the ``span`` knob.
    """

    def __init__(self, ratio: float = 0.3, span: float = 0.2):
        self.ratio = check_ratio(ratio)
        self.span = float(span)
        if self.span < 0 or self.ratio + self.span > 1:
            raise ValueError(f"need span >= 0 and ratio + span <= 1; got ratio={ratio}, span={span}")

    def draw_ratio(self, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ratio in [ratio, ratio + span) for the whole batch (the batch stays rectangular).

        A float32 tensor, computed as the reference does (u * span + ratio): the keep count
        int(N (1 - r)) then truncates exactly like the reference's, draw for draw.
        """
        u = torch.rand(1, device=device, generator=generator)
        return u * self.span + self.ratio

    def __call__(
        self, batch: int, grid: tuple[int, int], *, device=None, generator: torch.Generator | None = None
    ) -> MaskOut:
        """grid: (rows, cols) of the token grid, N = rows * cols."""
        n = grid[0] * grid[1]
        ratio = self.draw_ratio(device, generator)
        num_keep = int(n * (1 - ratio))  # float32 tensor arithmetic, as the reference
        return from_shuffle(random_shuffle(batch, n, device, generator), num_keep)

    def __repr__(self) -> str:
        return f"RandomJitterMasking(ratio={self.ratio}, span={self.span})"
