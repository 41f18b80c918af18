"""``latents``: VAE posteriors pre-extracted by ``mdtzoo extract``, read with memory mapping.

The reference encodes every batch with the VAE at every step; we encode each image once
and keep the posterior (mean and std) of the image and of its mirror image, so training
still sees a fresh posterior sample and a random flip every epoch (SPEC §3).

Shard format (written by extract.py; one folder per shard, renamed into place whole):

    OUT/meta.json               format, count, shard_size, num_shards, latent_shape [C, h, w],
                                dtype, scale_factor, vae, image_size, class_names, dataset
    OUT/shard_00000/mean.npy    (n, 2, C, h, w) posterior mean x scale_factor; [:, 0] image, [:, 1] flipped
    OUT/shard_00000/std.npy     (n, 2, C, h, w) posterior std x scale_factor (same layout)
    OUT/shard_00000/label.npy   (n,) int64
    OUT/shard_00000/shard.json  {"index", "start", "count", "corrupt": [[path, reason], ...]}

Item j of the extraction order is row j % shard_size of shard j // shard_size. Latents
are already multiplied by scale_factor (0.18215). mean and std are float16 by default
(half the disk: ImageNet-256 takes ~42 GB instead of ~84 GB): rounding is <= 2^-11
(~5e-4) relative, which can be as large as a small posterior std, and a std below
6e-8 flushes to 0; extract with ``--dtype float32`` when exact posterior samples matter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mdtzoo.data.common import SeededDataset, check_split, label_tensor, split_indices
from mdtzoo.registry import DATASETS

FORMAT = "mdtzoo.latents/1"
META_FILE = "meta.json"
SHARD_FILE = "shard.json"
FIELDS = ("mean", "std", "label")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def shard_bounds(k: int, count: int, shard_size: int) -> tuple[int, int]:
    """[start, end) item range of shard k."""
    return k * shard_size, min((k + 1) * shard_size, count)


def field_shapes(n: int, latent_shape) -> dict[str, tuple]:
    both = (n, 2, *latent_shape)
    return {"mean": both, "std": both, "label": (n,)}


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no latents in {root} (no {META_FILE}); make them with `mdtzoo extract --out {root} ...`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this mdtzoo reads {FORMAT!r}")
    return meta


def shard_is_complete(folder: Path, start: int, count: int, latent_shape) -> bool:
    """True when ``folder`` holds every field with the expected shape and its shard.json (written last)."""
    try:
        info = json.loads((folder / SHARD_FILE).read_text())
        if info.get("start") != start or info.get("count") != count:
            return False
        for field, shape in field_shapes(count, latent_shape).items():
            if np.load(folder / f"{field}.npy", mmap_mode="r").shape != shape:
                return False
    except (OSError, ValueError):
        return False
    return True


class LatentsDataset(SeededDataset):
    """Posterior samples of pre-extracted latents.  x: (C, h, w) float32 (scaled), y: () int64.

    Per item and epoch, one generator draws the flip (p = 0.5) and then ε ~ N(0, I):
    x = mean[flip] + std[flip]·ε.  ``sample_posterior=False`` returns mean[flip].
    """

    name = "latents"
    latent = True

    def __init__(self, root, split="train", seed=0, flip=True, sample_posterior=True, heldout_size=1000):
        super().__init__(seed, check_split(split))
        if root is None:
            raise ValueError("datasets.latents needs root= (a folder written by `mdtzoo extract`)")
        self.root, self.flip, self.sample_posterior = str(root), bool(flip), bool(sample_posterior)
        self.meta = meta = read_meta(self.root)
        self.count, self.shard_size = int(meta["count"]), int(meta["shard_size"])
        self.latent_shape = tuple(meta["latent_shape"])
        self.channels, self.image_size = self.latent_shape[0], self.latent_shape[1]  # the model's input size
        self.pixel_size, self.scale_factor = int(meta["image_size"]), float(meta["scale_factor"])
        self.vae_id = meta.get("vae")  # recorded so samples of a run on these latents can be decoded
        self.class_names = list(meta["class_names"])
        self.num_classes = len(self.class_names)
        missing = [shard_name(k) for k in range(meta["num_shards"]) if not (Path(self.root) / shard_name(k) / SHARD_FILE).is_file()]
        if missing:
            raise FileNotFoundError(
                f"latent extraction in {self.root} is incomplete: {len(missing)} of {meta['num_shards']} shards missing "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); rerun `mdtzoo extract` with --out {self.root}"
            )
        self.indices = split_indices(self.count, split, heldout_size)
        if len(self.indices) == 0:
            raise ValueError(f"the {split} split of {self.root} is empty ({self.count} items, heldout_size={heldout_size})")
        all_labels = np.concatenate([np.load(Path(self.root) / shard_name(k) / "label.npy") for k in range(meta["num_shards"])])
        self.labels = all_labels[self.indices].astype(np.int64)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = {}  # memory maps are reopened in each worker
        return state

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._open:
            folder = Path(self.root) / shard_name(k)
            self._open[k] = (np.load(folder / "mean.npy", mmap_mode="r"), np.load(folder / "std.npy", mmap_mode="r"))
        return self._open[k]

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, index: int, epoch: int):
        k, row = divmod(int(self.indices[index]), self.shard_size)
        mean, std = self._arrays(k)
        rng = self.rng(index, epoch)
        side = int(self.flip and rng.random() < 0.5)
        x = np.asarray(mean[row, side], dtype=np.float32)
        if self.sample_posterior:
            x = x + np.asarray(std[row, side], dtype=np.float32) * rng.standard_normal(x.shape, dtype=np.float32)
        return torch.from_numpy(x), label_tensor(self.labels[index])


@DATASETS.register("latents")
def latents(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    flip: bool = True,
    sample_posterior: bool = True,
    heldout_size: int = 1000,
) -> LatentsDataset:
    """VAE latents pre-extracted by `mdtzoo extract` (memory-mapped); fresh flip + posterior sample per epoch.

    root: the extraction's --out folder. heldout_size: items held out (at most 10%), the
    same rule and items as image_folder's split of the same folder. flip / sample_posterior:
    draw the mirror image with p = 0.5 / add std·ε (False: the posterior mean).
    """
    return LatentsDataset(root, split, seed, flip, sample_posterior, heldout_size)
