"""Generate images from a trained model: labels, seeded noise, sampling, decoding, .npz / .png.

    images, labels = generate(model, build_diffusion(respacing="250"), "ddpm", "power_cosine",
                              num_samples=50_000, labels="uniform", batch_size=64, seed=0,
                              vae=load_vae("ema", device="cuda"), device="cuda")
    save_npz("samples.npz", images, labels)     # the ADM evaluation format

Sample i's label and all of its noise derive from (seed, i) alone, so results do not
depend on the batch size or the number of processes. Under torch.distributed (or with
RANK / WORLD_SIZE set) each rank generates a contiguous share; ``generate_npz`` writes
one shard per rank and rank 0 merges them into a single file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mdtzoo.registry import GUIDANCE, SAMPLERS


# SeedSequence streams: sample i's noise and the run's labels never share random numbers.
NOISE_STREAM, LABEL_STREAM = 0, 1


# -- seeding and labels -------------------------------------------------------------------
def sample_generator(seed: int, index: int, stream: int = NOISE_STREAM) -> torch.Generator:
    """A CPU generator for sample ``index`` of run ``seed`` (independent streams via SeedSequence)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def make_labels(labels, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Labels for every sample, (num_samples,) int64.

    "uniform" (or None): i.i.d. uniform over classes, as ADM / DiT sample for FID.
    "balanced": each class num_samples/num_classes times (±1), in a seeded random order.
    "null": the null class (``num_classes``) everywhere, i.e. unconditional sampling.
    A sequence: used as given (length num_samples).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, LABEL_STREAM]))
    if labels is None or (isinstance(labels, str) and labels == "uniform"):
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    if isinstance(labels, str) and labels == "balanced":
        return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    if isinstance(labels, str) and labels == "null":
        return np.full(num_samples, num_classes, dtype=np.int64)
    if isinstance(labels, str):
        raise ValueError(f"unknown labels {labels!r}; expected 'uniform', 'balanced', 'null' or a list")
    out = np.asarray(labels, dtype=np.int64)
    if out.shape != (num_samples,):
        raise ValueError(f"got {out.shape[0] if out.ndim else 0} labels for num_samples={num_samples}")
    return out


# -- distribution -------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else torchrun's or SLURM's variables."""
    import torch.distributed as dist

    from mdtzoo.training.distributed import env_info

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    info = env_info()
    return info.rank, info.world


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous sample indices of ``rank``: shares differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# -- images -------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C): ((x+1)·127.5).round().clamp(0, 255)."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _sample_shape(model, sample_shape):
    if sample_shape is not None:
        return tuple(sample_shape)
    channels, size = getattr(model, "in_channels", None), getattr(model, "input_size", None)
    if channels is None or size is None:
        raise ValueError("pass sample_shape=(C, H, W): the model has no in_channels / input_size attributes")
    return (channels, size, size) if isinstance(size, int) else (channels, *size)


@torch.no_grad()
def generate(
    model,
    diffusion,
    sampler="ddpm",
    guidance="none",
    *,
    num_samples: int,
    labels: str | Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    vae=None,
    device=None,
    progress: bool = False,
    num_classes: int = 1000,
    sample_shape: tuple[int, int, int] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Sample images; returns (uint8 (n, H, W, 3), int64 labels (n,)) for this rank's share.

    model: model(x, t, y) -> (B, C or 2C, H, W), x: (B, C, H, W) latents (or pixels).
    diffusion: a GaussianDiffusion (respaced as wanted). sampler / guidance: registered
      names (gin bindings apply, e.g. ``samplers.ddim.eta``) or built instances; guidance
      built here gets null_class = num_classes.
    labels: "uniform" / None, "balanced", "null" or a sequence (see ``make_labels``).
    vae: a LatentVAE to decode latents, or None for pixel-space models.
    sample_shape: (C, H, W) of x; default from ``model.in_channels`` / ``model.input_size``.
    rank / world_size: default ``dist_info()``; with world_size > 1 only the indices
      ``shard_range(num_samples, rank, world_size)`` are generated, so concatenating the
      ranks' outputs in rank order gives exactly the single-process result.
    precision: 'fp32' or 'bf16' (the network under bf16 autocast, its output and the sampler's
      arithmetic in float32: the same samples up to bf16 rounding, several times faster on a GPU).
    The model is put in eval mode for the call (label dropout off) and restored after.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16'; got {precision!r}")
    if rank is None or world_size is None:
        rank, world_size = dist_info()
    sampler = SAMPLERS.resolve(sampler)
    # The null label is the row after the last class (1000 for ImageNet), by convention.
    guidance = GUIDANCE.resolve(guidance, null_class=num_classes)
    if guidance.null_class != num_classes:
        raise ValueError(f"guidance null_class={guidance.null_class} but num_classes={num_classes}; "
                         "the null label must be num_classes")
    if device is None:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = params[0].device if params else torch.device("cpu")
    shape = _sample_shape(model, sample_shape)
    all_labels = make_labels(labels, num_samples, num_classes, seed)
    indices = shard_range(num_samples, rank, world_size)

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    model_fn = guidance.wrap(model if precision == "fp32" else _bf16(model, device))
    images = []
    try:
        for start in range(indices.start, indices.stop, batch_size):
            batch = range(start, min(start + batch_size, indices.stop))
            generators = [sample_generator(seed, i) for i in batch]
            y = torch.as_tensor(all_labels[batch.start:batch.stop], device=device)
            x = sampler(diffusion, model_fn, (len(batch), *shape), model_kwargs={"y": y},
                        generator=generators, progress=progress, device=device)
            if vae is not None:
                x = vae.decode(x)
            images.append(to_uint8(x))
    finally:
        if was_training:
            model.train()
    height_width_channels = images[0].shape[1:] if images else (0, 0, 3)
    out = np.concatenate(images) if images else np.zeros((0, *height_width_channels), np.uint8)
    return out, all_labels[indices.start:indices.stop]


def _bf16(model, device):
    dev_type = torch.device(device).type

    def run(*args, **kwargs):
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            return model(*args, **kwargs).float()

    return run


# -- files --------------------------------------------------------------------------------
def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and ``arr_1`` (int64 labels) atomically (temp file + os.replace)."""
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def merge_npz(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Concatenate shard .npz files (in the given order) into one, atomically."""
    images, labels = [], []
    for shard in shards:
        with np.load(shard) as data:
            images.append(data["arr_0"])
            labels.append(data["arr_1"])
    return save_npz(path, np.concatenate(images), np.concatenate(labels))


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` writes its share of ``path``: ``<stem>.rank00003-of-00008.npz``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank:05d}-of-{world_size:05d}.npz")


def generate_npz(path, model, diffusion, sampler="ddpm", guidance="none", *, wait_s: float = 86400.0,
                 poll_s: float = 5.0, **generate_kwargs) -> Path | None:
    """``generate`` on every rank, then one .npz at ``path`` (returned on rank 0, None elsewhere).

    Each rank writes its shard atomically; rank 0 waits for all of them (a barrier under
    torch.distributed, else polling for the files, at most ``wait_s`` seconds), merges
    them in rank order and deletes the shards.
    """
    rank, world = dist_info()
    generate_kwargs.setdefault("rank", rank)
    generate_kwargs.setdefault("world_size", world)
    rank, world = generate_kwargs["rank"], generate_kwargs["world_size"]
    images, labels = generate(model, diffusion, sampler, guidance, **generate_kwargs)
    if world == 1:
        return save_npz(path, images, labels)
    save_npz(shard_path(path, rank, world), images, labels)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    shards = [shard_path(path, r, world) for r in range(world)]
    deadline = time.monotonic() + wait_s
    while not all(s.exists() for s in shards):
        if time.monotonic() > deadline:
            missing = [str(s) for s in shards if not s.exists()]
            raise TimeoutError(f"gave up after {wait_s}s waiting for sample shards: {missing}")
        time.sleep(poll_s)
    out = merge_npz(shards, path)
    for s in shards:
        s.unlink()
    return out


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int = 8, padding: int = 2,
              pad_value: int = 0) -> Path:
    """Tile uint8 (N, H, W, C) images into rows of ``nrow`` and save as PNG (via PIL)."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be non-empty uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top:top + h, left:left + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path, format="PNG")
    return path
