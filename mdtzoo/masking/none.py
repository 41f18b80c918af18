"""`masking.none`: keep every token (the masked pass degenerates to the full pass)."""

from __future__ import annotations

import torch

from mdtzoo.masking.base import MaskOut, from_shuffle
from mdtzoo.registry import MASKING


@MASKING.register("none")
class NoMasking:
    """Keep all N tokens; mask is all zeros (for DiT and for ablations without masking)."""

    ratio = 0.0
    deterministic = True  # every sample gets the same mask; no randomness is drawn

    def __call__(
        self, batch: int, grid: tuple[int, int], *, device=None, generator: torch.Generator | None = None
    ) -> MaskOut:
        n = grid[0] * grid[1]
        ids = torch.arange(n, device=device).expand(batch, n).contiguous()
        return from_shuffle(ids, n)

    def __repr__(self) -> str:
        return "NoMasking()"
