"""What every mdtzoo dataset shares: per-item random generators, splits, the epoch.

The trainer's exact-resume and DDP guarantees rest on one rule: ``dataset[i]`` is a pure
function of (index, seed, epoch). Augmentation randomness (a flip, a posterior sample)
comes from :func:`item_rng`, never from a global RNG, so a DataLoader worker, another
rank and a resumed run all see the same tensors for the same index.
"""

from __future__ import annotations

import numpy as np
import torch

SPLITS = ("train", "heldout")
# The heldout split never depends on a run's seed: runs with different seeds report
# their held-out loss on the same images.
SPLIT_SEED = 20230101
# A heldout split is at most this fraction of a finite dataset (see heldout_count).
MAX_HELDOUT_FRACTION = 0.1


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of item ``index`` at ``epoch`` of a run with ``seed``.

    SeedSequence hashes the tuple, so neighbouring indices / epochs get independent
    streams; ``stream`` separates independent uses (content vs. augmentation).
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]))


def check_split(split: str, allowed=SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, allowed))}")
    return split


def heldout_count(n: int, heldout_size: int) -> int:
    """Images held out of a finite dataset of ``n``: min(heldout_size, 10% of n)."""
    if heldout_size < 0:
        raise ValueError(f"heldout_size must be >= 0, got {heldout_size}")
    return min(int(heldout_size), int(n * MAX_HELDOUT_FRACTION))


def split_indices(n: int, split: str, heldout_size: int) -> np.ndarray:
    """Sorted item indices (into 0..n-1) of ``split``: "train", "heldout" or "all".

    The heldout items are a fixed pseudo-random choice (SPLIT_SEED) of heldout_count(n)
    items; train is the rest, so the two are disjoint and together cover 0..n-1.
    """
    check_split(split, SPLITS + ("all",))
    if split == "all":
        return np.arange(n, dtype=np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = heldout_count(n, heldout_size)
    chosen = order[:k] if split == "heldout" else order[k:]
    return np.sort(chosen).astype(np.int64)


def to_signed_chw(arr: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (ADM: x / 127.5 - 1)."""
    return np.ascontiguousarray(arr.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0)


class SeededDataset(torch.utils.data.Dataset):
    """Base: ``seed``, the current ``epoch``, ``rng(index, epoch)``; subclasses set the attributes and ``_item``.

    Attributes every dataset has: ``name``, ``num_classes``, ``image_size``, ``channels``,
    ``split``, ``labels`` ((len,) int64, the label of each index, for samplers and FID),
    ``latent`` (True for VAE latents). ``item(index, epoch)`` is the pure function;
    ``ds[i]`` is ``item(i, ds.epoch)``. The epoch is a plain per-process attribute on
    purpose: a DataLoader worker that calls ``set_epoch`` (e.g. per item, at an epoch
    boundary) must not change the epoch another worker is using.
    """

    name: str = ""
    latent: bool = False
    num_classes: int
    image_size: int
    channels: int

    def __init__(self, seed: int = 0, split: str = "train"):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.split = split
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (flips, posterior samples); content stays fixed."""
        self.epoch = int(epoch)

    def rng(self, index: int, epoch: int, stream: int = 0) -> np.random.Generator:
        return item_rng(self.seed, epoch, index, stream)

    def item(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of ``index`` at ``epoch``, whatever ``self.epoch`` is."""
        return self._item(self._check_index(index), int(epoch))

    def _item(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # subclasses: index already in 0..len-1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(index, self.epoch)

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} ({self.split}) of length {n}")
        return int(index) % n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"classes={self.num_classes}, shape=({self.channels}, {self.image_size}, {self.image_size}))"
        )


def label_tensor(label) -> torch.Tensor:
    """A 0-d int64 tensor (collates to (B,))."""
    return torch.tensor(int(label), dtype=torch.int64)
