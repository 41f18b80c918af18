"""The adaLN block's LayerNorm + modulate steps, the second with the attention's gated residual, as
one Triton kernel each way.

A DiT/MDT block normalises its input for the attention, then the attention's output ``a`` joins the
residual stream and is normalised for the MLP at once::

    h1 = LayerNorm(x) * (1 + scale1) + shift1          # the attention's input (``norm_fork``)
    x1 = x + gate * a                                  # (B, N, D), float32 stream
    h = LayerNorm(x1) * (1 + scale) + shift            # the MLP's input (``gated_residual_norm``)

``gate``, ``shift`` and ``scale`` are per-sample (B, D) vectors (views of the adaLN projection).
Compiled by inductor, the backward of the last two lines is a LayerNorm backward that loops over each
row twice and writes the normalised row in float32 to read it back, plus separate kernels for the
per-sample column sums that give the gradients of gate, shift and scale -- each reading the same
(B, N, D) tensors again (docs/performance.md, session 9). Here one program takes a few rows of one
sample and does all of it in one pass: the row statistics, dx, da, and the three column sums, which
it accumulates in registers over its rows and writes once; the partial sums of a sample's programs
are added afterwards (a (B, programs, 3, D) tensor, small).

The forward keeps each row in registers (the whole row is one tile; D is a compile-time constant)
and saves the rows' mean and 1 / std; the backward recomputes x1 from x, a and gate rather than
saving it (the same bytes read, no (B, N, D) float32 tensor kept per block).

x reaches both the first LayerNorm and the residual, so its gradient is the sum of two; ``norm_fork``
passes x on as the residual through its own autograd node, whose backward then adds the residual's
gradient and the LayerNorm's in one kernel (left to autograd, the sum would be a kernel of its own).

``norm_fork`` and ``gated_residual_norm`` are the entry points: these kernels on CUDA (and under
``TRITON_INTERPRET=1``), the same maths in torch elsewhere (``reference_norm``, ``reference``). h1
comes in shift1's dtype and h in ``a``'s (bf16 under autocast, where torch's LayerNorm would give
float32 for the next matmul to cast to bf16).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mdtzoo.models.kernel_ops import kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs none of this
    triton = None

# Launch settings; None: chosen by the row tile's width (``AUTO``). experiments/bench/norm_sweep.py on an
# H100 (docs/performance.md, session 11, calls v2 and v5): 4 forward rows of 4 warps and 64-row backward
# chunks run the kernels near the memory bound at S/2's, B/2's and XL/2's widths. Per step the backward
# wants, for both forms together: 1 row of 4 warps at S/2's 512-wide tile (270 µs; 4 rows: 537), 4 rows
# of 4 warps at B/2's 1024 (458; 1 row: 520), 4 of 8 at XL's 2048 (212; 2 of 4: 199, but ptxas spills
# its plain form). Wider tiles (no model of the zoo) take 1 row of 16 warps, untimed.
CONFIG = {"fwd_rows": 4, "fwd_warps": 4, "bwd_rows": None, "bwd_warps": None, "bwd_chunk": 64}
_BWD = {512: (1, 4), 1024: (4, 4), 2048: (4, 8)}  # row tile -> (rows, warps); narrower tiles as 512's


def _bwd_by_tile(bd: int) -> tuple[int, int]:
    return _BWD.get(max(bd, 512), (1, 16))


AUTO = {"bwd_rows": lambda bd: _bwd_by_tile(bd)[0], "bwd_warps": lambda bd: _bwd_by_tile(bd)[1]}


def _setting(key: str, bd: int) -> int:
    """CONFIG[key], or for None its width-dependent choice at row tile ``bd``."""
    value = CONFIG[key]
    if value is None and key not in AUTO:
        raise ValueError(f"triton_norm.CONFIG[{key!r}] is None, but only {', '.join(AUTO)} are chosen by width; "
                         "set it to a positive integer")
    return AUTO[key](bd) if value is None else value


def launch_settings(d: int) -> dict:
    """The launch settings the kernels take for rows of width ``d``: CONFIG with its None entries
    chosen by the row tile (``AUTO``)."""
    bd = _tile(d)
    return {key: _setting(key, bd) for key in CONFIG}


def reference_norm(x, shift, scale, eps: float = 1e-6):
    """The block's LayerNorm + modulate: LayerNorm(x) (1 + scale) + shift."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def reference(x, a, gate, shift, scale, eps: float = 1e-6):
    """The block's own maths: (x1, h) = (x + gate a, ``reference_norm(x1)``)."""
    x1 = x + gate.unsqueeze(1) * a
    return x1, reference_norm(x1, shift, scale, eps)


MAX_WIDTH = 8192  # a row is one register tile; wider rows take the torch maths
FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # the kernels compute in float32: no float64


def usable(x: torch.Tensor, a: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernels run for ``x`` (and ``a``): CUDA with triton, or the interpreter on the
    CPU; 16- or 32-bit floats; rows of at most ``MAX_WIDTH``."""
    if triton is None or x.shape[-1] > MAX_WIDTH:
        return False
    if x.dtype not in FLOATS or (a is not None and a.dtype not in FLOATS):
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def gated_residual_norm(x, a, gate, shift, scale, eps: float = 1e-6):
    """(x1, h) as ``reference``; one Triton kernel each way where ``usable``."""
    if not usable(x, a):
        return reference(x, a, gate, shift, scale, eps)
    x1, h, _, _ = _norm_fwd(x, a, gate, shift, scale, float(eps))
    return x1, h


if triton is not None:
    @triton.jit
    def _norm_fwd_kernel(X, A, G, SH, SC, X1, H, MEAN, RSTD, T, N, sg, ssh, ssc, eps,
                    D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr, RES: tl.constexpr):
        """ROWS token rows per program: with RES, x1 = x + g a (stored), else x1 = x; x1's mean and
        1/std, h = x̂ (1 + sc) + sh."""
        eps = tl.cast(eps, tl.float32)  # inductor passes Python floats to its launches as float64
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BD)
        r_ok = rows < T
        ok = r_ok[:, None] & (cols < D)[None, :]
        b = rows // N
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x1 = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        if RES:
            a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(G + b[:, None] * sg + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            x1 += g * a
            tl.store(X1 + offs, x1.to(X1.dtype.element_ty), mask=ok)
        mean = tl.sum(x1, 1) / D
        diff = tl.where(ok, x1 - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
        sh = tl.load(SH + b[:, None] * ssh + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(SC + b[:, None] * ssc + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        h = diff * rstd[:, None] * (1.0 + sc) + sh
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)
        tl.store(MEAN + rows, mean, mask=r_ok)
        tl.store(RSTD + rows, rstd, mask=r_ok)

    @triton.jit
    def _norm_bwd_kernel(X, A, G, SC, MEAN, RSTD, DH, DX1, DX, DA, PART, N, R, CH, sg, ssc,
                    D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr, RES: tl.constexpr):
        """Rows [c R, (c + 1) R) of sample b (program (b, c)): dx = dx1 + the LayerNorm backward of
        dh (1 + sc), and the rows' column sums of dh and dh x̂ into PART[b, c, 1:]; with RES, x1 =
        x + g a (recomputed), da = dx g and the column sums of dx a into PART[b, c, 0]."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        cols = tl.arange(0, BD)
        c_ok = cols < D
        sc1 = 1.0 + tl.load(SC + b * ssc + cols, mask=c_ok, other=0.0).to(tl.float32)
        if RES:
            g = tl.load(G + b * sg + cols, mask=c_ok, other=0.0).to(tl.float32)
        acc_g = tl.zeros([BD], tl.float32)
        acc_sh = tl.zeros([BD], tl.float32)
        acc_sc = tl.zeros([BD], tl.float32)
        end = tl.minimum((c + 1) * R, N)
        for start in range(c * R, end, ROWS):
            r = start + tl.arange(0, ROWS)
            r_ok = r < end
            ok = r_ok[:, None] & c_ok[None, :]
            rows = b * N + r
            offs = rows[:, None].to(tl.int64) * D + cols[None, :]
            x1 = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
            if RES:
                a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
                x1 += g[None, :] * a
            mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
            xhat = tl.where(ok, (x1 - mean[:, None]) * rstd[:, None], 0.0)
            dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
            dxhat = dh * sc1[None, :]
            m1 = tl.sum(dxhat, 1) / D
            m2 = tl.sum(dxhat * xhat, 1) / D
            dx = tl.load(DX1 + offs, mask=ok, other=0.0).to(tl.float32)
            dx += tl.where(ok, rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None]), 0.0)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
            if RES:
                tl.store(DA + offs, (dx * g[None, :]).to(DA.dtype.element_ty), mask=ok)
                acc_g += tl.sum(dx * a, 0)
            acc_sh += tl.sum(dh, 0)
            acc_sc += tl.sum(dh * xhat, 0)
        part = PART + ((b * CH + c) * 3).to(tl.int64) * D
        tl.store(part + cols, acc_g, mask=c_ok)  # zeros without RES (never read)
        tl.store(part + D + cols, acc_sh, mask=c_ok)
        tl.store(part + 2 * D + cols, acc_sc, mask=c_ok)


def _vector(t: torch.Tensor) -> torch.Tensor:
    """A (B, D) per-sample vector with unit column stride (the adaLN chunks are such views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _tile(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _launch_fwd(x, a, gate, shift, scale, eps: float, h_dtype: torch.dtype):
    """The forward kernel -> (x1, or None without a residual (a None), h, mean, rstd)."""
    b, n, d = x.shape
    res = a is not None
    x, shift, scale = x.contiguous(), _vector(shift), _vector(scale)
    a, gate = (a.contiguous(), _vector(gate)) if res else (x, shift)  # without RES never read
    # without RES, X1 is never written: h stands in (an output, so that no input looks written to)
    x1 = torch.empty_like(x) if res else None
    h = torch.empty(x.shape, device=x.device, dtype=h_dtype)
    mean = torch.empty(b * n, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bd = _tile(d)
    rows = _setting("fwd_rows", bd)
    launch(_norm_fwd_kernel, (triton.cdiv(b * n, rows),))(
        x, a, gate, shift, scale, x1 if res else h, h, mean, rstd, b * n, n, gate.stride(0), shift.stride(0),
        scale.stride(0), eps, D=d, BD=bd, ROWS=rows, RES=res, num_warps=_setting("fwd_warps", bd))
    return x1, h, mean, rstd


def _launch_bwd(x, a, gate, scale, mean, rstd, dh, dx_in):
    """The backward kernel -> (dx, da or None without a residual (a None), the column sums (B, 3, D):
    of dx a (zeros without a residual), dh and dh x̂, float32)."""
    b, n, d = x.shape
    res = a is not None
    x, dh, dx_in, scale = x.contiguous(), dh.contiguous(), dx_in.contiguous(), _vector(scale)
    a, gate = (a.contiguous(), _vector(gate)) if res else (x, scale)  # without RES never read
    bd = _tile(d)
    chunk = _setting("bwd_chunk", bd)
    ch = triton.cdiv(n, chunk)
    dx = torch.empty_like(x)
    da = torch.empty_like(a) if res else None
    part = torch.empty((b, ch, 3, d), device=x.device, dtype=torch.float32)
    launch(_norm_bwd_kernel, (b, ch))(x, a, gate, scale, mean, rstd, dh, dx_in, dx, da if res else dx, part, n, chunk, ch,
                                 gate.stride(0), scale.stride(0), D=d, BD=bd, ROWS=_setting("bwd_rows", bd),
                                 RES=res, num_warps=_setting("bwd_warps", bd))
    return dx, da, part.sum(1)


@kernel_op("mdtzoo::gated_residual_norm")
def _norm_fwd(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x1 (x's dtype), h (a's dtype), and each row's mean and 1/std (B * N, float32)."""
    return _launch_fwd(x, a, gate, shift, scale, eps, a.dtype)


@kernel_op("mdtzoo::gated_residual_norm_bwd")
def _norm_bwd(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, dh: torch.Tensor, dx1: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx, da, dgate, dshift, dscale, each in its input's dtype (the column sums in float32 first)."""
    dx, da, sums = _launch_bwd(x, a, gate, scale, mean, rstd, dh, dx1)
    dgate, dshift, dscale = sums.unbind(1)  # views of one tensor: copied apart (outputs may not alias)
    return dx, da, dgate.to(gate.dtype, copy=True), dshift.to(gate.dtype, copy=True), dscale.to(scale.dtype, copy=True)


def _setup(ctx, inputs, output):
    x, a, gate, shift, scale, _ = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, a, gate, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _backward(ctx, dx1, dh, _dmean, _drstd):
    x, a, gate, scale, mean, rstd = ctx.saved_tensors
    dx, da, dgate, dshift, dscale = _norm_bwd(x, a, gate, scale, mean, rstd, dh, dx1)
    return dx, da, dgate, dshift.to(ctx.shift_dtype), dscale, None


_norm_fwd.register_autograd(_backward, setup_context=_setup)


# LayerNorm 1: h = LayerNorm(x) (1 + scale) + shift at the block's input. x also continues as the
# residual; ``norm_fork`` passes it through, so that the residual's gradient reaches this backward
# and is added in the same kernel as the LayerNorm's (the sum autograd would otherwise make apart).

@kernel_op("mdtzoo::norm_modulate")
def _ln_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> h (shift's dtype), and each row's mean and 1/std (B * N, float32)."""
    return _launch_fwd(x, None, None, shift, scale, eps, shift.dtype)[1:]


@kernel_op("mdtzoo::norm_modulate_bwd")
def _ln_bwd(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor,
            dx_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx = dx_in + the LayerNorm backward of dh (1 + scale), dshift, dscale (in scale's dtype)."""
    dx, _, sums = _launch_bwd(x, None, None, scale, mean, rstd, dh, dx_in)
    return dx, sums[:, 1].to(scale.dtype, copy=True), sums[:, 2].to(scale.dtype, copy=True)


class _NormFork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        h, mean, rstd = _ln_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return x.view_as(x), h

    @staticmethod
    def backward(ctx, dx_out, dh):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = _ln_bwd(x, scale, mean, rstd, dh, dx_out)
        return dx, dshift.to(ctx.shift_dtype), dscale, None


def norm_fork(x, shift, scale, eps: float = 1e-6):
    """(x, h = ``reference_norm``): x passed on as the residual, h the attention's input; one Triton
    kernel each way where ``usable`` (the backward adds the residual's gradient and LayerNorm's in
    one pass and sums the shift and scale gradients over the tokens)."""
    if not usable(x, shift):
        return x, reference_norm(x, shift, scale, eps)
    return _NormFork.apply(x, shift, scale, float(eps))
