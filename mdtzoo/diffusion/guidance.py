"""Classifier-free guidance (registry ``guidance``): ``none``, ``constant``, ``power_cosine``.

A guidance component knows its scale schedule s_eff(t) and wraps a model function:

    guided_fn = GUIDANCE.build("power_cosine").wrap(model_fn)
    out = guided_fn(x, t, y=labels)          # x: (B, C, H, W), t: (B,) original steps

The wrapped function runs the conditional and the unconditional (null-label) halves in
ONE batched forward of 2B samples and returns B outputs:

    ε = ε_uncond + s_eff(t) · (ε_cond - ε_uncond)        on the ε channels,

and the conditional half's remaining channels (the learned-variance v). With
``legacy_three_channels`` only channels 0..2 are guided and channel 3 onwards is the
conditional output, exactly as DiT's and the MDT reference's ``forward_with_cfg`` do (a
legacy of DiT's 4-channel latents; use it only to reproduce published numbers).
"""

from __future__ import annotations

import math

import torch

from mdtzoo.diffusion.gaussian import ModelFn
from mdtzoo.registry import GUIDANCE

# The reference code guides channels [:3] whatever the channel count.
LEGACY_GUIDED_CHANNELS = 3


class Guidance:
    """Shared wrapper; subclasses define ``scale(t)``, the effective guidance scale s_eff."""

    def __init__(self, null_class: int = 1000, legacy_three_channels: bool = False, label_key: str = "y"):
        self.null_class = null_class
        self.legacy_three_channels = legacy_three_channels
        self.label_key = label_key

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """s_eff at original timesteps t: (B,) -> (B,) float32."""
        raise NotImplementedError

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` with guidance: same call signature, same output shape (B, C or 2C, H, W).

        Only x, t and the labels are doubled for the batched call; any other model_kwargs
        are passed through unchanged (so they must not have a batch dimension).
        """

        def guided(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
            if self.label_key not in model_kwargs:
                raise KeyError(f"guidance needs the labels as model_kwargs[{self.label_key!r}]")
            y = model_kwargs[self.label_key]
            batch, channels = x.shape[:2]
            kwargs = {**model_kwargs, self.label_key: torch.cat([y, torch.full_like(y, self.null_class)])}
            out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **kwargs)
            cond, uncond = out[:batch], out[batch:]
            k = min(LEGACY_GUIDED_CHANNELS, channels) if self.legacy_three_channels else channels
            s = self.scale(t).to(out.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            guided_eps = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
            return torch.cat([guided_eps, cond[:, k:]], dim=1)

        return guided

    def _extra_repr(self) -> str:
        return f"null_class={self.null_class}, legacy_three_channels={self.legacy_three_channels}"


@GUIDANCE.register("none")
class NoGuidance(Guidance):
    """No guidance: the model is called once, on the given labels."""

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        return model_fn

    def __repr__(self) -> str:
        return "NoGuidance()"


@GUIDANCE.register("constant")
class ConstantGuidance(Guidance):
    """Constant classifier-free guidance scale s at every step (DiT's FID setting: s=1.5)."""

    def __init__(self, scale: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.s = float(scale)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full(t.shape, self.s, dtype=torch.float32, device=t.device)

    def __repr__(self) -> str:
        return f"ConstantGuidance(scale={self.s}, {self._extra_repr()})"


@GUIDANCE.register("power_cosine")
class PowerCosineGuidance(Guidance):
    """MDT's power-cosine scale: s_eff = 1 + (s-1)·½(1 - cos(π(1 - t/T)^pow)); s=3.8, pow=4 (FID)."""

    def __init__(self, scale: float = 3.8, power: float = 4.0, num_train_steps: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.s, self.power, self.num_train_steps = float(scale), float(power), num_train_steps

    def scale_step(self, t: torch.Tensor) -> torch.Tensor:
        """½(1 - cos(π(1 - t/T)^pow)) in [0, 1]: 0 at pure noise (t→T), 1 at t=0.  (B,) -> (B,)."""
        u = (1 - t.to(torch.float32) / self.num_train_steps) ** self.power
        return 0.5 * (1 - torch.cos(u * math.pi))

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return 1 + (self.s - 1) * self.scale_step(t)

    def __repr__(self) -> str:
        return f"PowerCosineGuidance(scale={self.s}, power={self.power}, {self._extra_repr()})"
