"""Encode an image dataset once with the VAE into latent shards (format: latents.py).

    extract_latents(image_folder(root, split="all", flip=False, image_size=256),
                    load_vae("mse", device="cuda"), "latents/imagenet256", vae_id="mse")

Resumable: a shard whose folder is complete is skipped; anything else (a missing or
half-written shard, a leftover temporary folder) is redone. Each shard is written to a
temporary folder and renamed into place, so a killed job never leaves a shard that looks
complete. Parallel: shard k belongs to rank k % world_size (RANK / WORLD_SIZE or
SLURM_PROCID / SLURM_NTASKS), so ranks never write the same file and need no communication.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mdtzoo.data.latents import FORMAT, META_FILE, SHARD_FILE, shard_bounds, shard_is_complete, shard_name
from mdtzoo.training.distributed import env_info

# meta.json keys that must agree when an extraction is resumed into an existing folder.
RESUME_KEYS = ("format", "count", "shard_size", "latent_shape", "dtype", "scale_factor", "vae", "image_size", "class_names")


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's or SLURM's variables, else (0, 1)."""
    info = env_info()
    return info.rank, info.world


def default_device() -> torch.device:
    """cuda:LOCAL_RANK (or SLURM_LOCALID) when a GPU is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", env_info().local_rank % torch.cuda.device_count())


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_or_check_meta(out: Path, meta: dict) -> dict:
    """Write meta.json, or check that an existing one describes the same extraction."""
    path = out / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: existing {old.get(k)!r} vs requested {meta[k]!r}" for k in RESUME_KEYS if old.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{out} holds latents of a different extraction ({'; '.join(diff)}); use another --out or delete it")
        return old
    _write_json_atomic(path, meta)
    return meta


def write_shard(out: Path, k: int, start: int, arrays: dict[str, np.ndarray], corrupt=()) -> Path:
    """Write shard k's fields to a temporary folder, then rename it into place (atomic)."""
    final = out / shard_name(k)
    tmp = out / f".{shard_name(k)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for field, arr in arrays.items():
        np.save(tmp / f"{field}.npy", arr)
    info = {"index": k, "start": start, "count": len(arrays["label"]), "corrupt": [list(c) for c in corrupt]}
    (tmp / SHARD_FILE).write_text(json.dumps(info, indent=1))  # last: its presence marks the fields complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@torch.no_grad()
def encode_shard(dataset, vae, start: int, end: int, *, batch_size: int, num_workers: int, dtype, progress=None):
    """mean, std (n, 2, C, h, w) in ``dtype`` (index 1: the flipped image) and labels (n,) of items [start, end)."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, end)), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    means, stds, labels = [], [], []
    for x, y in loader:
        b = len(x)
        # ADM's flip is arr[:, ::-1] on the pixel array: the same as flipping the last axis here.
        mean, std = vae.encode(torch.cat([x, x.flip(-1)]))
        means.append(mean.float().cpu().unflatten(0, (2, b)).transpose(0, 1).numpy().astype(dtype))
        stds.append(std.float().cpu().unflatten(0, (2, b)).transpose(0, 1).numpy().astype(dtype))
        labels.append(y.numpy().astype(np.int64))
        if progress is not None:
            progress.update(b)
    return {"mean": np.concatenate(means), "std": np.concatenate(stds), "label": np.concatenate(labels)}


def extract_latents(
    dataset,
    vae,
    out: str | os.PathLike,
    *,
    vae_id: str,
    shard_size: int = 10_000,
    batch_size: int = 32,
    num_workers: int = 0,
    dtype: str = "float16",
    rank: int | None = None,
    world_size: int | None = None,
    verify: bool = False,
    progress: bool = True,
) -> dict:
    """Encode ``dataset`` (flip=False; every item, in order) into shards under ``out``.

    vae: anything with encode(images) -> (mean, std) already scaled, and ``scale``,
    ``latent_channels``, ``downsample`` (mdtzoo.vae.LatentVAE). verify: decode this rank's
    images first, so a corrupt file stops the run before any encoding.
    Returns {"written": [k...], "skipped": [k...], "meta": {...}} for this rank.
    """
    if getattr(dataset, "flip", False):
        raise ValueError("build the dataset with flip=False: extraction stores the image and its mirror image itself")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    size, down = int(dataset.image_size), int(vae.downsample)
    if size % down:
        raise ValueError(f"image_size {size} is not a multiple of the VAE's downsampling factor {down}")
    count = len(dataset)
    num_shards = -(-count // shard_size)
    meta = {
        "format": FORMAT, "count": count, "shard_size": int(shard_size), "num_shards": num_shards,
        "latent_shape": [int(vae.latent_channels), size // down, size // down], "dtype": dtype,
        "scale_factor": float(vae.scale), "vae": str(vae_id), "image_size": size,
        "class_names": list(getattr(dataset, "class_names", map(str, range(dataset.num_classes)))),
        "dataset": {"name": getattr(dataset, "name", type(dataset).__name__), "root": getattr(dataset, "root", None)},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = write_or_check_meta(out, meta)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo, skipped = [], []
    for k in mine:
        for stale in out.glob(f".{shard_name(k)}.tmp-*"):  # left by a killed run; shard k is ours alone
            shutil.rmtree(stale, ignore_errors=True)
        start, end = shard_bounds(k, count, shard_size)
        (skipped if shard_is_complete(out / shard_name(k), start, end - start, meta["latent_shape"]) else todo).append(k)
    bounds = {k: shard_bounds(k, count, shard_size) for k in todo}
    # verify=True decodes this rank's images up front: "error" raises here, "skip" lists them in shard.json.
    found = dict(dataset.verify([i for a, b in bounds.values() for i in range(a, b)])) if verify else {}
    paths = getattr(dataset, "paths", None)
    bar = tqdm(total=sum(b - a for a, b in bounds.values()), unit="img", desc=f"extract -> {out}", disable=not progress or rank != 0)
    for k, (start, end) in bounds.items():
        arrays = encode_shard(dataset, vae, start, end, batch_size=batch_size, num_workers=num_workers, dtype=dtype, progress=bar)
        corrupt = [(p, found[p]) for p in paths[start:end] if p in found] if paths is not None and found else []
        write_shard(out, k, start, arrays, corrupt)
    bar.close()
    return {"written": todo, "skipped": skipped, "meta": meta}
