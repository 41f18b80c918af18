"""Tiny stand-ins for real data and weights, for tests and demos (nothing is downloaded).

    write_toy_image_folder(tmp / "images")   # an ImageNet-style folder of relations pictures
    vae = tiny_vae()                          # an untrained AutoencoderKL (2x downsampling, 4 channels)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mdtzoo.data.relations import RelationsDataset

# An AutoencoderKL small enough for CPU tests: 2x downsampling, 4 latent channels.
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, sample_size=16,
)


def tiny_vae(seed: int = 0):
    """An untrained tiny AutoencoderKL wrapped as mdtzoo.vae.LatentVAE (deterministic weights)."""
    import torch
    from diffusers import AutoencoderKL

    from mdtzoo.vae import LatentVAE

    torch.manual_seed(seed)
    return LatentVAE(AutoencoderKL(**TINY_VAE_CONFIG))


def write_toy_image_folder(
    root: str | os.PathLike,
    per_class: int = 3,
    size: tuple[int, int] = (40, 32),
    layout: str = "folders",
    classes: Sequence[str] = ("face", "count_2", "mirror"),
    suffix: str = ".png",
    seed: int = 0,
) -> list[Path]:
    """Write per_class relations pictures of each class, resized to ``size`` (W, H), and return their paths.

    layout "folders": root/<class>/<class>_<i>.png; "flat": root/<class>_<i>.png (ADM's naming: the class
    is the name before the first underscore, so underscores are dropped from class names there).
    """
    ds = RelationsDataset(split="heldout", image_size=32, heldout_size=per_class * len(classes), seed=seed, classes=tuple(classes))
    root, paths = Path(root), []
    for i in range(len(ds)):
        x, y = ds[i]
        name = classes[int(y)]
        arr = ((x.numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
        folder = root / name if layout == "folders" else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name.replace('_', '')}_{i:04d}{suffix}"
        Image.fromarray(arr).resize(size, Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def save_relations_grid(path: str | os.PathLike, per_class: int = 10, image_size: int = 32, zoom: int = 2) -> Path:
    """A PNG with one row per relations class (docs/img/relations_grid.png): ``per_class`` train samples each."""
    from mdtzoo.data.oracle import CLASS_NAMES

    ds = RelationsDataset(split="train", image_size=image_size, length=per_class * len(CLASS_NAMES), heldout_size=0)
    rows = []
    for c in range(len(CLASS_NAMES)):
        tiles = []
        for j in range(per_class):
            x, _ = ds[c + j * len(CLASS_NAMES)]
            arr = ((x.numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
            tiles.append(np.pad(arr, ((1, 1), (1, 1), (0, 0)), constant_values=128))  # grey separators
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path, optimize=True)
    return path
