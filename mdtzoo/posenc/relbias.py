"""`posenc.relbias`: a learned per-head relative position bias over the whole token grid.

One table per attention block, shape ((2G-1)^2 + 3, H): entry
(drow + G - 1)(2G - 1) + (dcol + G - 1) is the bias for a query-key offset
(drow, dcol). The 3 trailing rows are never indexed; they exist because the
reference MDT code took the table from BEiT (cls-token rows) and its
checkpoints carry them. In the masked pass the bias is taken at the kept
tokens' rows and columns.
"""

from __future__ import annotations

import torch
from torch import nn

from mdtzoo.registry import POSENC

UNUSED_ROWS = 3  # BEiT's cls-token rows, kept for checkpoint compatibility


def relative_position_index(rows: int, cols: int) -> torch.Tensor:
    """(N, N) int64: the table row for every (query, key) pair of a row-major grid."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    d_row = r[:, None] - r[None, :] + rows - 1  # in [0, 2 rows - 2]
    d_col = c[:, None] - c[None, :] + cols - 1
    return d_row * (2 * cols - 1) + d_col


class RelativePositionBias(nn.Module):
    """Per-head additive attention bias from a learned table.

    forward(ids_keep=None) -> (H, N, N) for the full pass, or (B, H, K, K) at the
    kept tokens ids_keep: (B, K) for the masked pass.
    """

    kind = "relative"

    def __init__(self, grid: tuple[int, int], num_heads: int, init_std: float = 0.02):
        super().__init__()
        rows, cols = grid
        self.grid = (rows, cols)
        num_rows = (2 * rows - 1) * (2 * cols - 1) + UNUSED_ROWS
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=init_std, a=-2.0, b=2.0)
        self.register_buffer("relative_position_index", relative_position_index(rows, cols))

    def full(self) -> torch.Tensor:
        """(H, N, N): the bias of every (query, key) pair of the whole grid, shared by the batch."""
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def table_gather(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The reference gather: (H, N, N), or (B, H, K, K) read from the table per sample.

        Simple but slow to differentiate (B*H*K*K values scatter-added into the table's rows);
        the attention fast paths use ``full()`` and ``models.attention.kept_bias`` instead.
        """
        if ids_keep is None:
            return self.full()
        index = self.relative_position_index[ids_keep[:, :, None], ids_keep[:, None, :]]
        return self.relative_position_bias_table[index].permute(0, 3, 1, 2)  # (B, H, K, K)

    def forward(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.table_gather(ids_keep)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, heads={self.relative_position_bias_table.shape[1]}"


@POSENC.register("relbias")
def relbias(dim: int, grid: tuple[int, int], num_heads: int, init_std: float = 0.02) -> RelativePositionBias:
    """Learned per-block, per-head relative position bias over the whole grid (MDT)."""
    return RelativePositionBias(grid, num_heads, init_std=init_std)


relbias.kind = "relative"
