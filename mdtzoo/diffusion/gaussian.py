"""Gaussian diffusion (DDPM / IDDPM): forward process, posterior, model parametrisation, loss.

Conventions (docs/diffusion.md has the maths):
  x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε,  t = 0..T-1 (index 0 is the first noising step).
  Tables are float64 numpy, gathered per timestep and cast to float32 on the batch's device.
  A respaced diffusion indexes its own (shorter) tables with t = 0..N-1 and calls the
  network with the original step ``timesteps[t]``; every ``model_fn`` below is called as
  ``model_fn(x, original_t, **model_kwargs)``.
  Model output: (B, C, H, W), or (B, 2C, H, W) with ``learn_sigma``, where the last C
  channels are v in [-1, 1] interpolating log σ² between log β̃ (clipped) and log β.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mdtzoo.diffusion.losses import LOG2, discretized_gaussian_log_likelihood, flat_mean, normal_kl
from mdtzoo.diffusion.noise import Generator, randn
from mdtzoo.schedules.betas import alphas_cumprod
from mdtzoo.schedules.weighting import PREDICTIONS, Uniform

ModelFn = Callable[..., torch.Tensor]

# IDDPM multiplies the vb term by T/1000 (its RESCALED_MSE loss) so that the hybrid loss
# keeps the balance it had at T=1000; at T=1000 (DiT, MDT) the factor is exactly 1.
VB_REFERENCE_STEPS = 1000


class GaussianDiffusion:
    """A discrete Gaussian diffusion over ``len(betas)`` steps with ε / x0 / v prediction.

    betas: (N,) float64 betas of this chain. timesteps: the original step of each index
    (default 0..N-1); base_betas: the betas of the un-respaced chain (for the diffusers
    bridge); weighting: a ``weighting`` instance, snr (B,) -> MSE weight (B,).
    learn_sigma False uses a fixed variance: β (with β_0 := β̃_1, IDDPM's "fixed large")
    or, with ``sigma_small``, the clipped posterior variance β̃.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        predict: str = "eps",
        learn_sigma: bool = True,
        sigma_small: bool = False,
        weighting: Callable | None = None,
        timesteps: list[int] | np.ndarray | None = None,
        base_betas: np.ndarray | None = None,
        rescale_vb: bool = True,
    ):
        if predict not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {predict!r}; expected one of {PREDICTIONS}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        self.predict, self.learn_sigma, self.sigma_small = predict, learn_sigma, sigma_small
        self.weighting = weighting if weighting is not None else Uniform()
        self.rescale_vb = rescale_vb
        self.num_timesteps = len(betas)
        steps = np.arange(self.num_timesteps) if timesteps is None else np.asarray(timesteps)
        if steps.shape != betas.shape or (np.diff(steps) <= 0).any():
            raise ValueError("timesteps must be ascending and one per beta")
        self.timesteps = torch.as_tensor(steps, dtype=torch.int64)
        self.base_betas = betas if base_betas is None else np.asarray(base_betas, dtype=np.float64)

        self.betas = betas
        ac = alphas_cumprod(betas)
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.snr = ac / (1.0 - ac)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        # True posterior q(x_{t-1} | x_t, x0) = N(coef1·x0 + coef2·x_t, β̃_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
        # β̃_0 = 0; its log uses β̃_1 instead so that the log (and learned range) stay finite.
        # (A one-step chain has no β̃_1; β_0 stands in.)
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        # IDDPM's "fixed large" variance: β_t, but β̃_1 at t=0 so the decoder NLL is not too wide.
        self.log_fixed_large = np.log(np.append(first, betas[1:]))
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- table access -------------------------------------------------------------------
    def _table(self, name: str, device, dtype=torch.float32) -> torch.Tensor:
        """The numpy table ``name`` as a tensor on ``device``, cached (one copy per device)."""
        key = (name, torch.device(device))
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(np.asarray(getattr(self, name)), dtype=dtype, device=device)
        return self._tables[key]

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table ``name`` at t: (B,) -> (B, 1, ..., 1) float32 with ``ndim`` dims, on t's device."""
        return self._table(name, t.device)[t].reshape(-1, *([1] * (ndim - 1)))

    def _as_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """An int t or (B,) tensor of indices -> (B,) int64 on x's device."""
        t = torch.as_tensor(t, dtype=torch.int64, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` called with original timesteps instead of this chain's indices."""
        def wrapped(x, t, **model_kwargs):
            return model_fn(x, self._table("timesteps", t.device, torch.int64)[t], **model_kwargs)
        return wrapped

    # -- forward process ----------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε.  x0, noise: (B, C, H, W); t: (B,) indices."""
        t = self._as_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        return self._gather("sqrt_alphas_cumprod", t, x0.ndim) * x0 + \
            self._gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, ...]:
        """Mean, variance, clipped log-variance of q(x_{t-1} | x_t, x0), broadcastable to (B, C, H, W)."""
        t = self._as_t(t, x_t)
        mean = self._gather("posterior_mean_coef1", t, x_t.ndim) * x0 + \
            self._gather("posterior_mean_coef2", t, x_t.ndim) * x_t
        return mean, self._gather("posterior_variance", t, x_t.ndim), \
            self._gather("posterior_log_variance_clipped", t, x_t.ndim)

    def snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t / (1 - ᾱ_t) at indices t: (B,) -> (B,) float32."""
        return self._gather("snr", t, 1)

    # -- parametrisation ----------------------------------------------------------------
    def x0_from_eps(self, x_t, t, eps):
        return self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - \
            self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps

    def eps_from_x0(self, x_t, t, x0):
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0) / \
            self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)

    def v_target(self, x0, t, noise):
        """v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 (Salimans & Ho 2022)."""
        return self._gather("sqrt_alphas_cumprod", t, x0.ndim) * noise - \
            self._gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0

    def target(self, x0, t, noise):
        """What the network is trained to output for (x0, t, noise): ε, x0 or v."""
        if self.predict == "eps":
            return noise
        if self.predict == "x0":
            return x0
        return self.v_target(x0, t, noise)

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C or 2C, H, W) -> mean part (B, C, H, W) and variance part v (or None)."""
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(
                f"model output has {out.shape[1]} channels; expected {expected} for {channels}-channel "
                f"input with learn_sigma={self.learn_sigma}"
            )
        return (out[:, :channels], out[:, channels:]) if self.learn_sigma else (out, None)

    def log_variance(self, var_values: torch.Tensor | None, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """log σ²_t: learned range frac·log β + (1-frac)·log β̃_clipped, frac = (v+1)/2; or fixed."""
        log_small = self._gather("posterior_log_variance_clipped", t, ndim)
        if var_values is not None:
            frac = (var_values + 1) / 2
            return frac * self._gather("log_betas", t, ndim) + (1 - frac) * log_small
        if self.sigma_small:
            return log_small
        return self._gather("log_fixed_large", t, ndim)

    def p_from_output(self, out, x_t, t, clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """The reverse step p(x_{t-1} | x_t) implied by a raw network output.

        out: (B, C or 2C, H, W); x_t: (B, C, H, W); t: (B,) indices.
        Returns mean, log_variance, pred_x0, eps, each (B, C, H, W).
        """
        pred, var_values = self.split_output(out, x_t.shape[1])
        if self.predict == "eps":
            pred_x0 = self.x0_from_eps(x_t, t, pred)
        elif self.predict == "x0":
            pred_x0 = pred
        else:
            pred_x0 = self._gather("sqrt_alphas_cumprod", t, x_t.ndim) * x_t - \
                self._gather("sqrt_one_minus_alphas_cumprod", t, x_t.ndim) * pred
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        log_var = self.log_variance(var_values, t, x_t.ndim)
        return {
            "mean": mean,
            "log_variance": log_var.expand_as(x_t),
            "pred_x0": pred_x0,
            "eps": self.eps_from_x0(x_t, t, pred_x0),
        }

    def p_mean_variance(self, model_fn: ModelFn, x, t, model_kwargs=None, clip_denoised=False):
        """Call the network at x_t (with original t) and return ``p_from_output``'s dict."""
        t = self._as_t(t, x)
        out = self.wrap(model_fn)(x, t, **(model_kwargs or {}))
        return self.p_from_output(out, x, t, clip_denoised)

    # -- one reverse step -----------------------------------------------------------------
    def p_sample(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        generator: Generator = None,
    ) -> torch.Tensor:
        """Ancestral step x_t -> x_{t-1} = mean + σ·z (no noise at t=0).  x: (B, C, H, W); t: index."""
        t = self._as_t(t, x)
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        if noise is None:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        generator: Generator = None,
    ) -> torch.Tensor:
        """DDIM step (Song et al. 2021, eq. 12) x_t -> x_{t-1}; eta=0 is deterministic.

        x_{t-1} = sqrt(ᾱ_{t-1}) x̂0 + sqrt(1 - ᾱ_{t-1} - σ²) ε̂ + σ z,
        σ = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}).
        """
        t = self._as_t(t, x)
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        ac = self._gather("alphas_cumprod", t, x.ndim)
        ac_prev = self._gather("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        mean = torch.sqrt(ac_prev) * p["pred_x0"] + torch.sqrt(1 - ac_prev - sigma**2) * p["eps"]
        if eta == 0:
            return mean
        if noise is None:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise

    # -- training -------------------------------------------------------------------------
    def vb_terms(self, x0, x_t, t, p: dict, weight=None) -> torch.Tensor:
        """Variational-bound term per sample, bits/dim: KL(q(x_{t-1}|x_t,x0) || p) for t>0,
        the discretised-Gaussian decoder NLL -log p(x0|x_1) at t=0.  -> (B,)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        kl = flat_mean(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]), weight) / LOG2
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = flat_mean(nll, weight) / LOG2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses at indices t (the IDDPM hybrid; MDT's loss per pass).

        x0: (B, C, H, W); t: (B,) indices; noise: (B, C, H, W) or None (torch's RNG);
        token_weight: None or (B, 1 or C, H, W) weights (e.g. 1 on removed tokens, 0 on
        kept): every mean over C, H, W becomes Σ w·err / Σ w per sample.
        Returns (B,) tensors: ``mse`` = weighting(snr)·mse_raw (the loss term, as MDT v2's
        ``terms["mse"]``), ``mse_raw`` (unweighted MSE of the target), ``weight``, ``vb``
        (bits/dim, predicted mean detached so it trains only the variance; 0 without
        learn_sigma; times T/1000 with rescale_vb) and ``loss`` = mse + vb.
        """
        t = self._as_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self.wrap(model_fn)(x_t, t, **(model_kwargs or {}))
        self.split_output(out, x0.shape[1])  # a wrong channel count fails here, named, not in a compiled graph
        return self._terms(out, x0, x_t, t, noise, token_weight)

    def compile_losses(self, device) -> None:
        """Compile the loss maths after the network call (``training_losses``' terms: ~60 small
        ops forward and as many backward, per pass) into one graph, as the trainer does with
        ``train.compile``: a few kernels instead of ~100 launches per pass. The per-step tables are
        made on ``device`` first, so the graph reads them as inputs."""
        for name, value in vars(self).items():  # every per-step table (a float64 array over the steps)
            if isinstance(value, np.ndarray) and value.shape == (self.num_timesteps,):
                self._table(name, device)
        self._terms = torch.compile(self._terms_eager, dynamic=False)

    def _terms(self, out, x0, x_t, t, noise, token_weight):
        return self._terms_eager(out, x0, x_t, t, noise, token_weight)

    def _terms_eager(self, out, x0, x_t, t, noise, token_weight) -> dict[str, torch.Tensor]:
        """``training_losses``' terms from the network output ``out`` at (x_t, t)."""
        pred, var_values = self.split_output(out, x0.shape[1])
        mse_raw = flat_mean((self.target(x0, t, noise) - pred) ** 2, token_weight)
        weight = self.weighting(self.snr_at(t), self.predict).to(mse_raw.dtype)
        terms = {"mse_raw": mse_raw, "weight": weight, "mse": weight * mse_raw}
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = self.vb_terms(x0, x_t, t, self.p_from_output(frozen, x_t, t), token_weight)
            if self.rescale_vb:
                vb = vb * (self.num_timesteps / VB_REFERENCE_STEPS)
        else:
            vb = torch.zeros_like(mse_raw)
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
        return terms

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, predict={self.predict!r}, "
            f"learn_sigma={self.learn_sigma}, weighting={self.weighting!r})"
        )
