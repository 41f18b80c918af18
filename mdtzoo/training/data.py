"""Deterministic, resumable data order: step -> the exact indices each rank loads.

Epoch e is a permutation of the dataset drawn from (seed, e); step s takes the s-th
global batch of that order (the last incomplete batch of an epoch is dropped); rank r
takes its slice, split further into micro-batches for gradient accumulation. The data
position of a run is therefore just its step, and a resumed run loads exactly what
the uninterrupted one would have.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochIndexed(Dataset):
    """Wraps a dataset so items are fetched by (index, epoch): augmentation follows the epoch,
    also inside DataLoader worker processes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def check_batch_split(global_batch: int, micro_batch: int | None, world: int) -> None:
    """A ValueError unless the global batch splits evenly over the processes and then into
    micro-batches (``micro_batch`` None: one micro-batch per process)."""
    per_rank = global_batch // world
    if global_batch % world or per_rank % (micro_batch or per_rank):
        raise ValueError(f"global batch {global_batch} must split evenly over {world} processes and then into "
                         f"micro-batches of {micro_batch}")


def check_dataset_size(size: int, global_batch: int) -> None:
    if size < global_batch:
        raise ValueError(f"the dataset has {size} items, fewer than one global batch of {global_batch}")


class StepSampler(Sampler):
    """Yields, per micro-batch, a list of (index, epoch) keys, from ``start_step`` on, for ``steps`` steps."""

    def __init__(self, size: int, global_batch: int, micro_batch: int, rank: int, world: int, seed: int,
                 start_step: int, steps: int):
        check_batch_split(global_batch, micro_batch, world)
        check_dataset_size(size, global_batch)
        self.size, self.global_batch, self.micro = size, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.start, self.steps = start_step, steps
        self.steps_per_epoch = size // global_batch
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm

    def step_indices(self, step: int) -> tuple[list[int], int]:
        """This rank's indices for ``step`` and the epoch they belong to."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        per_rank = self.global_batch // self.world
        start = pos * self.global_batch + self.rank * per_rank
        return self.permutation(epoch)[start : start + per_rank].tolist(), epoch

    def __iter__(self):
        for step in range(self.start, self.start + self.steps):
            idx, epoch = self.step_indices(step)
            for m in range(0, len(idx), self.micro):
                yield [(i, epoch) for i in idx[m : m + self.micro]]

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world // self.micro)


def make_loader(dataset: Dataset, sampler: StepSampler, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        EpochIndexed(dataset), batch_sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
