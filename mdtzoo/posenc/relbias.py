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

try:  # the CUDA kernel for the table gradient
    from mdtzoo.posenc.triton_offsets import offset_sums_kernel
except ImportError:  # pragma: no cover - installs without triton
    offset_sums_kernel = None

UNUSED_ROWS = 3  # BEiT's cls-token rows, kept for checkpoint compatibility


def relative_position_index(rows: int, cols: int) -> torch.Tensor:
    """(N, N) int64: the table row for every (query, key) pair of a row-major grid."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    d_row = r[:, None] - r[None, :] + rows - 1  # in [0, 2 rows - 2]
    d_col = c[:, None] - c[None, :] + cols - 1
    return d_row * (2 * cols - 1) + d_col


def _skew_sum(x: torch.Tensor) -> torch.Tensor:
    """x (H, n, n, *rest) -> (H, 2n - 1, *rest) with out[:, s] = sum of x[:, i, k] over i + k = s.

    Each row i is shifted right by i (pad the rows to length 2n, read the buffer back in rows of
    2n - 1), then the rows are summed: plain pads, views and one reduction, no scatter.
    """
    h, n, rest = x.shape[0], x.shape[1], x.shape[3:]
    padded = torch.cat([x, x.new_zeros(h, n, n, *rest)], dim=2).reshape(h, 2 * n * n, *rest)
    return padded[:, : n * (2 * n - 1)].reshape(h, n, 2 * n - 1, *rest).sum(1)


def offset_sums(grad: torch.Tensor, grid: tuple[int, int], num_rows: int) -> torch.Tensor:
    """The table gradient of ``RelativePositionBias.full()``: (H, N, N) -> (num_rows, H), each table
    row the sum of the gradient over all (query, key) pairs at its grid offset.

    The same sums as autograd's scatter-add into the table (index_put with accumulate), computed
    as two skewed sums over the grid's row and column pairs instead -- deterministic, no atomics
    and no sort; the unused trailing rows get zeros.
    """
    rows, cols = grid
    h = grad.shape[0]
    # (h, r1, c1, r2, c2) -> (h, r1, R-1-r2, c1, C-1-c2): row offset r1 - r2 + R - 1 = r1 + (R-1-r2)
    g = grad.reshape(h, rows, cols, rows, cols).permute(0, 1, 3, 2, 4).flip(2, 4)
    g = _skew_sum(g)  # (h, 2R-1, c1, C-1-c2)
    g = _skew_sum(g.permute(0, 2, 3, 1))  # (h, 2C-1, 2R-1)
    sums = g.transpose(1, 2).reshape(h, -1).t()  # row (drow)(2C-1) + dcol, as relative_position_index
    return torch.cat([sums, sums.new_zeros(num_rows - sums.shape[0], h)])


class _FullBias(torch.autograd.Function):
    """table[index].permute(2, 0, 1) with ``offset_sums`` as its backward (on CUDA the same sums
    by one Triton kernel, ``posenc.triton_offsets``)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        ctx.grid, ctx.num_rows = grid, table.shape[0]
        return table[index].permute(2, 0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad.is_cuda and offset_sums_kernel is not None:  # one deterministic kernel
            table_grad = offset_sums_kernel(grad, ctx.grid[0], ctx.grid[1], ctx.num_rows).to(grad.dtype)
        else:
            table_grad = offset_sums(grad, ctx.grid, ctx.num_rows)
        return table_grad, None, None


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
        return _FullBias.apply(self.relative_position_bias_table, self.relative_position_index, self.grid)

    def offsets(self) -> torch.Tensor:
        """(H, 2R - 1, 2C - 1): the bias at every grid offset, [h, drow + R - 1, dcol + C - 1] -- the
        table's used rows as a view (its gradient flows to the table as is). What the Triton
        kernel's masked pass reads: full()[h, p, p'] is the entry at the offset p - p'."""
        rows, cols = self.grid
        used = (2 * rows - 1) * (2 * cols - 1)
        return self.relative_position_bias_table[:used].t().reshape(-1, 2 * rows - 1, 2 * cols - 1)

    def table_gather(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The reference gather: (H, N, N), or (B, H, K, K) read from the table per sample.

        Simple but slow to differentiate (the values scatter-added into the table's rows by
        autograd); the attention fast paths use ``full()`` (its backward: ``offset_sums``) and
        ``models.attention.kept_bias`` instead, so this stays an independent reference for both.
        """
        if ids_keep is None:
            return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
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
