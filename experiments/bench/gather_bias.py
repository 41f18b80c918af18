"""The masked pass's bias: gathered inside the attention kernels, or by one kernel beforehand (issue 7).

    python experiments/bench/gather_bias.py            # S/2, B/2 and XL/2 shapes (GPU)

For each shape (``attn_sweep.SHAPES``; K = 179 of 256 tokens kept) and each form of
``triton_attention.CONFIG["gather_bias"]``, the masked pass's forward and backward kernels (the
backward's delta, dK/dV/dS and dQ kernels; the bias-table gradient ``kept_grad`` is the same in
both forms and not timed) are timed with ``triton.testing.do_bench`` (ms), after their outputs
are compared with the in-kernel gather's (16-bit inputs: the gathered copy is rounded to bf16) and,
in float32, required to be equal to 1e-5. The full pass, whose bias needs no gather, is timed
last as the floor the masked pass would reach at its FLOPs (x (K/N)^2).
"""

from __future__ import annotations

import torch

from attn_sweep import GRID, KEPT, SHAPES, inputs


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    from triton.testing import do_bench

    from mdtzoo.models import triton_attention as ta

    rows = []
    for shape in SHAPES:
        for masked in (True, False):
            args = inputs(shape, masked)
            qkv, full, pos, do = args
            forms = (False, True) if masked else (True,)
            ref = None
            for gather in forms:
                ta.CONFIG["gather_bias"] = gather
                o, lse = ta._flash_fwd(qkv, full, pos)
                dqkv, ds = ta._flash_bwd(qkv, full, pos, o, lse, do)
                if ref is None:
                    ref = (o, dqkv, ds)
                    diff = 0.0
                else:
                    diff = max(rel(a, b) for a, b in zip((o, dqkv, ds), ref))
                    q32 = qkv[:2].float()  # float32: the two forms must agree to 1e-5
                    ta.CONFIG["gather_bias"] = False
                    o32 = ta._flash_fwd(q32, full, pos[:2])[0]
                    ta.CONFIG["gather_bias"] = True
                    err32 = rel(ta._flash_fwd(q32, full, pos[:2])[0], o32)
                    assert err32 < 1e-5, f"{shape}: float32 forms differ by {err32:.1e}"
                fwd = do_bench(lambda: ta._flash_fwd(qkv, full, pos), warmup=10, rep=100)
                bwd = do_bench(lambda: ta._flash_bwd(qkv, full, pos, o, lse, do), warmup=10, rep=100)
                label = ("masked, " + ("gathered first" if gather else "in-kernel gather")) if masked else "full"
                rows.append((shape, label, fwd, bwd, diff))
                print(f"{shape} {label}: forward {fwd:.4f} ms, backward {bwd:.4f} ms, rel. diff {diff:.1e}", flush=True)
            ta.CONFIG["gather_bias"] = True
    floor = (KEPT / GRID) ** 2
    print(f"\n| shape | pass | forward ms | backward ms | rel. diff to the in-kernel gather |\n|---|---|---|---|---|")
    for shape, label, fwd, bwd, diff in rows:
        print(f"| {shape} | {label} | {fwd:.4f} | {bwd:.4f} | {diff:.1e} |")
        if label == "full":
            print(f"| {shape} | full x (K/N)^2 = {floor:.2f} | {fwd * floor:.4f} | {bwd * floor:.4f} | |")


if __name__ == "__main__":
    main()
