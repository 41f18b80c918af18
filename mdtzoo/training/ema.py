"""Exponential moving average of model weights, updated with fused foreach kernels."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * param, for every floating-point parameter; buffers copied.

    The EMA model is a frozen deep copy in eval mode; ``update`` is one fused lerp over all
    parameters (torch._foreach_lerp_) instead of a Python loop of small kernels.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = [
            (e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.dtype.is_floating_point
        ]
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    def decay_at(self, step: int) -> float:
        """The decay used after optimiser step ``step`` (1-based): with warm-up min(decay, (1+s)/(10+s)),
        so a short run's EMA is not dominated by the initial weights; without, the constant decay (DiT)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        if self._pairs:
            ema, params = zip(*self._pairs)
            torch._foreach_lerp_(list(ema), [p.detach() for p in params], 1.0 - self.decay_at(step))
        self.copy_buffers()

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """The EMA model's buffers := the model's (one foreach copy, not a kernel per buffer)."""
        if self._buffers:
            torch._foreach_copy_([e for e, _ in self._buffers], [b for _, b in self._buffers])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
