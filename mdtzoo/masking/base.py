"""The structure every masking strategy returns, and helpers shared by strategies.

A masking strategy decides, per sample, which of the N tokens the encoder keeps.
Every strategy returns a :class:`MaskOut`; the model, the trainer (loss on removed
tokens, paper Table 5e) and the tests only ever see this structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskOut:
    """Which tokens are kept, per sample; every sample keeps the same number K.

    ids_shuffle: (B, N) int64, a permutation per sample: kept tokens first, removed after.
    ids_restore: (B, N) int64, the inverse permutation (``ids_shuffle[b][ids_restore[b]] = arange(N)``).
    mask:        (B, N) float, 1 = removed, 0 = kept (the MAE/MDT convention).
    num_keep:    K, the number of kept tokens (the same for every sample).
    """

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    num_keep: int

    @property
    def ids_keep(self) -> torch.Tensor:
        """(B, K) indices of the kept tokens, in the order the encoder sees them."""
        return self.ids_shuffle[:, : self.num_keep]

    @property
    def ids_removed(self) -> torch.Tensor:
        """(B, N - K) indices of the removed tokens."""
        return self.ids_shuffle[:, self.num_keep :]

    def rows(self, start: int, stop: int) -> "MaskOut":
        """The masks of samples start..stop-1 (a micro-batch's share of a global draw)."""
        return MaskOut(self.ids_shuffle[start:stop], self.ids_restore[start:stop], self.mask[start:stop],
                       self.num_keep)

    def in_grid_order(self) -> "MaskOut":
        """The same mask with the kept (and the removed) tokens in ascending grid order.

        A masked pass's result does not depend on the order of the kept tokens (attention is
        permutation-equivariant and the interpolator restores the grid order), but the fast
        attention kernels read the relative-position bias at the kept positions, and sorted
        positions make those reads nearly contiguous (docs/performance.md).
        """
        keep = self.ids_keep.sort(dim=1).values
        removed = self.ids_removed.sort(dim=1).values
        return from_shuffle(torch.cat([keep, removed], dim=1), self.num_keep)

    def to(self, device: torch.device | str) -> "MaskOut":
        return MaskOut(
            self.ids_shuffle.to(device), self.ids_restore.to(device), self.mask.to(device), self.num_keep
        )


def from_shuffle(ids_shuffle: torch.Tensor, num_keep: int) -> MaskOut:
    """A MaskOut from a per-sample permutation whose first ``num_keep`` entries are kept.

    ids_shuffle: (B, N) int64.
    """
    batch, n = ids_shuffle.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # 0 for the first num_keep slots of the shuffled order, 1 after; unshuffle to token order.
    mask = (ids_restore >= num_keep).to(torch.float32)
    return MaskOut(ids_shuffle, ids_restore, mask, int(num_keep))


def from_mask(mask: torch.Tensor) -> MaskOut:
    """A MaskOut from an explicit binary mask (B, N), 1 = removed, the same count per sample.

    Kept tokens keep their ascending token order, which is what a user-given mask
    (inpainting, tests) expects. Raises ValueError naming the offending counts.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, N) with 1 = removed; got shape {tuple(mask.shape)}")
    removed = mask.detach().to(torch.float32)
    if not torch.all((removed == 0) | (removed == 1)):
        raise ValueError("mask must be binary (1 = removed, 0 = kept)")
    counts = removed.sum(dim=1)
    if counts.numel() and not torch.all(counts == counts[0]):
        raise ValueError(
            "every sample must remove the same number of tokens (the encoder batch is "
            f"rectangular); removed counts per sample: {counts.to(torch.int64).tolist()}"
        )
    num_keep = mask.shape[1] - int(counts[0].item()) if counts.numel() else mask.shape[1]
    # A stable sort puts kept tokens (0) first in ascending order, then removed (1).
    ids_shuffle = torch.sort(removed, dim=1, stable=True).indices
    return from_shuffle(ids_shuffle, num_keep)


def keep_count(num_tokens: int, ratio: float) -> int:
    """Tokens kept at mask ratio ``ratio``: int(N * (1 - ratio)), as the MDT/MAE code computes it.

    (The paper's "N^ = rho N" is a typo: the code keeps (1 - rho) N; 0.3 on 256 keeps 179.)
    """
    return int(num_tokens * (1 - float(ratio)))


def check_ratio(ratio: float, name: str = "ratio") -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of tokens removed); got {ratio}")
    return ratio
