"""`posenc.sincos` / `posenc.sincos_learnable`: the 2-D sine-cosine table (MAE convention)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mdtzoo.registry import POSENC


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M, dim) table: [sin(p w_k), cos(p w_k)] with w_k = 1e4^(-k/(dim/2)), k < dim/2."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension; got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int | None = None) -> np.ndarray:
    """(rows*cols, dim) float64 table, tokens row-major.

    The first half of the channels encodes the column, the second half the row
    (MAE's meshgrid puts w first); each half is [sin, cos]. For dim 384 on a 16x16
    grid, token 1 starts 0.841471, 0.788593, 0.734822 (SPEC section 2).
    """
    cols = rows if cols is None else cols
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4; got {dim}")
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)


class AbsolutePosEmbed(nn.Module):
    """An additive (1, N, D) positional table; ``weight`` trainable or frozen.

    Frozen tables are still parameters (requires_grad=False), as in DiT, so that
    they are saved, loaded and counted like the reference checkpoints.
    """

    kind = "absolute"

    def __init__(self, dim: int, grid: tuple[int, int], learnable: bool):
        super().__init__()
        table = torch.from_numpy(sincos_2d(dim, *grid)).float().unsqueeze(0)
        self.weight = nn.Parameter(table, requires_grad=learnable)
        self.grid = tuple(grid)

    def forward(self) -> torch.Tensor:
        """(1, N, D)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.weight.shape[-1]}, learnable={self.weight.requires_grad}"


@POSENC.register("sincos")
def sincos(dim: int, grid: tuple[int, int], num_heads: int = 0) -> AbsolutePosEmbed:
    """Fixed 2-D sin-cos table added to the tokens (DiT)."""
    return AbsolutePosEmbed(dim, grid, learnable=False)


sincos.kind = "absolute"


@POSENC.register("sincos_learnable")
def sincos_learnable(dim: int, grid: tuple[int, int], num_heads: int = 0) -> AbsolutePosEmbed:
    """Trainable table initialised to the 2-D sin-cos table (MDT's pos_embed, decoder_pos_embed)."""
    return AbsolutePosEmbed(dim, grid, learnable=True)


sincos_learnable.kind = "absolute"
