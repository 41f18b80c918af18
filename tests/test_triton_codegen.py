"""Our attention kernels (and the fused norm kernels, at the end) compiled for an H100 (sm_90) on the
CPU: what the GPU would run, read from the PTX, with no GPU.

The launches are the ops' own (recorded, not run) at MDT-XL/2's shapes: head dim 72, whose strides
are not multiples of 16 -- the only alignment Triton detects by itself -- and the masked pass's 179
kept tokens. Each recorded launch is compiled as Triton's JIT would specialise it (integers
divisible by 16 and 16-byte-aligned pointers marked so), and its PTX must load and store q, k, v,
O, dO, dK, dV, dQ and dS 16 bytes at a time (no 2-byte global accesses; session 8 found the
forward moving one bf16 element per instruction at head dim 72) and multiply on Hopper's
tensor cores (wgmma).
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from mdtzoo.models import kernel_codegen  # noqa: E402  (after the skip: it compiles with Triton)
from mdtzoo.models.kernel_codegen import recording as _recording, sm90_ptx as _ptx  # noqa: E402


@pytest.fixture(scope="module")
def xl_launches():
    """Every kernel launch of one forward + backward of MDT-XL/2's full and masked pass (batch 2)."""
    from mdtzoo.models import triton_attention as ta

    with _recording(ta, ("_fwd_kernel", "_delta_kernel", "_bwd_kernel", "_dq_kernel", "_batch_sum_kernel")) as launches:
        g = torch.Generator().manual_seed(0)
        for n in (256, 179):
            qkv = torch.randn(2, n, 3, 16, 72, generator=g).bfloat16()
            full = torch.randn(16, 256, 256, generator=g) if n == 256 else torch.randn(16, 31, 31, generator=g)
            pos = None if n == 256 else torch.stack([torch.randperm(256, generator=g)[:n].sort().values
                                                     for _ in range(2)]).int()
            o, lse = ta._flash_fwd(qkv, full, pos)  # packed, as Attention passes it
            ta._flash_bwd(qkv, full, pos, o, lse, torch.randn(o.shape, generator=g).bfloat16())
        ta.batch_sum(torch.zeros(2, 16, 256, 256).bfloat16(), 256)  # the full pass's dS summed over the batch
    return launches


def test_xl_kernels_move_16_bytes_at_a_time_and_use_wgmma(xl_launches):
    assert sorted({launch[0] for launch in xl_launches}) == ["_batch_sum_kernel", "_bwd_kernel", "_delta_kernel",
                                                             "_dq_kernel", "_fwd_kernel"]
    assert len(xl_launches) == 9  # four kernels, full and masked pass; the batch sum
    for name, fn, args, kwargs in xl_launches:
        assert kwargs["AL"] == 8, name  # every stride divides by 8 elements at head dim 72
        ptx = _ptx(fn, args, kwargs)
        narrow = [line.strip() for line in ptx.splitlines() if "ld.global.b16" in line or "st.global.b16" in line]
        assert not narrow, f"{name}: {len(narrow)} 2-byte global accesses, e.g. {narrow[0]}"
        if name not in ("_delta_kernel", "_batch_sum_kernel"):  # sums, no matrix product
            assert "wgmma.mma_async" in ptx, name


@pytest.fixture(scope="module")
def norm_launches():
    """The fused gated-residual + LayerNorm kernels' launches (models/triton_norm.py) at MDT-XL/2's
    width, bf16 under autocast: a float32 stream, bf16 attention output and adaLN chunks."""
    from mdtzoo.models import triton_norm as tn

    with _recording(tn, ("_norm_fwd_kernel", "_norm_bwd_kernel")) as launches:
        g = torch.Generator().manual_seed(0)
        x, a = torch.randn(2, 256, 1152, generator=g), torch.randn(2, 256, 1152, generator=g).bfloat16()
        _, _, gate, shift, scale, _ = torch.randn(2, 6 * 1152, generator=g).bfloat16().chunk(6, dim=1)
        mean, rstd = torch.zeros(512), torch.ones(512)
        tn._norm_fwd(x, a, gate, shift, scale, 1e-6)
        tn._norm_bwd(x, a, gate, scale, mean, rstd, a.clone(), x.clone())
        tn._ln_fwd(x, shift, scale, 1e-6)  # the first LayerNorm: the same kernels without the residual
        tn._ln_bwd(x, scale, mean, rstd, a.clone(), x.clone())
    return launches


def test_xl_norm_kernels_move_16_bytes_at_a_time(norm_launches):
    assert sorted(launch[0] for launch in norm_launches) == ["_norm_bwd_kernel", "_norm_bwd_kernel", "_norm_fwd_kernel", "_norm_fwd_kernel"]
    for name, fn, args, kwargs in norm_launches:
        ptx = _ptx(fn, args, kwargs)
        narrow = [line.strip() for line in ptx.splitlines() if "ld.global.b16" in line or "st.global.b16" in line]
        assert not narrow, f"{name}: {len(narrow)} 2-byte global accesses, e.g. {narrow[0]}"
        assert "ld.global.v4.b32" in ptx or "ld.global.nc.v4.b32" in ptx, name  # 16-byte row loads


F64_MATH = re.compile(r"\b(add|sub|mul|fma|div|sqrt|rsqrt|max|min|setp\.\w+)\.(rn\.)?f64\b")


def test_kernels_compile_with_float_arguments_as_inductor_passes_them(xl_launches, norm_launches):
    """Inside a compiled graph inductor launches our kernels itself (``kernel_ops``: triton_op), with
    Python floats typed fp64. The kernels cast them to fp32 first -- session 10: the attention's
    running max turned fp64 inside its loop and the forward failed to compile -- so they compile,
    and no fp64 arithmetic is left (the LayerNorm's 1/std would be computed in fp64)."""
    with_floats = [(name, fn, args, kwargs) for name, fn, args, kwargs in (*xl_launches, *norm_launches)
                   if any(isinstance(a, float) for a in args)]
    names = sorted(f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{name}" for name, fn, _, _ in with_floats)
    assert names == ["triton_attention._bwd_kernel", "triton_attention._bwd_kernel", "triton_attention._dq_kernel",
                     "triton_attention._dq_kernel", "triton_attention._fwd_kernel", "triton_attention._fwd_kernel",
                     "triton_norm._norm_fwd_kernel", "triton_norm._norm_fwd_kernel"]  # scale and eps, both passes / forms
    for name, fn, args, kwargs in with_floats:
        ptx = _ptx(fn, args, kwargs, floats="fp64")
        assert "cvt.rn.f32.f64" in ptx, name  # the argument narrowed once
        math = F64_MATH.findall(ptx)
        assert not math, f"{name}: fp64 arithmetic left: {math[:3]}"


def test_resident_warps_follow_the_register_file():
    # 65536 registers per SM, allocated per warp in units of 256, whole programs only
    assert kernel_codegen.warps_per_sm(151, 8) == 8  # 19 * 256 per warp: one program of 8 warps
    assert kernel_codegen.warps_per_sm(56, 16) == 32  # 7 * 256 per warp: two programs of 16
    assert kernel_codegen.warps_per_sm(32, 4) == 64  # 16 programs, the SM's 64-warp limit
    assert kernel_codegen.warps_per_sm(255, 4) == 8


def test_norm_kernels_do_not_spill_at_xl_width(norm_launches):
    """ptxas's report of the fused norm kernels as launched at MDT-XL/2's width with the default
    CONFIG: registers within sm_90's 255 per thread and no spills to local memory."""
    for name, fn, args, kwargs in norm_launches:
        use = kernel_codegen.ptxas_usage(_ptx(fn, args, kwargs))
        assert 0 < use["registers"] <= 255 and use["spill_bytes"] == 0, (name, use)


def _update_launches(bf16_weights: bool, clip: bool):
    """The fused update's launches (training/fused_update.py) for one step of a small MDT, recorded
    on the CPU: float32 weights, or bf16 Linear weights with float32 masters (``Bf16Weights``)."""
    from mdtzoo.models import build_model
    from mdtzoo.training import fused_update
    from mdtzoo.training.bf16_weights import Bf16Weights
    from mdtzoo.training.ema import EMA

    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=3)
    ema = EMA(model, 0.9)
    weights = Bf16Weights(model, ema) if bf16_weights else None
    opt = torch.optim.AdamW(weights.parameters() if weights else model.parameters(), lr=1e-3)
    updater = fused_update.FusedAdamWEMA(opt, ema, shadows=weights.shadows if weights else None)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    with _recording(fused_update, ("_adamw_ema_kernel",)) as launches:
        updater.step(1, max_norm=1.0 if clip else None)
    return launches


def test_the_fused_update_is_one_kernel_with_or_without_bf16_copies_and_rounds_them_in_integers():
    """The update kernel as an H100 runs it (the norm-only launch of a clipped step too), for float32
    weights and for bf16 copies (``Bf16Weights``): both compile to the same code -- the copies are
    data, so the norm's per-block sums have one layout and one order either way (a kernel compiled
    without the bf16 loads laid its blocks out differently, and a DiT-S/2 step's norm moved in its
    last bit on an H100) -- which reads bf16 gradients and rounds each copy to nearest even in
    integer arithmetic (``_bf16_rne``: no float-to-bf16 conversion, whose rounding Triton's CPU
    interpreter does not share; the rounding itself is checked against torch's cast in
    test_bf16_weights)."""
    by_kind = {}
    for bf16_weights in (False, True):
        launches = _update_launches(bf16_weights, clip=True)
        assert [kw["NORM_ONLY"] for _, _, _, kw in launches] == [True, False]
        by_kind[bf16_weights] = [(name, kwargs, _ptx(fn, args, kwargs)) for name, fn, args, kwargs in launches]
    for (name, kwargs, ptx), (_, kwargs16, ptx16) in zip(by_kind[False], by_kind[True]):
        assert kwargs == kwargs16, name  # the same specialisation ...
        assert ptx == ptx16, name  # ... and the same code
        assert re.findall(r"cvt\.f32\.bf16", ptx), name  # bf16 gradients read as float32
        assert not re.findall(r"cvt\.\w+\.bf16(?:x2)?\.f32", ptx), name  # no float -> bf16 conversion
        rounding = re.findall(r"add\.s32\s+%r\d+, %r\d+, 32767;", ptx)  # bits + 0x7FFF (+ the kept bit's parity)
        assert bool(rounding) != kwargs["NORM_ONLY"], name  # the copies are written by the update only