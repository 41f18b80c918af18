"""`masking.block`: BEiT-style masking of contiguous rectangular blocks of tokens."""

from __future__ import annotations

import math

import torch

from mdtzoo.masking.base import MaskOut, check_ratio, from_mask, keep_count
from mdtzoo.registry import MASKING


def _uniform(generator, device, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator, device=device).item()


@MASKING.register("block")
class BlockMasking:
    """Contiguous rectangular blocks (BEiT) until exactly N - int(N(1-ratio)) tokens are removed."""

    def __init__(
        self,
        ratio: float = 0.3,
        min_block: int = 4,
        min_aspect: float = 0.3,
        max_attempts: int = 100,
    ):
        self.ratio = check_ratio(ratio)
        self.min_block = int(min_block)
        self.min_aspect = float(min_aspect)
        self.max_attempts = int(max_attempts)
        if self.min_block < 1 or not 0 < self.min_aspect <= 1:
            raise ValueError(f"need min_block >= 1 and 0 < min_aspect <= 1; got {min_block}, {min_aspect}")

    def _one(self, rows: int, cols: int, target: int, generator, device) -> torch.Tensor:
        """(rows, cols) bool, exactly ``target`` True (= removed)."""
        removed = torch.zeros(rows, cols, dtype=torch.bool)
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(self.max_attempts):
            left_to_remove = target - int(removed.sum())
            if left_to_remove <= 0:
                break
            # Block area in [min_block, what is left], aspect ratio log-uniform (BEiT's recipe).
            area = _uniform(generator, device, min(self.min_block, left_to_remove), left_to_remove)
            aspect = math.exp(_uniform(generator, device, *log_aspect))
            h = min(rows, max(1, round(math.sqrt(area * aspect))))
            w = min(cols, max(1, round(math.sqrt(area / aspect))))
            top = int(_uniform(generator, device, 0, rows - h + 1 - 1e-9))
            left = int(_uniform(generator, device, 0, cols - w + 1 - 1e-9))
            block = torch.zeros_like(removed)
            block[top : top + h, left : left + w] = True
            new = block & ~removed
            extra = int(new.sum()) - left_to_remove
            if extra > 0:
                # Overshoot: give back `extra` of this block's new tokens, chosen at random,
                # so the count is exact while the block stays (mostly) contiguous.
                new_ids = new.flatten().nonzero().squeeze(1)
                order = torch.randperm(len(new_ids), generator=_cpu(generator))
                new.view(-1)[new_ids[order[:extra]]] = False
            removed |= new
        left_to_remove = target - int(removed.sum())
        if left_to_remove > 0:  # no block fitted in max_attempts: finish with single tokens
            free = (~removed).flatten().nonzero().squeeze(1)
            order = torch.randperm(len(free), generator=_cpu(generator))
            removed.view(-1)[free[order[:left_to_remove]]] = True
        return removed

    def __call__(
        self, batch: int, grid: tuple[int, int], *, device=None, generator: torch.Generator | None = None
    ) -> MaskOut:
        """grid: (rows, cols) of the token grid, N = rows * cols."""
        rows, cols = grid
        n = rows * cols
        target = n - keep_count(n, self.ratio)
        gen_device = generator.device if generator is not None else None
        masks = [self._one(rows, cols, target, generator, gen_device).flatten() for _ in range(batch)]
        mask = torch.stack(masks).to(torch.float32) if masks else torch.zeros(0, n)
        return from_mask(mask).to(device if device is not None else "cpu")

    def __repr__(self) -> str:
        return f"BlockMasking(ratio={self.ratio}, min_block={self.min_block}, min_aspect={self.min_aspect})"


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """randperm needs a CPU generator; derive one deterministically from a device generator."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)
