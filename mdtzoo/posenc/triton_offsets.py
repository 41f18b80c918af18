"""The relative-position bias table's gradient as one Triton kernel (CUDA; the CPU uses
``relbias.offset_sums``' torch ops). Imported by ``posenc.relbias`` when triton is installed.

Timings (against autograd's index_put scatter and the torch ``offset_sums``):
docs/performance.md; tested against the scatter in Triton's CPU interpreter
(tests/test_models.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128  # queries per loop iteration of a program


@triton.jit
def _offset_sum_kernel(GRAD, OUT, H, R, C, sh, si, sj, BH: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[k, h] = sum of GRAD[h, i, j] over the query/key pairs (i, j) of an R x C grid at the
    offset of table row k = (dr + R - 1)(2C - 1) + (dc + C - 1), dr = row(i) - row(j) and
    dc = col(i) - col(j) (``posenc.relbias.relative_position_index``).

    One program per table row walks the queries i in blocks, each paired with its one key
    j = i - (dr, dc): every sum in a fixed order, written once -- deterministic, no atomics.
    """
    k = tl.program_id(0)
    dr = k // (2 * C - 1) - (R - 1)
    dc = k % (2 * C - 1) - (C - 1)
    hs = tl.arange(0, BH)
    h_ok = hs < H
    n = R * C
    acc = tl.zeros([BH], tl.float32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        rj = i // C - dr
        cj = i % C - dc
        ok = (i < n) & (rj >= 0) & (rj < R) & (cj >= 0) & (cj < C)
        ptrs = GRAD + hs[:, None].to(tl.int64) * sh + i[None, :].to(tl.int64) * si + (rj * C + cj)[None, :] * sj
        acc += tl.sum(tl.load(ptrs, mask=h_ok[:, None] & ok[None, :], other=0.0).to(tl.float32), axis=1)
    tl.store(OUT + k * H + hs, acc, mask=h_ok)


@torch.library.custom_op("mdtzoo::offset_sums", mutates_args=())
def offset_sums_kernel(grad: torch.Tensor, rows: int, cols: int, num_rows: int) -> torch.Tensor:
    """``posenc.relbias.offset_sums`` as one Triton kernel: (H, N, N) gradient of the full-grid
    bias -> (num_rows, H) float32 table gradient (rows past the grid's offsets are zero)."""
    h = grad.shape[0]
    out = torch.zeros((num_rows, h), device=grad.device, dtype=torch.float32)
    offsets = (2 * rows - 1) * (2 * cols - 1)
    _offset_sum_kernel[(offsets,)](grad, out, h, rows, cols, *grad.stride(),
                                   BH=triton.next_power_of_2(h), BLOCK=BLOCK, num_warps=4)
    return out


@offset_sums_kernel.register_fake
def _(grad, rows, cols, num_rows):
    return grad.new_empty((num_rows, grad.shape[0]), dtype=torch.float32)
