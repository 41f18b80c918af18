"""The block's MLP with the tanh-GELU's backward inside the second linear's input-gradient matmul.

The MLP is y = fc2(gelu(fc1(h))) with u = fc1(h) of width 4D. Its backward, compiled by inductor,
is a cuBLAS matmul writing dg = dy W2 (4D wide), a GELU-backward kernel reading dg and u and writing
du = dg gelu'(u), and a column sum reading du again for fc1's bias gradient -- 20 units of (B*N, D)
bf16 traffic between the two matmuls, ~150 µs per XL/2 block call at HBM bandwidth
(docs/performance.md, session 9's block table). Here one Triton matmul computes dg tile by tile in
registers and, before anything is written, multiplies it by gelu'(u) read for the same tile, stores
du, and sums the tile's columns for the bias gradient: 8 units (read u, write du) and no dg.

Everything else in the MLP stays torch (cuBLAS matmuls, inductor's GELU forward): ``GeluMLP`` is an
autograd Function whose forward is the usual maths and whose backward calls the one fused op,
``mdtzoo::linear_dgelu``, between torch's weight-gradient and input-gradient matmuls.

Measured (docs/performance.md, session 13): **slower than the default**. This matmul (pointer loads,
no TMA, no warp specialisation) runs its main loop at about half of cuBLAS's rate, which costs more
than the traffic it saves (XL/2 full pass on an H200: 509.5 µs against 424.9 for cuBLAS + inductor).
So ``mlp_impl='torch'`` is the default. This path is kept for a faster matmul to build on.

``gelu_mlp`` is the entry point (``Block`` with ``mlp_impl='triton'``): the Function on CUDA (and
under ``TRITON_INTERPRET=1``) for 16- and 32-bit floats, the module's own maths elsewhere. Under
autocast the Function computes in autocast's dtype, as ``nn.Linear`` would: the weights are cast
once in the forward and the gradients come back in the parameters' dtype.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from mdtzoo.models.kernel_ops import INTERPRETED, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs none of this
    triton = None

# Launch settings of the fused matmul (one program per (BM, BN) tile of du, BK-deep steps over K = D).
CONFIG = {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def gelu_tanh_grad(u: torch.Tensor) -> torch.Tensor:
    """d/du of GELU(u) with the tanh approximation, 0.5 u (1 + tanh(c (u + 0.044715 u^3)))."""
    t = torch.tanh(SQRT_2_OVER_PI * (u + GELU_CUBIC * u ** 3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * u * u)


def reference_dgelu(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(du, dbias) of the op below in torch: du = (dy w) gelu'(u) in u's dtype, dbias = du's column
    sums in float32. dy: (M, K), w: (K, N) (fc2's weight, (out, in)), u: (M, N)."""
    dg = (dy.float() @ w.float())
    du = dg * gelu_tanh_grad(u.float())
    return du.to(u.dtype), du.sum(0)


if triton is not None:
    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _dgelu_kernel(DY, W, U, DU, PART, M, N, K, s_dy, s_w, s_u, s_du,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr, C: tl.constexpr, A: tl.constexpr):
        """Tile (pid_m, pid_n) of du = (dy w) gelu'(u), and its column sums into PART[pid_m]. Tiles go
        in groups of GROUP_M rows of tiles, so that neighbouring programs share dy's and w's tiles in L2.
        IEEE: float32 products (float32 inputs: no TF32). UPCAST: 16-bit tiles widened to float32
        before the product (exact) -- for Triton's CPU interpreter, whose bf16 products are wrong.
        C, A: the tanh GELU's sqrt(2 / pi) and cubic coefficient (``SQRT_2_OVER_PI``, ``GELU_CUBIC``)."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BM)
        tiles_n = tl.cdiv(N, BN)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        a_ptrs = DY + rm[:, None].to(tl.int64) * s_dy + rk[None, :]
        b_ptrs = W + rk[:, None].to(tl.int64) * s_w + rn[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            k_ok = (k + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * s_w
        ok = m_ok[:, None] & n_ok[None, :]
        u = tl.load(U + rm[:, None].to(tl.int64) * s_u + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        t = _tanh(C * (u + A * u * u * u))
        du = acc * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * C * (1.0 + 3.0 * A * u * u))
        tl.store(DU + rm[:, None].to(tl.int64) * s_du + rn[None, :], du.to(DU.dtype.element_ty), mask=ok)
        tl.store(PART + pid_m.to(tl.int64) * N + rn, tl.sum(du, 0), mask=n_ok)  # rows past M: du = 0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernel's loads step rows by their stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@kernel_op("mdtzoo::linear_dgelu")
def linear_dgelu(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """du = (dy w) gelu'(u) (u's dtype) and its column sums (float32): dy (M, K), w (K, N), u (M, N)."""
    dy, w, u = _rows(dy), _rows(w), _rows(u)
    m, k = dy.shape
    n = w.shape[1]
    cfg = CONFIG
    du = torch.empty((m, n), device=u.device, dtype=u.dtype)
    part = torch.empty((triton.cdiv(m, cfg["BM"]), n), device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    launch(_dgelu_kernel, grid)(dy, w, u, du, part, m, n, k, dy.stride(0), w.stride(0), u.stride(0), du.stride(0),
                                BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
                                IEEE=dy.dtype == torch.float32, UPCAST=INTERPRETED, C=SQRT_2_OVER_PI, A=GELU_CUBIC,
                                num_warps=cfg["num_warps"],
                                num_stages=cfg["num_stages"])
    return du, part.sum(0)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in here: autocast's where it is on, else h's."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


class GeluMLP(torch.autograd.Function):
    """y = fc2(gelu_tanh(fc1(h))) with a fused GELU backward. h: (..., D). ``fused``: 'triton' (the GELU
    forward by inductor, its backward in ``linear_dgelu``) or 'cublaslt' (both inside cuBLASLt's
    matmuls, ``models.lt_mlp``: fc1's forward with the GELU in its epilogue, fc2's input gradient with
    the GELU's backward in its epilogue, each bias gradient in its weight gradient's matmul)."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, fused="triton"):
        dt = _compute_dtype(h)
        hc, w1c, w2c = h.to(dt), w1.to(dt), w2.to(dt)
        if fused == "cublaslt":
            from mdtzoo.models.lt_mlp import linear_gelu

            g, u = linear_gelu(hc.reshape(-1, hc.shape[-1]), w1c, b1.to(dt))
            g, u = g.reshape(*hc.shape[:-1], -1), u.reshape(*hc.shape[:-1], -1)
        else:
            u = F.linear(hc, w1c, b1.to(dt))
            g = F.gelu(u, approximate="tanh")
        ctx.save_for_backward(hc, w1c, u, g, w2c)
        ctx.dtypes = (h.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        ctx.fused = fused
        return F.linear(g, w2c, b2.to(dt))

    @staticmethod
    def backward(ctx, dy):
        hc, w1c, u, g, w2c = ctx.saved_tensors
        h_dt, w1_dt, b1_dt, w2_dt, b2_dt = ctx.dtypes
        d, hidden = hc.shape[-1], u.shape[-1]
        dy2, h2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype), hc.reshape(-1, d)
        u2, g2 = u.reshape(-1, hidden), g.reshape(-1, hidden)
        if ctx.fused == "cublaslt":  # each bias gradient inside its weight gradient's matmul
            from mdtzoo.models.lt_mlp import dgelu_linear, weight_grad

            dw2, db2 = weight_grad(dy2, g2)
            du = dgelu_linear(dy2, w2c, u2)
            dw1, db1 = weight_grad(du, h2)
        else:
            dw2 = dy2.t() @ g2
            db2 = dy2.sum(0, dtype=torch.float32)
            du, db1 = linear_dgelu(dy2, w2c, u2)
            dw1 = du.t() @ h2
        dh = (du @ w1c).reshape(hc.shape).to(h_dt)
        # the bias gradients in the compute dtype first, as nn.Linear's under autocast
        return (dh, dw1.to(w1_dt), db1.to(u.dtype).to(b1_dt), dw2.to(w2_dt), db2.to(u.dtype).to(b2_dt), None)


def usable(h: torch.Tensor, fused: str = "triton") -> bool:
    """Whether ``GeluMLP`` runs for h: 16- or 32-bit floats, and for 'triton' CUDA with triton or the
    interpreter on the CPU ('cublaslt' runs anywhere: off CUDA its ops are torch's maths)."""
    if h.dtype not in FLOATS:
        return False
    if fused == "cublaslt":
        return True
    if triton is None:
        return False
    return h.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def gelu_mlp(h: torch.Tensor, mlp, fused: str = "triton") -> torch.Tensor:
    """``mlp(h)`` for timm's ``Mlp`` with a tanh GELU (fc1, act, fc2; no norm, no dropout); the fused
    GELU (``fused``: 'triton' or 'cublaslt') where ``usable``, the module itself elsewhere."""
    if not usable(h, fused):
        return mlp(h)
    return GeluMLP.apply(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, fused)
