"""Gaussian diffusion, respacing, samplers (registry ``samplers``) and guidance (``guidance``).

    diffusion = build_diffusion(respacing="250")          # DiT / MDT sampling setup
    losses = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})
    x = SAMPLERS.build("ddpm")(diffusion, GUIDANCE.build("power_cosine").wrap(model), shape)

docs/diffusion.md states the conventions.
"""

from __future__ import annotations

from typing import Callable

import gin
import numpy as np

from mdtzoo.diffusion import guidance, samplers  # noqa: F401  (registration)
from mdtzoo.diffusion.gaussian import GaussianDiffusion
from mdtzoo.diffusion.losses import token_weight
from mdtzoo.diffusion.noise import randn
from mdtzoo.diffusion.respace import respace_betas, space_timesteps
from mdtzoo.registry import SCHEDULE, WEIGHTING

__all__ = ["GaussianDiffusion", "build_diffusion", "randn", "respace_betas", "space_timesteps", "token_weight"]


@gin.register(module="diffusion")
def build_diffusion(
    schedule: str | Callable | np.ndarray = "linear",
    steps: int = 1000,
    respacing: str | int | list[int] | None = None,
    learn_sigma: bool = True,
    weighting: str | Callable = "uniform",
    predict: str = "eps",
    sigma_small: bool = False,
    rescale_vb: bool = True,
) -> GaussianDiffusion:
    """The diffusion of DiT / MDT (defaults: linear betas, T=1000, ε, learned range, hybrid loss).

    schedule: a ``schedule`` name (gin bindings such as ``schedule.cosine.max_beta`` apply),
      a function num_steps -> betas, or the betas themselves.
    respacing: None (all ``steps``), "250", "ddim50", "10,15,20", ... (see space_timesteps);
      the result indexes the kept steps and calls the network with the original ones.
    weighting: a ``weighting`` name (``weighting.min_snr.gamma = 5.0``) or an instance.
    predict: "eps", "x0" or "v". sigma_small: with learn_sigma False, use β̃ instead of β.
    """
    if isinstance(schedule, str):
        betas = SCHEDULE.build(schedule, num_steps=steps)
    elif callable(schedule):
        betas = schedule(steps)
    else:
        betas = schedule
    betas = np.asarray(betas, dtype=np.float64)
    if len(betas) != steps:
        raise ValueError(f"the schedule gave {len(betas)} betas for steps={steps}")
    options = dict(
        predict=predict,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        weighting=WEIGHTING.resolve(weighting),
        rescale_vb=rescale_vb,
    )
    if respacing in (None, "", steps, str(steps)):  # every step: keep the exact betas
        return GaussianDiffusion(betas, **options)
    kept = space_timesteps(steps, respacing)
    return GaussianDiffusion(respace_betas(betas, kept), timesteps=kept, base_betas=betas, **options)
