"""Sweep our Triton attention kernels' launch settings, kernel by kernel, on one GPU (issue 7).

    python experiments/bench/attn_sweep.py --shape xl            # B 64, H 16, N 256, K 179, head dim 72
    python experiments/bench/attn_sweep.py --shape s2 --top 3    # B 256, H 6, head dim 64
    python experiments/bench/attn_sweep.py --shape xl --ncu      # one launch of each kernel, for ncu
    python experiments/bench/attn_sweep.py --shape xl --registers  # no GPU: registers per setting (ptxas, sm_90)

Inputs are made as the model makes them: q, k, v packed in one (B, N, 3, H, d) tensor in bf16, the
bias in float32 -- the full pass's (H, G, G), the masked pass's (H, 31, 31) table by grid offset --
and for the masked pass K kept positions per sample in grid order. For every setting of ``triton_attention.CONFIG`` in the grid the forward kernel and the backward (delta,
dK/dV/dS, dQ kernels) are timed apart (``triton.testing.do_bench``, ms), each output first compared
with the default setting's (a wrong tiling shows as a difference, not a time). Prints one table per
kernel group and pass, fastest first, and last the best setting of each group over both passes as
``BEST key=value,...`` (what ``bench train-step --triton-options`` takes).

With ``--ncu`` it runs each kernel of the default setting a few times and nothing else, to be
profiled: ``ncu --clock-control none -k regex:_kernel python experiments/bench/attn_sweep.py --ncu``.
With ``--registers`` it needs no GPU: each kernel of the default setting, and the dK/dV/dS kernel
over the backward grid, compiled for sm_90 here (``models.kernel_codegen``), with ptxas's registers
per thread, spill bytes and the warps that fit on an SM.
"""

from __future__ import annotations

import argparse
import itertools

import torch

SHAPES = {"xl": (64, 16, 72), "s2": (256, 6, 64), "b2": (256, 12, 64)}  # batch, heads, head dim
GRID, KEPT = 256, 179


def bias(h: int, masked: bool, **kwargs) -> torch.Tensor:
    """A random bias as the ops take it: the full pass's (H, G, G); the masked pass's offset table
    (H, 2R - 1, 2C - 1) of the square grid (31 x 31 at 16 x 16)."""
    side = 2 * int(GRID ** 0.5) - 1
    return torch.randn(h, *((side, side) if masked else (GRID, GRID)), **kwargs)


def inputs(shape: str, masked: bool, seed: int = 0):
    b, h, d = SHAPES[shape]
    g = torch.Generator("cuda").manual_seed(seed)
    n = KEPT if masked else GRID
    qkv = torch.randn(b, n, 3, h, d, device="cuda", generator=g).bfloat16()
    full = bias(h, masked, device="cuda", generator=g)
    pos = None
    if masked:
        pos = torch.rand(b, GRID, device="cuda", generator=g).argsort(1)[:, :KEPT].sort(1).values.int().contiguous()
    do = torch.randn(b, n, h, d, device="cuda", generator=g).bfloat16()
    return qkv, full, pos, do


def run_once(ta, args):
    qkv, full, pos, do = args
    o, lse = ta._flash_fwd(qkv, full, pos)
    dqkv, _ = ta._flash_bwd(qkv, full, pos, o, lse, do)
    return o, dqkv


def sweep(ta, shape: str, masked: bool, grid: list[dict], top: int):
    from triton.testing import do_bench

    args = inputs(shape, masked)
    qkv, full, pos, do = args
    default = dict(ta.CONFIG)
    ref = run_once(ta, args)
    rows = []
    for setting in grid:
        ta.CONFIG.clear()
        ta.CONFIG.update(default, **setting)
        try:
            out = run_once(ta, args)
            diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(out, ref))
            o, lse = ta._flash_fwd(qkv, full, pos)
            fwd = do_bench(lambda: ta._flash_fwd(qkv, full, pos), warmup=10, rep=50)
            bwd = do_bench(lambda: ta._flash_bwd(qkv, full, pos, o, lse, do), warmup=10, rep=50)
            rows.append((fwd, bwd, diff, setting))
        except Exception as err:  # noqa: BLE001 - a setting the GPU cannot run (shared memory) is reported, not fatal
            rows.append((float("inf"), float("inf"), float("nan"), {**setting, "error": type(err).__name__}))
    ta.CONFIG.clear()
    ta.CONFIG.update(default)
    label = f"{shape} {'masked' if masked else 'full'}"
    for which, key in (("forward", 0), ("backward", 1)):
        print(f"\n{label} {which} (ms; rel. diff to the default setting)")
        for row in sorted(rows, key=lambda r: r[key])[:top]:
            print(f"  {row[key]:.4f}  {row[2]:.1e}  {row[3]}")
    return rows


BWD_GRID = [{"bwd_bm": bm, "bwd_bn": bn, "bwd_warps": w, "bwd_stages": s}
            for bm, bn, w, s in itertools.product((32, 64), (64, 128), (4, 8), (1, 2, 3))]
KERNELS = ("_fwd_kernel", "_delta_kernel", "_bwd_kernel", "_dq_kernel")


def register_report(ta, shape: str, settings: list[dict], kernels=KERNELS) -> None:
    """Print registers per thread, spill bytes and resident warps per SM of ``kernels`` for each
    setting, full and masked pass, as compiled for sm_90 on this machine (the launches recorded from
    the ops at the shape's head count and head dim; nothing runs)."""
    from mdtzoo.models import kernel_codegen as kc

    from mdtzoo.models.kernel_ops import overridden

    _, h, d = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    print(f"\n| setting | pass | {' | '.join(kernels)} |\n|---|---|" + "---|" * len(kernels))
    for setting in settings:
        for masked in (False, True):
            n = KEPT if masked else GRID
            qkv = torch.randn(2, n, 3, h, d, generator=g).bfloat16()
            full = bias(h, masked, generator=g)
            pos = torch.stack([torch.randperm(GRID, generator=g)[:KEPT].sort().values for _ in range(2)]).int() \
                if masked else None
            # every launch recorded, so none runs
            with overridden(ta.CONFIG, setting), kc.recording(ta, KERNELS) as launches:
                o, lse = ta._flash_fwd(qkv, full, pos)
                ta._flash_bwd(qkv, full, pos, o, lse, torch.randn(o.shape, generator=g).bfloat16())
            cells = {name: ", ".join(str(v) for v in kc.launch_usage(fn, args, kwargs).values())
                     for name, fn, args, kwargs in launches if name in kernels}
            row = " | ".join(cells.get(k, "-") for k in kernels)
            print(f"| {setting or 'default'} | {'masked' if masked else 'full'} | {row} |")
    print("(each cell: registers per thread, spill bytes, warps per SM)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="xl")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--ncu", action="store_true", help="run the default setting's kernels 3 times, no timing")
    parser.add_argument("--registers", action="store_true",
                        help="no GPU: registers, spills and warps per SM of the default and the backward grid (sm_90)")
    args = parser.parse_args(argv)
    from mdtzoo.models import triton_attention as ta

    if args.registers:
        register_report(ta, args.shape, [{}])
        register_report(ta, args.shape, BWD_GRID, kernels=("_bwd_kernel",))
        return

    if args.ncu:
        for masked in (False, True):
            inp = inputs(args.shape, masked)
            for _ in range(3):
                run_once(ta, inp)
        torch.cuda.synchronize()
        print("ran", ta.CONFIG)
        return
    fwd = [{"fwd_bm": bm, "fwd_bn": bn, "fwd_warps": w, "fwd_stages": s}
           for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
           if not (bm == 128 and w == 4)]
    bwd = BWD_GRID
    dq = [{"dq_bm": bm, "dq_bn": bn, "dq_warps": w} for bm, bn, w in itertools.product((64, 128), (32, 64, 128), (4, 8))]
    best = {}
    for grid, key in ((fwd, 0), (bwd, 1), (dq, 1)):  # the forward grid judged by forward time, the others by backward
        totals = None
        for masked in (False, True):
            rows = sweep(ta, args.shape, masked, grid, args.top)
            times = [row[key] if row[2] < 2e-2 else float("inf") for row in rows]  # a setting that differs is out
            totals = times if totals is None else [a + b for a, b in zip(totals, times)]
        best.update(grid[min(range(len(grid)), key=totals.__getitem__)])
    # both passes summed; a --triton-options value for bench train-step
    print("\nBEST", ",".join(f"{k}={v}" for k, v in best.items()))


if __name__ == "__main__":
    main()
