"""The latent autoencoder: a thin wrapper over diffusers' ``AutoencoderKL``, loaded offline.

    vae = load_vae("ema", device="cuda")         # stabilityai/sd-vae-ft-ema, local files only
    mean, std = vae.encode(images)                # images (B, 3, 256, 256) in [-1, 1]
    z = vae.sample(images, generator=g)           # (B, 4, 32, 32), scaled by 0.18215
    images = vae.decode(z)

Latents are scaled by ``scale`` (0.18215, Stable Diffusion's) so that they have roughly
unit variance. Pixel-space models use ``IdentityAutoencoder`` (same interface, no-op).
Weights are never downloaded: ``load_vae`` reads a local directory or the Hugging Face
cache and otherwise raises ``VAEWeightsNotFoundError`` saying where it looked.
The VAE is frozen everywhere in mdtzoo, so encode / decode run without autograd.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mdtzoo.diffusion.noise import Generator, randn

LATENT_SCALE = 0.18215
VAE_IDS = {
    "mse": "stabilityai/sd-vae-ft-mse",  # the reference trains on latents from this one
    "ema": "stabilityai/sd-vae-ft-ema",  # and decodes FID samples with this one
}


class VAEWeightsNotFoundError(FileNotFoundError):
    """The VAE weights are neither in the given directory nor in the Hugging Face cache."""


class LatentVAE:
    """Scaled encode / decode around an ``AutoencoderKL``.  images: (B, 3, H, W) in [-1, 1]."""

    def __init__(self, autoencoder, scale: float = LATENT_SCALE):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(scale)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def downsample(self) -> int:
        """Spatial reduction factor: 2^(number of down blocks - 1), 8 for the SD VAEs."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def _dtype_device(self):
        p = next(self.autoencoder.parameters())
        return p.dtype, p.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior mean and std, each (B, 4, H/8, W/8) (store both to sample later)."""
        dtype, device = self._dtype_device()
        posterior = self.autoencoder.encode(images.to(device, dtype)).latent_dist
        return posterior.mean * self.scale, posterior.std * self.scale

    @torch.no_grad()
    def sample(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """A scaled posterior sample (B, 4, H/8, W/8): (mean + std·z)·scale, z from ``generator``."""
        mean, std = self.encode(images)
        return mean + std * randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        dtype, device = self._dtype_device()
        return self.autoencoder.decode(latents.to(device, dtype) / self.scale).sample

    def to(self, *args, **kwargs) -> "LatentVAE":
        self.autoencoder.to(*args, **kwargs)
        return self


class IdentityAutoencoder:
    """No autoencoder (pixel-space diffusion): encode / sample / decode are the identity."""

    scale = 1.0
    downsample = 1

    def __init__(self, channels: int = 3):
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def sample(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def to(self, *args, **kwargs) -> "IdentityAutoencoder":
        return self


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache that is searched: ``cache_dir`` or HF_HUB_CACHE / HF_HOME."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants  # reads HF_HOME / HF_HUB_CACHE

    return Path(constants.HF_HUB_CACHE)


def _model_id(spec: str) -> str:
    return VAE_IDS.get(spec, VAE_IDS.get(spec.removeprefix("sd-vae-ft-"), spec))


def _local(spec: str) -> Path | None:
    """``spec`` as a local directory, if it reads as one (a path rather than a name or hub id)."""
    local = Path(spec).expanduser()
    return local if (local.is_absolute() or spec.startswith((".", "~")) or local.exists()) else None


def _not_in_cache(model_id: str, cache: Path) -> VAEWeightsNotFoundError:
    folder = cache / ("models--" + model_id.replace("/", "--"))
    return VAEWeightsNotFoundError(
        f"VAE weights for {model_id!r} are not available offline: looked in the Hugging Face cache "
        f"{folder} (cache root {cache}; set HF_HOME or HF_HUB_CACHE to change it), and downloads are "
        f"disabled. To put them there, on a machine with network run\n"
        f"    huggingface-cli download {model_id} --cache-dir {cache}\n"
        f"and copy {folder} to this machine, or save the model to a directory with "
        f"AutoencoderKL.save_pretrained(dir) and pass that directory to load_vae."
    )


def _no_local_vae(local: Path) -> VAEWeightsNotFoundError:
    return VAEWeightsNotFoundError(
        f"no VAE in {local} (expected config.json and diffusion_pytorch_model.safetensors there); "
        f"write one with AutoencoderKL.save_pretrained({str(local)!r}) where the weights are"
    )


def check_vae_available(name_or_path: str | os.PathLike | None, *, cache_dir: str | os.PathLike | None = None) -> None:
    """The ``VAEWeightsNotFoundError`` ``load_vae`` would raise for a missing directory or model,
    found from the file tree alone (no diffusers, no weights read): a sweep checks its points'
    VAEs with it before submitting anything."""
    if name_or_path is None or str(name_or_path) in ("none", "identity"):
        return
    spec = str(name_or_path)
    local = _local(spec)
    if local is not None:
        if not (local / "config.json").is_file():
            raise _no_local_vae(local)
        return
    cache = hf_cache_dir(cache_dir)
    model_id = _model_id(spec)
    if not any((cache / ("models--" + model_id.replace("/", "--"))).glob("snapshots/*/config.json")):
        raise _not_in_cache(model_id, cache)


def load_vae(
    name_or_path: str | os.PathLike | None = "mse",
    *,
    cache_dir: str | os.PathLike | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    scale: float = LATENT_SCALE,
) -> LatentVAE | IdentityAutoencoder:
    """A VAE from a local directory or the HF cache, never the network.

    name_or_path: "mse" / "ema" (the SD VAEs), a hub id such as "stabilityai/sd-vae-ft-mse"
      (looked up in the cache only), a directory holding ``config.json`` and the weights
      (as written by ``AutoencoderKL.save_pretrained``), or None / "none" for pixel space.
    Raises VAEWeightsNotFoundError naming the model id and the directory searched.
    """
    if name_or_path is None or str(name_or_path) in ("none", "identity"):
        return IdentityAutoencoder()
    from diffusers import AutoencoderKL  # imported here: GPU benchmark machines may lack diffusers

    check_vae_available(name_or_path, cache_dir=cache_dir)  # a missing directory or model, named
    spec = str(name_or_path)
    local = _local(spec)
    if local is not None:
        vae = AutoencoderKL.from_pretrained(local, local_files_only=True, torch_dtype=dtype)
    else:
        cache, model_id = hf_cache_dir(cache_dir), _model_id(spec)
        try:
            vae = AutoencoderKL.from_pretrained(
                model_id, cache_dir=cache, local_files_only=True, torch_dtype=dtype
            )
        except (OSError, ValueError) as err:
            raise _not_in_cache(model_id, cache) from err
    if device is not None:
        vae = vae.to(device)
    return LatentVAE(vae, scale=scale)
