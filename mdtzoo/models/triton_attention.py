"""A Triton flash-attention kernel with MDT's relative-position bias read in-kernel.

softmax(q k^T / sqrt(d) + bias) v where bias[b, h, i, j] = full[h, pos_b[i], pos_b[j]]:
``full`` (H, G, G) is the bias over the whole token grid, shared by the batch, and pos_b the
grid positions of sample b's tokens (the kept tokens in the masked pass; 0..G-1 in the full
pass). Nothing of size (B, H, N, N) is read in the forward. The full pass reads ``full``'s tiles
(contiguous, from L2). The masked pass reads the same values from the offset table (H, 2R - 1,
2C - 1) of an R x C grid -- full[h, p, p'] is the table's entry at the grid offset p - p' -- which
is small enough to stay in L1 (3.8 KB a head at 16 x 16), instead of gathering full's scattered
columns from L2.

Backward: delta = rowsum(O dO) first (a small kernel, float32 from the 16-bit tensors); then one
program per (key block, batch, head) recomputes the probabilities from the saved log-sum-exp,
accumulates dK and dV, and writes dS = P (dP - delta) once; one program per (query block, batch,
head) then computes dQ = dS K from the strided K. The bias gradient is dS summed over the batch
at each sample's positions (``kept_grad``: every grid pair gathers its entries from the samples
that kept it), in the masked pass then summed by grid offset into the table's gradient -- no
atomics anywhere, no copies of q, k, v or dO.

The ops take q, k and v packed as the model's qkv projection makes them, (B, N, 3, H, d), write the
output as (B, N, H, d) -- the output projection's input, heads already merged -- and the three
input gradients into one (B, N, 3, H, d) tensor, the projection's output gradient.

A head dim that is not a power of two (MDT-XL's 72) runs as two tiles, 64 + 16, rather than one
padded to 128 (``head_blocks``). Strides are passed in units of their alignment (``_aligned``) and
dS's rows padded to a multiple of 8, so that every row moves 16 bytes at a time even where a
stride (72, or the masked pass's 179 kept tokens) is not a multiple of 16.

Written for the GPU; under ``TRITON_INTERPRET=1`` it also runs on the CPU (tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mdtzoo.models.kernel_ops import kernel_op, launch


@triton.jit
def _program(H: tl.constexpr, NQ, BLOCK: tl.constexpr):
    """This program's sample b, head h, row index b * H + h, and its block of BLOCK token rows
    (grid axis 0) with their in-range mask."""
    bh = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bh // H, bh % H, bh, offs, offs < NQ


@triton.jit
def _load(PTR, base, sn, offs, ok, D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, AL: tl.constexpr):
    """Rows ``offs`` of a (tokens, D) slab at PTR + base * AL (row stride sn * AL) as two tiles: head-dim
    columns [0, BD0) and [BD0, BD0 + BD1), masked to D. With BD1 = 0 there is one tile (returned
    twice; the second copy is never used). Offsets and strides come in units of AL elements, so
    the compiler knows every row starts AL-aligned and loads 16 bytes at a time (head dim 72's
    strides are not multiples of 16, the only alignment Triton detects by itself)."""
    base = base * AL
    sn = sn * AL
    d0 = tl.arange(0, BD0)
    t0 = tl.load(PTR + base + offs[:, None] * sn + d0[None, :], mask=ok[:, None] & (d0 < D)[None, :], other=0.0)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        t1 = tl.load(PTR + base + offs[:, None] * sn + d1[None, :], mask=ok[:, None] & (d1 < D)[None, :], other=0.0)
    else:
        t1 = t0
    return t0, t1


@triton.jit
def _store(PTR, base, sn, offs, ok, t0, t1, D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
           AL: tl.constexpr):
    """The inverse of ``_load``: two float32 tiles written in PTR's dtype."""
    base = base * AL
    sn = sn * AL
    d0 = tl.arange(0, BD0)
    tl.store(PTR + base + offs[:, None] * sn + d0[None, :], t0.to(PTR.dtype.element_ty),
             mask=ok[:, None] & (d0 < D)[None, :])
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        tl.store(PTR + base + offs[:, None] * sn + d1[None, :], t1.to(PTR.dtype.element_ty),
                 mask=ok[:, None] & (d1 < D)[None, :])


@triton.jit
def _dot_nt(a0, a1, b0, b1, BD1: tl.constexpr, PREC: tl.constexpr):
    """a b^T summed over both head-dim tiles, float32: (M, d), (N, d) -> (M, N)."""
    out = tl.dot(a0, tl.trans(b0), input_precision=PREC).to(tl.float32)
    if BD1 > 0:
        out += tl.dot(a1, tl.trans(b1), input_precision=PREC).to(tl.float32)
    return out


@triton.jit
def _positions(POS, b, NQ, offs, ok, HAS_POS: tl.constexpr):
    """Grid positions of tokens ``offs`` of sample b: their kept positions, or themselves."""
    if HAS_POS:
        return tl.load(POS + b * NQ + offs, mask=ok, other=0)
    else:
        return offs


@triton.jit
def _grid_index(pos, HAS_POS: tl.constexpr, C: tl.constexpr):
    """What ``_bias`` reads a token's bias by: in the masked pass its grid row and column as one
    index into the offset table, row (2C - 1) + column, so that a pair's offset entry is one
    subtraction per element away; in the full pass the position itself."""
    if HAS_POS:
        return (pos // C) * (2 * C - 1) + pos % C
    else:
        return pos


@triton.jit
def _bias(BIAS, h, G, a_m, a_n, m_ok, n_ok, HAS_POS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """A tile's bias in float32, the tokens given by their ``_grid_index``. Full pass: BIAS is full
    (H, G, G), read at [h, i, j] (contiguous rows). Masked pass (an R x C grid): BIAS is the offset
    table (H, 2R - 1, 2C - 1), read at the two tokens' grid offset (row and column offsets both
    shifted to start at 0: a_m - a_n + (R - 1)(2C - 1) + C - 1) -- 4 (2R-1)(2C-1) bytes a head (3.8
    KB at MDT's 16 x 16 grid), which stays in L1, where full's rows (256 KB a head) are gathered
    from L2."""
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        ptrs = BIAS + (h * (2 * R - 1) * (2 * C - 1) + (R - 1) * (2 * C - 1) + C - 1) + (a_m[:, None] - a_n[None, :])
    else:
        ptrs = BIAS + h * G * G + a_m[:, None] * G + a_n[None, :]
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(Q, K, V, FULL, POS, O, LSE, scale,
                H: tl.constexpr, NQ, G, D: tl.constexpr,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                BM: tl.constexpr, BN: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_POS: tl.constexpr,
                R: tl.constexpr, C: tl.constexpr,
                PREC: tl.constexpr, AL: tl.constexpr):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats to its launches as float64
    b, h, bh, offs_m, m_ok = _program(H, NQ, BM)
    q0, q1 = _load(Q, b * sqb + h * sqh, sqn, offs_m, m_ok, D, BD0, BD1, AL)
    at_m = _grid_index(_positions(POS, b, NQ, offs_m, m_ok, HAS_POS), HAS_POS, C)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc0 = tl.zeros([BM, BD0], tl.float32)
    if BD1 > 0:
        acc1 = tl.zeros([BM, BD1], tl.float32)
    else:
        acc1 = acc0
    for start in range(0, NQ, BN):
        offs_n = start + tl.arange(0, BN)
        n_ok = offs_n < NQ
        k0, k1 = _load(K, b * skb + h * skh, skn, offs_n, n_ok, D, BD0, BD1, AL)
        at_n = _grid_index(_positions(POS, b, NQ, offs_n, n_ok, HAS_POS), HAS_POS, C)
        s = _dot_nt(q0, q1, k0, k1, BD1, PREC) * scale + _bias(FULL, h, G, at_m, at_n, m_ok, n_ok, HAS_POS, R, C)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load(V, b * svb + h * svh, svn, offs_n, n_ok, D, BD0, BD1, AL)
        pv = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(pv, v0, input_precision=PREC).to(tl.float32)
        if BD1 > 0:
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=PREC).to(tl.float32)
        m_i = m_new
    _store(O, b * sob + h * soh, son, offs_m, m_ok, acc0 / l_i[:, None], acc1 / l_i[:, None], D, BD0, BD1, AL)
    tl.store(LSE + bh * NQ + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, H: tl.constexpr, NQ, D: tl.constexpr, sob, soh, son, sdb, sdh, sdn,
                  BM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, AL: tl.constexpr):
    """delta[b * H + h, i] = sum over d of O * dO (the softmax backward's row term), float32."""
    b, h, bh, offs_m, m_ok = _program(H, NQ, BM)
    o0, o1 = _load(O, b * sob + h * soh, son, offs_m, m_ok, D, BD0, BD1, AL)
    do0, do1 = _load(DO, b * sdb + h * sdh, sdn, offs_m, m_ok, D, BD0, BD1, AL)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if BD1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=m_ok)


@triton.jit
def _bwd_kernel(Q, K, V, FULL, POS, DO, LSE, DELTA, DQKV, DS, scale,
                H: tl.constexpr, NQ, G, D: tl.constexpr,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, SLOT, NP,
                BM: tl.constexpr, BN: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_POS: tl.constexpr,
                R: tl.constexpr, C: tl.constexpr,
                PREC: tl.constexpr, AL: tl.constexpr):
    """dK, dV for one block of key rows of one (sample, head), written into their thirds of the packed
    gradient DQKV (dK SLOT units of AL elements after its start, dV twice that; strides sg*), and dS
    written to DS (B, H, NQ, NP * AL): its rows padded with zeros to a multiple of AL elements, so
    that every row starts aligned and the stores (and the dQ kernel's loads) move 16 bytes at a time."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats to its launches as float64
    b, h, bh, offs_n, n_ok = _program(H, NQ, BN)
    k0, k1 = _load(K, b * skb + h * skh, skn, offs_n, n_ok, D, BD0, BD1, AL)
    v0, v1 = _load(V, b * svb + h * svh, svn, offs_n, n_ok, D, BD0, BD1, AL)
    at_n = _grid_index(_positions(POS, b, NQ, offs_n, n_ok, HAS_POS), HAS_POS, C)
    dk0 = tl.zeros([BN, BD0], tl.float32)
    dv0 = tl.zeros([BN, BD0], tl.float32)
    if BD1 > 0:
        dk1 = tl.zeros([BN, BD1], tl.float32)
        dv1 = tl.zeros([BN, BD1], tl.float32)
    else:
        dk1 = dk0
        dv1 = dv0
    ds_base = bh.to(tl.int64) * NQ * NP * AL
    for start in range(0, NQ, BM):
        offs_m = start + tl.arange(0, BM)
        m_ok = offs_m < NQ
        q0, q1 = _load(Q, b * sqb + h * sqh, sqn, offs_m, m_ok, D, BD0, BD1, AL)
        do0, do1 = _load(DO, b * sdb + h * sdh, sdn, offs_m, m_ok, D, BD0, BD1, AL)
        at_m = _grid_index(_positions(POS, b, NQ, offs_m, m_ok, HAS_POS), HAS_POS, C)
        lse = tl.load(LSE + bh * NQ + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_ok, other=0.0)
        s = _dot_nt(q0, q1, k0, k1, BD1, PREC) * scale + _bias(FULL, h, G, at_m, at_n, m_ok, n_ok, HAS_POS, R, C)
        p = tl.exp(s - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        pt = tl.trans(p.to(do0.dtype))
        dv0 += tl.dot(pt, do0, input_precision=PREC).to(tl.float32)
        if BD1 > 0:
            dv1 += tl.dot(pt, do1, input_precision=PREC).to(tl.float32)
        ds = p * (_dot_nt(do0, do1, v0, v1, BD1, PREC) - delta[:, None])
        dst = tl.trans(ds.to(q0.dtype))
        dk0 += tl.dot(dst, q0, input_precision=PREC).to(tl.float32)
        if BD1 > 0:
            dk1 += tl.dot(dst, q1, input_precision=PREC).to(tl.float32)
        tl.store(DS + ds_base + offs_m[:, None] * (NP * AL) + offs_n[None, :], ds.to(DS.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_n < NP * AL)[None, :])  # zeros in the padding: aligned stores
    dk_base = b * sgb + h * sgh + SLOT  # in units of AL, as the strides
    _store(DQKV, dk_base, sgn, offs_n, n_ok, dk0 * scale, dk1 * scale, D, BD0, BD1, AL)
    _store(DQKV, dk_base + SLOT, sgn, offs_n, n_ok, dv0, dv1, D, BD0, BD1, AL)


@triton.jit
def _dq_kernel(DS, K, DQ, scale, H: tl.constexpr, NQ, D: tl.constexpr, skb, skh, skn, sqb, sqh, sqn, NP,
               BM: tl.constexpr, BN: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, PREC: tl.constexpr,
               AL: tl.constexpr):
    """dQ = scale * dS K for one block of query rows of one (sample, head): reads K's strided view
    and the dS just written (row stride NP * AL), no copies."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats to its launches as float64
    b, h, bh, offs_m, m_ok = _program(H, NQ, BM)
    dq0 = tl.zeros([BM, BD0], tl.float32)
    if BD1 > 0:
        dq1 = tl.zeros([BM, BD1], tl.float32)
    else:
        dq1 = dq0
    ds_base = bh.to(tl.int64) * NQ * NP * AL
    for start in range(0, NQ, BN):
        offs_n = start + tl.arange(0, BN)
        n_ok = offs_n < NQ
        ds = tl.load(DS + ds_base + offs_m[:, None] * (NP * AL) + offs_n[None, :],
                     mask=m_ok[:, None] & (offs_n < NP * AL)[None, :], other=0.0)  # aligned loads; the padding is 0
        k0, k1 = _load(K, b * skb + h * skh, skn, offs_n, n_ok, D, BD0, BD1, AL)
        dq0 += tl.dot(ds, k0, input_precision=PREC).to(tl.float32)
        if BD1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=PREC).to(tl.float32)
    _store(DQ, b * sqb + h * sqh, sqn, offs_m, m_ok, dq0 * scale, dq1 * scale, D, BD0, BD1, AL)


@triton.jit
def _kept_grad_kernel(DS, INV, OUT, B, K, KP, G, CHUNK, H: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    """OUT[c, h, p, q] = sum over the samples b of chunk c of DS[b, h, INV[b, p], INV[b, q]] where both
    are kept (INV >= 0); DS is (B, H, K, KP), its rows KP >= K apart.

    One program per (p block, q block, chunk c and head h) gathers its tile from the chunk's samples
    in turn: each output is written once, in a fixed summation order -- no atomics, deterministic.
    The batch is split into chunks (summed by the caller, in a fixed order too) so that there are
    enough programs to fill the GPU: one per tile and head alone left MDT-S/2's 256 samples to 192
    programs.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    c = tl.program_id(2) // H
    h = tl.program_id(2) % H
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    p_ok = offs_p < G
    q_ok = offs_q < G
    acc = tl.zeros([BP, BQ], tl.float32)
    for b in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, B)):
        ip = tl.load(INV + b * G + offs_p, mask=p_ok, other=-1)
        iq = tl.load(INV + b * G + offs_q, mask=q_ok, other=-1)
        ok = (ip >= 0)[:, None] & (iq >= 0)[None, :]
        base = (b * H + h).to(tl.int64) * K * KP
        acc += tl.load(DS + base + ip[:, None] * KP + iq[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + (c * H + h).to(tl.int64) * G * G + offs_p[:, None] * G + offs_q[None, :], acc,
             mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _batch_sum_kernel(DS, OUT, B, N, NP, BB: tl.constexpr, BJ: tl.constexpr, AL: tl.constexpr):
    """OUT[h, i, :N] = the sum over b of DS[b, h, i, :N] in float32, DS (B, H, N, NP * AL) with rows
    padded: one program per (h, i) row, BB samples a step, in a fixed order (deterministic)."""
    row = tl.program_id(0)  # h * N + i
    rows = tl.num_programs(0)  # H * N
    j = tl.arange(0, BJ)
    j_ok = j < N
    acc = tl.zeros([BJ], tl.float32)
    for b0 in range(0, B, BB):
        bs = b0 + tl.arange(0, BB)
        t = tl.load(DS + ((bs[:, None].to(tl.int64) * rows + row) * NP) * AL + j[None, :],
                    mask=(bs < B)[:, None] & j_ok[None, :], other=0.0)
        acc += tl.sum(t.to(tl.float32), 0)
    tl.store(OUT + row.to(tl.int64) * N + j, acc, mask=j_ok)


@kernel_op("mdtzoo::batch_sum")
def batch_sum(ds: torch.Tensor, n: int) -> torch.Tensor:
    """dS (B, H, N, P) with rows padded (P >= N; the padding never read) -> the full pass's bias
    gradient, its sum over the batch, (H, N, N) in float32: one Triton kernel, deterministic."""
    b, h, _, p = ds.shape
    ds = ds.contiguous()
    out = torch.empty((h, n, n), device=ds.device, dtype=torch.float32)
    al, (row,) = _divided((p,))
    launch(_batch_sum_kernel, (h * n,))(ds, out, b, n, row, BB=CONFIG["sum_bb"], BJ=_pow2(n), AL=al,
                                        num_warps=CONFIG["sum_warps"])
    return out


@kernel_op("mdtzoo::kept_grad")
def kept_grad(ds: torch.Tensor, ids_keep: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, K, K) gradient at the kept positions (B, K) of a grid of ``grid`` tokens ->
    (H, grid, grid) float32, summed over the batch (``attention.reduce_kept_grad`` on CUDA). ``ds``
    may also be (B, H, K, KP) with rows padded to KP > K (the attention backward's dS); the padding
    is never read."""
    b, h, k, kp = ds.shape
    if ids_keep.shape != (b, k) or kp < k:
        raise ValueError(f"kept_grad: ds {tuple(ds.shape)} does not match ids_keep {tuple(ids_keep.shape)}")
    inv = torch.full((b, grid), -1, device=ds.device, dtype=torch.int32)
    inv.scatter_(1, ids_keep.long(), torch.arange(k, device=ds.device, dtype=torch.int32).expand(b, k))
    bp, bq = CONFIG["grad_bp"], CONFIG["grad_bq"]
    tiles = triton.cdiv(grid, bp) * triton.cdiv(grid, bq)
    chunk = triton.cdiv(b, max(1, min(b, CONFIG["grad_programs"] // (tiles * h))))  # samples per program
    chunks = triton.cdiv(b, chunk)
    out = torch.empty((chunks, h, grid, grid), device=ds.device, dtype=torch.float32)
    launch(_kept_grad_kernel, (triton.cdiv(grid, bp), triton.cdiv(grid, bq), chunks * h))(
        ds.contiguous(), inv, out, b, k, kp, grid, chunk, h, BP=bp, BQ=bq, num_warps=CONFIG["grad_warps"])
    return out[0] if chunks == 1 else out.sum(0)


# Block shapes and launch settings (H100-tuned: experiments/bench/attn_sweep.py kernel by kernel, then
# ``mdtzoo bench train-step --triton-options NAME`` in the step; docs/performance.md, session 8);
# ``split_head``: a head dim that is not a power of two runs as two tiles (72 = 64 + 16) instead of
# one padded to the next power of two (128).
# ``grad_programs``: ``kept_grad`` splits the batch into chunks until about this many programs run.
# ``sum_kernel``: the full pass's bias gradient summed over the batch by ``batch_sum`` (our kernel)
# instead of inductor's reduction (not yet timed on a GPU: off; docs/performance.md, session 9).
CONFIG = {"fwd_bm": 64, "fwd_bn": 32, "fwd_warps": 4, "fwd_stages": 2,
          "bwd_bm": 64, "bwd_bn": 64, "bwd_warps": 4, "bwd_stages": 1, "grad_bp": 32, "grad_bq": 64, "grad_warps": 4,
          "grad_programs": 2048,
          "dq_bm": 128, "dq_bn": 64, "dq_warps": 8, "delta_bm": 64, "split_head": True,
          "sum_kernel": False, "sum_bb": 8, "sum_warps": 4}


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get exact float32 products (Triton's default would be TF32), as torch's
    matmuls do unless TF32 is allowed."""
    return "tf32" if (q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (the kernels take any batch/head/token strides, as
    Attention's permuted views of one qkv tensor have), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


ALIGN = 8  # elements: the widest alignment the kernels are told of (16 bytes of 16-bit data)


def _aligned(*tensors: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """(AL, the batch/head/token strides of the tensors divided by AL): AL is the largest power of two
    up to ``ALIGN`` elements dividing every stride. The kernels multiply the strides back by the
    constant AL, which tells the compiler each row starts AL-aligned (16 bytes for 16-bit data with
    AL = 8) -- given a plain stride of 72 it assumes nothing and loads one element at a time."""
    return _divided(tuple(st for t in tensors for st in t.stride()[:3]))


@functools.lru_cache(maxsize=1024)
def _divided(strides: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """``_aligned``'s arithmetic, cached: a step launches the same few layouts over and over."""
    al = next(a for a in (ALIGN, 4, 2, 1) if all(st % a == 0 for st in strides))
    return al, tuple(st // al for st in strides)


def _ds_cols(n: int) -> int:
    """dS's padded row length: N rounded up to a multiple of ``ALIGN`` (so of every AL). It depends
    on N alone, never on the inputs' strides, which torch.compile's fake tensors need not share."""
    return -(-n // ALIGN) * ALIGN


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python (``triton.next_power_of_2`` is a
    Triton function: slow to call from the host once per launch)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=64)
def head_blocks(d: int, split: bool = True) -> tuple[int, int]:
    """(BD0, BD1): the head dim's tiles. One power-of-two tile >= 16 covering d, or with ``split``
    two tiles when that pads less: the largest power of two <= d, then the rest padded to a power
    of two >= 16 (72 -> 64 + 16 = 80 columns of work instead of 128)."""
    single = max(16, _pow2(d))
    if not split or single == d or d <= 16:
        return single, 0
    first = max(16, 1 << (d.bit_length() - 1))
    second = max(16, _pow2(d - first)) if d > first else 0
    return (first, second) if first + second < single else (single, 0)


def _heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, d) -> q, k, v as strided (B, H, N, d) views (no copies)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _grid(bias: torch.Tensor, pos: torch.Tensor | None) -> tuple[int, int, int]:
    """(G, R, C): the grid's tokens and its sides, as the kernels take them. The full pass's bias is
    (H, G, G) (R = C = 1: unused); the masked pass's the offset table (H, 2R - 1, 2C - 1)."""
    if pos is None:
        return bias.shape[-1], 1, 1
    rows, cols = (bias.shape[1] + 1) // 2, (bias.shape[2] + 1) // 2
    return rows * cols, rows, cols


# The ops take q, k and v packed as the qkv projection makes them, (B, N, 3, H, d), and give the
# output as (B, N, H, d) and the gradient as one (B, N, 3, H, d) tensor: the kernels write straight
# into the layouts the projections read, so neither pass copies to merge heads or to assemble the
# three gradients (a (B, N, 3D) copy per block call, docs/performance.md, session 9).
@kernel_op("mdtzoo::relbias_flash_fwd_offsets")
def _flash_fwd(qkv: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> O (B, N, H, d) in qkv's dtype, and the rows' log-sum-exp (B * H, N) in float32. ``bias``:
    the full pass's (H, N, N) (pos None), or the masked pass's offset table (H, 2R - 1, 2C - 1) read
    at the offsets between the grid positions ``pos`` (B, N) of an R x C grid (``_bias``)."""
    b, n, _, h, d = qkv.shape
    q, k, v = _heads(_rows(qkv))
    bias = bias.contiguous()
    bm, bn = CONFIG["fwd_bm"], CONFIG["fwd_bn"]
    bd0, bd1 = head_blocks(d, CONFIG["split_head"])
    o = qkv.new_empty((b, n, h, d))
    lse = torch.empty((b * h, n), device=qkv.device, dtype=torch.float32)
    al, strides = _aligned(q, k, v, o.transpose(1, 2))
    g, rows, cols = _grid(bias, pos)
    launch(_fwd_kernel, (triton.cdiv(n, bm), b * h))(
        q, k, v, bias, pos if pos is not None else lse, o, lse, d ** -0.5, h, n, g, d, *strides,
        BM=bm, BN=bn, BD0=bd0, BD1=bd1, HAS_POS=pos is not None, R=rows, C=cols, PREC=_precision(q), AL=al,
        num_warps=CONFIG["fwd_warps"], num_stages=CONFIG["fwd_stages"])
    return o, lse


# The op's name changes whenever its outputs' layout does (here: dS's padded rows, dQKV packed):
# torch.compile's on-disk caches key on the traced graph, in which only the op's name appears, and
# replayed code compiled for the old layout (assert_size_stride failed; docs/performance.md, session 8).
@kernel_op("mdtzoo::relbias_flash_bwd_offsets")
def _flash_bwd(qkv: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor | None, o: torch.Tensor,
               lse: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dQKV (B, N, 3, H, d) and dS (B, H, N, ``_ds_cols(N)``), both in qkv's dtype; dS's rows
    padded with zeros to a multiple of ``ALIGN`` columns. o, do: (B, N, H, d). Four kernels:
    delta = rowsum(O dO); dK, dV and dS per key block; dQ = dS K per query block, each gradient
    written into its third of dQKV (the bias gradient is dS summed over the batch, by the caller).
    ``bias`` and ``pos`` as ``_flash_fwd``'s."""
    b, n, _, h, d = qkv.shape
    q, k, v = _heads(_rows(qkv))
    bias, o, do = bias.contiguous(), _rows(o).transpose(1, 2), _rows(do).transpose(1, 2)
    bd0, bd1 = head_blocks(d, CONFIG["split_head"])
    prec = _precision(q)
    dqkv = qkv.new_empty(qkv.shape)  # contiguous (the fake's strides)
    # the kernels write into dqkv itself (dQ at its start, dK and dV one and two slots on), never into
    # views of it, so that torch.compile sees one fresh tensor written (no copies to functionalise views)
    dq, dk, _ = _heads(dqkv)
    al, strides = _aligned(q, k, v, do, o, dk, dq)  # dK and dV share their strides
    slot = dqkv.stride(2) // al  # in units of AL: H d elements, d a multiple of AL (a head stride above)
    cols = _ds_cols(n)
    sq, sk, sv, sd, so, sg, sdq = (strides[i:i + 3] for i in range(0, 21, 3))
    np_units = cols // al
    delta = torch.empty((b * h, n), device=q.device, dtype=torch.float32)
    launch(_delta_kernel, (triton.cdiv(n, CONFIG["delta_bm"]), b * h))(o, do, delta, h, n, d, *so, *sd,
                                                                      BM=CONFIG["delta_bm"], BD0=bd0, BD1=bd1, AL=al)
    ds = torch.empty((b, h, n, cols), device=q.device, dtype=q.dtype)
    bm, bn = CONFIG["bwd_bm"], CONFIG["bwd_bn"]
    scale = d ** -0.5
    g, rows, cols = _grid(bias, pos)
    launch(_bwd_kernel, (triton.cdiv(n, bn), b * h))(
        q, k, v, bias, pos if pos is not None else lse, do, lse, delta, dqkv, ds, scale, h, n, g, d,
        *sq, *sk, *sv, *sd, *sg, slot, np_units,
        BM=bm, BN=bn, BD0=bd0, BD1=bd1, HAS_POS=pos is not None, R=rows, C=cols, PREC=prec, AL=al,
        num_warps=CONFIG["bwd_warps"], num_stages=CONFIG["bwd_stages"])
    launch(_dq_kernel, (triton.cdiv(n, CONFIG["dq_bm"]), b * h))(
        ds, k, dqkv, scale, h, n, d, *sk, *sdq, np_units,
        BM=CONFIG["dq_bm"], BN=CONFIG["dq_bn"], BD0=bd0, BD1=bd1, PREC=prec, AL=al, num_warps=CONFIG["dq_warps"])
    return dqkv, ds


def _setup(ctx, inputs, output):
    qkv, bias, pos = inputs
    o, lse = output
    ctx.save_for_backward(qkv, bias, pos, o, lse)


def _backward(ctx, do, _dlse):
    qkv, bias, pos, o, lse = ctx.saved_tensors
    dqkv, ds = _flash_bwd(qkv, bias, pos, o, lse, do)  # ds: rows padded
    n = qkv.shape[1]
    if pos is not None:  # the same sums either way; then the (H, G, G) sums by grid offset
        g, rows, cols = _grid(bias, pos)
        dfull = kept_grad(ds, pos, g) if ds.is_cuda else _reference_kept_grad(ds[..., :n], pos, g)
        dbias = _offset_grad(dfull, rows, cols)
    elif ds.is_cuda and CONFIG["sum_kernel"] and ds.dtype != torch.float64:
        dbias = batch_sum(ds, n)
    else:
        wide = torch.float32 if ds.dtype in (torch.float16, torch.bfloat16) else ds.dtype
        dbias = ds[..., :n].sum(0, dtype=wide)
    return dqkv, dbias.to(bias.dtype), None


def _offset_grad(dfull: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(H, G, G) gradient of the full-grid bias -> (H, 2R - 1, 2C - 1), the offset table's: each
    entry the sum over the grid pairs at its offset (``posenc.relbias.offset_sums``; on CUDA its
    one-kernel form)."""
    from mdtzoo.posenc.relbias import offset_sums, offset_sums_kernel

    offsets = (2 * rows - 1) * (2 * cols - 1)
    if dfull.is_cuda and offset_sums_kernel is not None:
        sums = offset_sums_kernel(dfull, rows, cols, offsets)
    else:
        sums = offset_sums(dfull, (rows, cols), offsets)
    return sums.t().reshape(-1, 2 * rows - 1, 2 * cols - 1)


def _reference_kept_grad(ds, pos, g):
    from mdtzoo.models.attention import reduce_kept_grad

    return reduce_kept_grad(ds.float(), pos.long(), g)


_flash_fwd.register_autograd(_backward, setup_context=_setup)


def triton_attention_qkv(qkv, full, ids_keep=None, offsets=None):
    """qkv (B, N, 3, H, d) -> (B, N, H, d): attention with the relative-position bias added. Full pass
    (``ids_keep`` None): ``full`` (H, N, N). Masked pass: ``offsets`` (H, 2R - 1, 2C - 1), the bias at
    each grid offset of an R x C grid, read at the offsets between the kept positions ``ids_keep``
    (B, N) (``full`` is then not read). The gradient reaches qkv as one tensor in its own layout."""
    if ids_keep is None:
        return _flash_fwd(qkv, full, None)[0]
    heads = qkv.shape[3]
    odd_sides = offsets is not None and offsets.dim() == 3 and offsets.shape[1] % 2 == offsets.shape[2] % 2 == 1
    if not odd_sides or offsets.shape[0] != heads:
        got = "none" if offsets is None else tuple(offsets.shape)
        raise ValueError(f"triton attention's masked pass reads the bias by grid offset: offsets must be "
                         f"(H={heads}, 2R - 1, 2C - 1) for an R x C grid (RelativePositionBias.offsets()), got {got}")
    cells = (offsets.shape[1] + 1) // 2 * ((offsets.shape[2] + 1) // 2)
    if ids_keep.shape != (qkv.shape[0], qkv.shape[1]) or qkv.shape[1] > cells:
        raise ValueError(f"triton attention's masked pass: ids_keep {tuple(ids_keep.shape)} must be (B, N) = "
                         f"{tuple(qkv.shape[:2])}, N at most the {cells} cells of the offsets' grid")
    return _flash_fwd(qkv, offsets, ids_keep.to(torch.int32).contiguous())[0]


def triton_attention(q, k, v, full, ids_keep=None, offsets=None):
    """(B, H, N, d) q, k, v -> (B, H, N, d); as ``triton_attention_qkv`` after packing q, k and v
    (one copy; the model passes its packed projection to ``triton_attention_qkv`` instead)."""
    qkv = torch.stack((q, k, v)).permute(1, 3, 0, 2, 4)  # (B, N, 3, H, d) view of one new tensor
    return triton_attention_qkv(qkv, full, ids_keep, offsets).transpose(1, 2)
