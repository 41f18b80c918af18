"""The training objective: DiT's full pass, MDT's full + masked passes (paper section 3.4).

One MDT step: x0 and t are shared; the full pass and the masked pass each draw their
own noise and label dropout, the masked pass its own mask; loss = mean(full loss) +
mean(masked loss), one backward. Options reproduce the paper's Table 5d (``passes``:
both / full / masked) and 5e (``masked_loss_on``: all tokens / removed tokens only).
Wrapping both passes in one module gives DDP a single forward per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdtzoo.training.distributed import step_generator

PASSES = ("both", "full", "masked")
LOSS_ON = ("all", "removed")

# Streams of the per-step generators (see distributed.step_generator).
T_STREAM, FULL_STREAM, MASKED_STREAM, MASK_STREAM = 0, 1, 2, 3


def token_weight_map(mask: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, N) token mask (1 = removed) -> (B, 1, H, W) pixel weights (1 on removed tokens' pixels)."""
    b = mask.shape[0]
    m = mask.reshape(b, 1, grid[0], grid[1])
    return F.interpolate(m, scale_factor=patch, mode="nearest")


class DiffusionObjective(nn.Module):
    """forward(x0, y, step) -> dict of per-batch scalar losses ('loss' is what to backprop).

    x0: (B, C, H, W), y: (B,) labels. All randomness comes from generators seeded by
    (seed, step, rank, micro-batch), so a resumed run replays the same draws.
    """

    def __init__(self, model: nn.Module, diffusion, passes: str = "both", masked_loss_on: str = "all",
                 seed: int = 0, rank: int = 0):
        super().__init__()
        if passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}; got {passes!r}")
        if masked_loss_on not in LOSS_ON:
            raise ValueError(f"masked_loss_on must be one of {LOSS_ON}; got {masked_loss_on!r}")
        has_interp = getattr(model, "interp", None) is not None
        if passes != "full" and not has_interp:
            raise ValueError(
                f"passes={passes!r} needs a masked pass, but this model has no side-interpolator "
                "(DiT presets train with passes='full')"
            )
        self.model, self.diffusion = model, diffusion
        self.passes, self.masked_loss_on = passes, masked_loss_on
        self.seed, self.rank = int(seed), int(rank)

    def forward(self, x0: torch.Tensor, y: torch.Tensor, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        dev, b = x0.device, x0.shape[0]
        stream = micro * 8  # several micro-batches (gradient accumulation) per step get distinct streams
        g_t = step_generator(self.seed, step, self.rank, stream + T_STREAM, dev)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=dev, generator=g_t)
        out: dict[str, torch.Tensor] = {}
        total = x0.new_zeros(())
        if self.passes in ("both", "full"):
            g = step_generator(self.seed, step, self.rank, stream + FULL_STREAM, dev)
            terms = self.diffusion.training_losses(
                self.model, x0, t, noise=torch.randn(x0.shape, device=dev, generator=g),
                model_kwargs={"y": y, "generator": g},
            )
            total = total + terms["loss"].mean()
            out.update(full_loss=terms["loss"].mean(), full_mse=terms["mse"].mean(), full_vb=terms["vb"].mean())
        if self.passes in ("both", "masked"):
            g = step_generator(self.seed, step, self.rank, stream + MASKED_STREAM, dev)
            mask = self.model.sample_mask(b, dev, step_generator(self.seed, step, self.rank, stream + MASK_STREAM, dev))
            weight = None
            if self.masked_loss_on == "removed":
                weight = token_weight_map(mask.mask.to(x0.dtype), self.model.grid, self.model.patch_size)
            terms = self.diffusion.training_losses(
                self.model, x0, t, noise=torch.randn(x0.shape, device=dev, generator=g),
                model_kwargs={"y": y, "mask": mask, "generator": g}, token_weight=weight,
            )
            total = total + terms["loss"].mean()
            out.update(
                masked_loss=terms["loss"].mean(), masked_mse=terms["mse"].mean(), masked_vb=terms["vb"].mean(),
                mask_ratio=mask.mask.mean(),
            )
        out["loss"] = total
        return out
