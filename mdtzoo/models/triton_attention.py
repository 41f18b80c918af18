"""A Triton flash-attention kernel with MDT's relative-position bias read in-kernel.

softmax(q k^T / sqrt(d) + bias) v where bias[b, h, i, j] = full[h, pos_b[i], pos_b[j]]:
``full`` (H, G, G) is the bias over the whole token grid, shared by the batch, and pos_b the
grid positions of sample b's tokens (the kept tokens in the masked pass; 0..G-1 in the full
pass). Nothing of size (B, H, N, N) is read in the forward -- the bias tile is gathered from
``full``, which is small enough to stay in L2.

Backward: one program per (key block, batch, head) recomputes the probabilities from the
saved log-sum-exp, accumulates dK and dV, and writes dS = P (dP - delta) once. dQ = dS K is
then one batched matmul and the bias gradient is dS summed over the batch at each sample's
positions (``kept_grad``: every grid pair gathers its entries from the samples that kept it)
-- no atomics anywhere.

Written for the GPU; under ``TRITON_INTERPRET=1`` it also runs on the CPU (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _program(H: tl.constexpr, NQ, D: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr):
    """This program's sample b, head h, row index b * H + h, and its block of BLOCK token rows
    (grid axis 0) and BD head-dim columns, with their in-range masks."""
    bh = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    return bh // H, bh % H, bh, offs, offs < NQ, offs_d, offs_d < D


@triton.jit
def _tile(PTR, b, h, sb, sh, sn, offs, offs_d, mask):
    """A (rows, BD) tile of a (B, H, N, d) tensor: rows ``offs`` of sample b, head h."""
    return tl.load(PTR + b * sb + h * sh + offs[:, None] * sn + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _positions(POS, b, NQ, offs, ok, HAS_POS: tl.constexpr):
    """Grid positions of tokens ``offs`` of sample b: their kept positions, or themselves."""
    if HAS_POS:
        return tl.load(POS + b * NQ + offs, mask=ok, other=0)
    else:
        return offs


@triton.jit
def _scores(q, k, FULL, h, G, pos_m, pos_n, m_ok, n_ok, scale, PREC: tl.constexpr):
    """q k^T * scale + full[h, pos_m, pos_n], in float32."""
    bias = tl.load(FULL + h * G * G + pos_m[:, None] * G + pos_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                   other=0.0)
    return tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale + bias.to(tl.float32)


@triton.jit
def _fwd_kernel(Q, K, V, FULL, POS, O, LSE, scale,
                H: tl.constexpr, NQ, G, D: tl.constexpr,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr, PREC: tl.constexpr):
    b, h, bh, offs_m, m_ok, offs_d, d_ok = _program(H, NQ, D, BM, BD)
    q = _tile(Q, b, h, sqb, sqh, sqn, offs_m, offs_d, m_ok[:, None] & d_ok[None, :])
    pos_m = _positions(POS, b, NQ, offs_m, m_ok, HAS_POS)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(0, NQ, BN):
        offs_n = start + tl.arange(0, BN)
        n_ok = offs_n < NQ
        k = _tile(K, b, h, skb, skh, skn, offs_n, offs_d, n_ok[:, None] & d_ok[None, :])
        pos_n = _positions(POS, b, NQ, offs_n, n_ok, HAS_POS)
        s = _scores(q, k, FULL, h, G, pos_m, pos_n, m_ok, n_ok, scale, PREC)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b, h, svb, svh, svn, offs_n, offs_d, n_ok[:, None] & d_ok[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * NQ + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _bwd_kernel(Q, K, V, FULL, POS, DO, LSE, DELTA, DK, DV, DS, scale,
                H: tl.constexpr, NQ, G, D: tl.constexpr,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr, PREC: tl.constexpr):
    b, h, bh, offs_n, n_ok, offs_d, d_ok = _program(H, NQ, D, BN, BD)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _tile(K, b, h, skb, skh, skn, offs_n, offs_d, kv_mask)
    v = _tile(V, b, h, svb, svh, svn, offs_n, offs_d, kv_mask)
    pos_n = _positions(POS, b, NQ, offs_n, n_ok, HAS_POS)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for start in range(0, NQ, BM):
        offs_m = start + tl.arange(0, BM)
        m_ok = offs_m < NQ
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _tile(Q, b, h, sqb, sqh, sqn, offs_m, offs_d, q_mask)
        do = _tile(DO, b, h, sdb, sdh, sdn, offs_m, offs_d, q_mask)
        pos_m = _positions(POS, b, NQ, offs_m, m_ok, HAS_POS)
        lse = tl.load(LSE + bh * NQ + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_ok, other=0.0)
        s = _scores(q, k, FULL, h, G, pos_m, pos_n, m_ok, n_ok, scale, PREC)
        p = tl.exp(s - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(tl.float32)
        tl.store(DS + bh * NQ * NQ + offs_m[:, None] * NQ + offs_n[None, :], ds.to(DS.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    tl.store(DK + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _kept_grad_kernel(DS, INV, OUT, B, K, G, H: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    """OUT[h, p, q] = sum over b of DS[b, h, INV[b, p], INV[b, q]] where both are kept (INV >= 0).

    One program per (h, p block, q block) gathers its tile from every sample in turn: each output
    is written once, in a fixed summation order -- no atomics, deterministic.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    h = tl.program_id(2)
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    p_ok = offs_p < G
    q_ok = offs_q < G
    acc = tl.zeros([BP, BQ], tl.float32)
    for b in range(B):
        ip = tl.load(INV + b * G + offs_p, mask=p_ok, other=-1)
        iq = tl.load(INV + b * G + offs_q, mask=q_ok, other=-1)
        ok = (ip >= 0)[:, None] & (iq >= 0)[None, :]
        base = (b * H + h).to(tl.int64) * K * K
        acc += tl.load(DS + base + ip[:, None] * K + iq[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + h * G * G + offs_p[:, None] * G + offs_q[None, :], acc, mask=p_ok[:, None] & q_ok[None, :])


@torch.library.custom_op("mdtzoo::kept_grad", mutates_args=())
def kept_grad(ds: torch.Tensor, ids_keep: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, K, K) gradient at the kept positions (B, K) of a grid of ``grid`` tokens ->
    (H, grid, grid) float32, summed over the batch (``attention.reduce_kept_grad`` on CUDA)."""
    b, h, k, _ = ds.shape
    inv = torch.full((b, grid), -1, device=ds.device, dtype=torch.int32)
    inv.scatter_(1, ids_keep.long(), torch.arange(k, device=ds.device, dtype=torch.int32).expand(b, k))
    out = torch.empty((h, grid, grid), device=ds.device, dtype=torch.float32)
    bp, bq = CONFIG["grad_bp"], CONFIG["grad_bq"]
    _kept_grad_kernel[(triton.cdiv(grid, bp), triton.cdiv(grid, bq), h)](
        ds.contiguous(), inv, out, b, k, grid, h, BP=bp, BQ=bq, num_warps=CONFIG["grad_warps"])
    return out


@kept_grad.register_fake
def _(ds, ids_keep, grid):
    return ds.new_empty((ds.shape[1], grid, grid), dtype=torch.float32)


# Block shapes and launch settings (H100-tuned by ``mdtzoo bench attention --impl triton:NAME``).
CONFIG = {"fwd_bm": 64, "fwd_bn": 64, "fwd_warps": 4, "fwd_stages": 2,
          "bwd_bm": 64, "bwd_bn": 64, "bwd_warps": 4, "bwd_stages": 2, "grad_bp": 32, "grad_bq": 64, "grad_warps": 4}


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get exact float32 products (Triton's default would be TF32), as torch's
    matmuls do unless TF32 is allowed."""
    return "tf32" if (q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (the kernels take any batch/head/token strides, as
    Attention's permuted views of one qkv tensor have), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@torch.library.custom_op("mdtzoo::relbias_flash_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor,
               pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    q, k, v, full = _rows(q), _rows(k), _rows(v), full.contiguous()
    bm, bn, bd = CONFIG["fwd_bm"], CONFIG["fwd_bn"], _head_block(d)
    o = q.new_empty(q.shape)
    lse = torch.empty((b * h, n), device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(n, bm), b * h)](
        q, k, v, full, pos if pos is not None else lse, o, lse, d ** -0.5, h, n, full.shape[-1], d,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        BM=bm, BN=bn, BD=bd, HAS_POS=pos is not None, PREC=_precision(q), num_warps=CONFIG["fwd_warps"],
        num_stages=CONFIG["fwd_stages"])
    return o, lse


@_flash_fwd.register_fake
def _(q, k, v, full, pos):
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b * h, n), dtype=torch.float32)  # contiguous, as the kernel's


@torch.library.custom_op("mdtzoo::relbias_flash_bwd", mutates_args=())
def _flash_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor, pos: torch.Tensor | None,
               o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, dS (B, H, N, N) in q's dtype."""
    b, h, n, d = q.shape
    q, k, v, full, do = _rows(q), _rows(k), _rows(v), full.contiguous(), _rows(do)
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, n)
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous (the fake kernel's strides)
    ds = torch.empty((b, h, n, n), device=q.device, dtype=q.dtype)
    bm, bn, bd = CONFIG["bwd_bm"], CONFIG["bwd_bn"], _head_block(d)
    scale = d ** -0.5
    _bwd_kernel[(triton.cdiv(n, bn), b * h)](
        q, k, v, full, pos if pos is not None else lse, do, lse, delta, dk, dv, ds, scale, h, n, full.shape[-1], d,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
        BM=bm, BN=bn, BD=bd, HAS_POS=pos is not None, PREC=_precision(q), num_warps=CONFIG["bwd_warps"],
        num_stages=CONFIG["bwd_stages"])
    dq = (ds @ k) * scale
    return dq, dk, dv, ds


@_flash_bwd.register_fake
def _(q, k, v, full, pos, o, lse, do):
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty((b, h, n, n))


def _setup(ctx, inputs, output):
    q, k, v, full, pos = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, full, pos, o, lse)


def _backward(ctx, do, _dlse):
    q, k, v, full, pos, o, lse = ctx.saved_tensors
    g = full.shape[-1]
    dq, dk, dv, ds = _flash_bwd(q, k, v, full, pos, o, lse, do)
    if pos is not None:
        dfull = kept_grad(ds, pos, g) if ds.is_cuda else _reference_kept_grad(ds, pos, g)  # the same sums
    else:
        dfull = ds.sum(0, dtype=torch.float32 if ds.dtype in (torch.float16, torch.bfloat16) else ds.dtype)
    return dq, dk, dv, dfull.to(full.dtype), None


def _reference_kept_grad(ds, pos, g):
    from mdtzoo.models.attention import reduce_kept_grad

    return reduce_kept_grad(ds.float(), pos.long(), g)


_flash_fwd.register_autograd(_backward, setup_context=_setup)


def triton_attention(q, k, v, full, ids_keep=None):
    """(B, H, N, d) attention with ``full[h, pos_i, pos_j]`` added; pos = ids_keep rows or 0..N-1."""
    pos = None if ids_keep is None else ids_keep.to(torch.int32).contiguous()
    return _flash_fwd(q, k, v, full, pos)[0]
