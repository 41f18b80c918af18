"""Our attention kernels' time at MDT's shapes, masked and full pass, with the code on the path (issue 7).

    python experiments/bench/masked_bias.py            # GPU; run it in two trees to compare two versions

For S/2, B/2 and XL/2 shapes (``attn_sweep.SHAPES``; 179 of 256 tokens kept in the masked pass)
the forward kernel and the backward's kernels (delta, dK/dV/dS, dQ; not the bias-table gradient)
are timed with ``triton.testing.do_bench`` (ms). The masked pass's bias comes from the same tree's
``attn_sweep.inputs``, as that tree's code takes it: the (H, 31, 31) table by grid offset since
session 12, before it the (H, 256, 256) full-grid bias, gathered in-kernel. ``full x (K/N)^2`` is the full
pass scaled to the masked pass's attention FLOPs: the time the masked pass would take if its bias
cost nothing more than the full pass's.
"""

from __future__ import annotations

from attn_sweep import GRID, KEPT, SHAPES, inputs


def main():
    from triton.testing import do_bench

    from mdtzoo.models import triton_attention as ta

    offsets = hasattr(ta, "_grid")
    print(f"masked-pass bias: {'offset table' if offsets else 'full grid, gathered in-kernel'}")
    print("| shape | pass | forward ms | backward ms |\n|---|---|---|---|")
    for shape in SHAPES:
        times = {}
        for masked in (True, False):
            qkv, full, pos, do = inputs(shape, masked)  # attn_sweep's inputs: the bias as this tree's code takes it
            o, lse = ta._flash_fwd(qkv, full, pos)
            fwd = do_bench(lambda: ta._flash_fwd(qkv, full, pos), warmup=10, rep=100)
            bwd = do_bench(lambda: ta._flash_bwd(qkv, full, pos, o, lse, do), warmup=10, rep=100)
            times[masked] = (fwd, bwd)
            print(f"| {shape} | {'masked' if masked else 'full'} | {fwd:.4f} | {bwd:.4f} |", flush=True)
        scale = (KEPT / GRID) ** 2
        print(f"| {shape} | full x (K/N)^2 | {times[False][0] * scale:.4f} | {times[False][1] * scale:.4f} |")


if __name__ == "__main__":
    main()
