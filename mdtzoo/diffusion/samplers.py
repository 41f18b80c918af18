"""Samplers (registry ``samplers``): ``ddpm``, ``ddim``, and diffusers-scheduler bridges.

Every sampler is an object built once (its options are gin-bindable, e.g.
``samplers.ddim.eta = 0.0``) and called with one uniform signature:

    x0 = sampler(diffusion, model_fn, shape, *, model_kwargs=None, generator=None,
                 noise=None, progress=False, device=None)

shape: (B, C, H, W); model_fn(x, t, **model_kwargs) sees original timesteps in 0..T-1;
generator: None, one torch.Generator or a list of B generators (mdtzoo.diffusion.noise);
every random draw (start noise and step noise) comes from it, so a call is reproducible.
device: default the noise's device, else model_fn's parameters' device, else the CPU
(pass it when model_fn is a plain function, e.g. a guidance wrapper around a GPU model).
``ddpm`` and ``ddim`` walk the steps of the (respaced) diffusion; the bridges
(``dpm_solver``, ``euler``, ``unipc``) hand the *un-respaced* betas to a diffusers
scheduler, which picks its own ``num_steps`` timesteps.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Iterable

import torch

from mdtzoo.diffusion.gaussian import GaussianDiffusion, ModelFn
from mdtzoo.diffusion.noise import Generator, randn
from mdtzoo.registry import SAMPLERS


def _infer_device(model_fn, device, noise):
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    params = getattr(model_fn, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _start(shape, generator, noise, device) -> torch.Tensor:
    """x_T: the given noise, or a standard normal draw from ``generator``."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device)
    return randn(shape, generator, device=device)


def _progress(steps: Iterable, progress: bool) -> Iterable:
    if not progress:
        return steps
    from tqdm.auto import tqdm  # only needed when asked for

    return tqdm(list(steps))


class _ChainSampler:
    """Walks indices N-1 .. 0 of the diffusion, one ``_step`` each."""

    def _step(self, diffusion, model_fn, x, t, model_kwargs, generator) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        diffusion: GaussianDiffusion,
        model_fn: ModelFn,
        shape,
        *,
        model_kwargs: dict | None = None,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Sample (B, C, H, W) from x_T = noise (or a draw) by walking every step of ``diffusion``."""
        device = _infer_device(model_fn, device, noise)
        x = _start(shape, generator, noise, device)
        for i in _progress(reversed(range(diffusion.num_timesteps)), progress):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=device)
            x = self._step(diffusion, model_fn, x, t, model_kwargs, generator)
        return x


@SAMPLERS.register("ddpm")
class DDPM(_ChainSampler):
    """Ancestral DDPM sampling over every (respaced) step; no x0 clipping by default (MDT, DiT)."""

    def __init__(self, clip_denoised: bool = False):
        self.clip_denoised = clip_denoised

    def _step(self, diffusion, model_fn, x, t, model_kwargs, generator):
        return diffusion.p_sample(
            model_fn, x, t, model_kwargs=model_kwargs, clip_denoised=self.clip_denoised, generator=generator
        )

    def __repr__(self) -> str:
        return f"DDPM(clip_denoised={self.clip_denoised})"


@SAMPLERS.register("ddim")
class DDIM(_ChainSampler):
    """DDIM over every (respaced) step; eta=0 (default) is the deterministic ODE sampler."""

    def __init__(self, eta: float = 0.0, clip_denoised: bool = False):
        if eta < 0:
            raise ValueError(f"ddim: eta must be >= 0, got {eta}")
        self.eta, self.clip_denoised = float(eta), clip_denoised

    def _step(self, diffusion, model_fn, x, t, model_kwargs, generator):
        return diffusion.ddim_sample(
            model_fn, x, t, eta=self.eta, model_kwargs=model_kwargs,
            clip_denoised=self.clip_denoised, generator=generator,
        )

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta}, clip_denoised={self.clip_denoised})"


# diffusers' name for each of our prediction targets.
_PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class DiffusersBridge:
    """Runs a diffusers scheduler built from OUR betas (``trained_betas``) over our model.

    The scheduler gets the un-respaced betas (``diffusion.base_betas``) and our prediction
    target; the model's variance channels are dropped. Subclasses name the scheduler class
    and its defaults; extra keyword arguments go to the scheduler's constructor.
    """

    scheduler_name = ""
    defaults: dict = {}

    def __init__(self, num_steps: int = 25, **scheduler_kwargs):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.scheduler_kwargs = {**self.defaults, **scheduler_kwargs}

    def make_scheduler(self, diffusion: GaussianDiffusion, device=None):
        """A fresh scheduler (they are stateful) with its ``num_steps`` timesteps set."""
        import diffusers  # imported here: GPU benchmark machines may lack diffusers (SPEC §8)

        cls = getattr(diffusers, self.scheduler_name)
        with warnings.catch_warnings():
            # diffusers calls np.array(tensor) when building sigmas; numpy >= 2 warns about it.
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            scheduler = cls(
                num_train_timesteps=len(diffusion.base_betas),
                trained_betas=diffusion.base_betas,
                prediction_type=_PREDICTION_TYPE[diffusion.predict],
                **self.scheduler_kwargs,
            )
            scheduler.set_timesteps(self.num_steps, device=device)
        return scheduler

    @torch.no_grad()
    def __call__(
        self,
        diffusion: GaussianDiffusion,
        model_fn: ModelFn,
        shape,
        *,
        model_kwargs: dict | None = None,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Sample (B, C, H, W) with ``num_steps`` scheduler steps; the model sees original t."""
        device = _infer_device(model_fn, device, noise)
        scheduler = self.make_scheduler(diffusion, device)
        x = _start(shape, generator, noise, device) * scheduler.init_noise_sigma
        channels = shape[1]
        # Stochastic variants (e.g. algorithm_type="sde-dpmsolver++") draw step noise from
        # our generator(s); schedulers without randomness take no generator argument.
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        for t in _progress(scheduler.timesteps, progress):
            # Schedulers with float timesteps (euler) are configured to land on integers.
            t_model = torch.full((x.shape[0],), int(round(float(t))), dtype=torch.int64, device=device)
            out = model_fn(scheduler.scale_model_input(x, t), t_model, **(model_kwargs or {}))
            x = scheduler.step(out[:, :channels], t, x, **step_kwargs).prev_sample
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, {self.scheduler_kwargs})"


@SAMPLERS.register("dpm_solver")
class DPMSolver(DiffusersBridge):
    """DPM-Solver++ (2nd-order multistep) via diffusers, 20-50 steps; deterministic."""

    scheduler_name = "DPMSolverMultistepScheduler"
    defaults = {"algorithm_type": "dpmsolver++", "solver_order": 2}


@SAMPLERS.register("euler")
class Euler(DiffusersBridge):
    """Euler (Karras et al. 2022) probability-flow ODE steps via diffusers; deterministic."""

    scheduler_name = "EulerDiscreteScheduler"
    # "trailing" spacing puts every step on an integer timestep, which our network needs.
    defaults = {"timestep_spacing": "trailing"}


@SAMPLERS.register("unipc")
class UniPC(DiffusersBridge):
    """UniPC multistep predictor-corrector (Zhao et al. 2023) via diffusers; deterministic."""

    scheduler_name = "UniPCMultistepScheduler"
