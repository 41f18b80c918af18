"""Launch settings of the fused LayerNorm kernels (models/triton_norm.py), swept at one block's shapes.

    python experiments/bench/norm_sweep.py                      # DiT/MDT-XL/2: B 64, N 256, D 1152
    python experiments/bench/norm_sweep.py --batch 256 --dim 384  # S/2
    python experiments/bench/norm_sweep.py --dim 768 --rows 1,2 --warps 4,8 --chunks 64  # B/2, a smaller grid
    python experiments/bench/norm_sweep.py --registers            # no GPU: each setting's registers (ptxas, sm_90)

Every setting is checked against the block's maths first (``bench.check_norm`` at the sweep's
width), then each kernel is timed alone (CUDA-graph replays, median) for both forms -- the gated one
(x + g a, then LayerNorm 2) and the plain one (LayerNorm 1) -- and reported with its effective
bandwidth: the bytes it must move (float32 stream, bf16 a, dh and h) over its time. Prints one table
per direction, fastest first, the CONFIG to adopt, and last ``BEST norm.key=value,...`` (what
``bench train-step --triton-options`` takes). ``--registers`` instead compiles every setting
for sm_90 on the CPU (``models.kernel_codegen``) and prints ptxas's registers per thread, spills,
and the warps that fit on an SM: a kernel that keeps one program of 8 warps per SM cannot hide its
memory latency, whatever its launch grid.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from mdtzoo.bench import _cuda_time, check_norm
from mdtzoo.models import kernel_codegen as kc
from mdtzoo.models import triton_norm as tn
from mdtzoo.models.kernel_ops import overridden


def traffic(b: int, n: int, d: int) -> dict[str, int]:
    """Bytes each kernel must move: float32 x / x1 / dx, bf16 a / h / dh / da (the per-sample
    vectors and row statistics are small and left out)."""
    t = b * n * d
    return {"fwd gated": t * (4 + 2 + 4 + 2), "fwd plain": t * (4 + 2),
            "bwd gated": t * (4 + 2 + 2 + 4 + 4 + 2), "bwd plain": t * (4 + 2 + 4 + 4)}


def inputs(b: int, n: int, d: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, n, d, generator=g).cuda()
    a = torch.randn(b, n, d, generator=g).cuda().bfloat16()
    ada = torch.randn(b, 6 * d, generator=g).cuda().bfloat16()
    _, _, gate, shift, scale, _ = ada.chunk(6, dim=1)
    dh = torch.randn(b, n, d, generator=g).cuda().bfloat16()
    return x, a, gate, shift, scale, dh


def time_kernels(b: int, n: int, d: int, repeats: int) -> dict[str, float]:
    """µs per call of the four launches with the current CONFIG."""
    x, a, gate, shift, scale, dh = inputs(b, n, d)
    _, _, mean, rstd = tn._launch_fwd(x, a, gate, shift, scale, 1e-6, torch.bfloat16)
    runs = {
        "fwd gated": lambda: tn._launch_fwd(x, a, gate, shift, scale, 1e-6, torch.bfloat16),
        "fwd plain": lambda: tn._launch_fwd(x, None, None, shift, scale, 1e-6, torch.bfloat16),
        "bwd gated": lambda: tn._launch_bwd(x, a, gate, scale, mean, rstd, dh, x),
        "bwd plain": lambda: tn._launch_bwd(x, None, None, scale, mean, rstd, dh, x),
    }
    return {name: graph_time(fn, repeats) * 1e6 for name, fn in runs.items()}


def graph_time(fn, repeats: int, calls: int = 20) -> float:
    """Seconds per call of ``fn``'s GPU work: ``calls`` calls captured in one CUDA graph, its replay
    timed (median of ``repeats``). One launch between two events times the host instead (a launch
    with its allocations takes longer to issue than these kernels take to run)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    seconds = _cuda_time(graph.replay, repeats) / calls
    del graph
    return seconds


def settings(grid: dict) -> list[dict]:
    """Every combination of the grid's values, as CONFIG updates."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def sweep(grid: dict, kinds: tuple[str, ...], args) -> list[tuple[dict, dict]]:
    rows = []
    for setting in settings(grid):
        with overridden(tn.CONFIG, setting):
            try:
                check_norm(args.dim, batch=2, tokens=args.tokens)
                us = time_kernels(args.batch, args.tokens, args.dim, args.repeats)
            except Exception as err:  # a setting that fails to compile or to match is reported, not fatal
                print(f"!! {setting}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
        rows.append((setting, {k: us[k] for k in kinds}))
        print(f"  {setting}: " + ", ".join(f"{k} {us[k]:.1f} µs" for k in kinds), flush=True)  # a timeout keeps these
    return sorted(rows, key=lambda r: sum(r[1].values()))


def registers(grid: dict, direction: str, dim: int) -> None:
    """Print each setting's registers per thread, spill bytes and resident warps per SM, for the
    gated and the plain kernel of ``direction`` at width ``dim`` (compiled for sm_90, nothing run)."""
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(2, 16, dim, generator=g), torch.randn(2, 16, dim, generator=g).bfloat16()
    _, _, gate, shift, scale, _ = torch.randn(2, 6 * dim, generator=g).bfloat16().chunk(6, dim=1)
    mean, rstd = torch.zeros(32), torch.ones(32)
    print(f"\n| {' | '.join(grid)} | gated: registers, spill bytes, warps/SM | plain: the same |")
    print("|" + "---|" * (len(grid) + 2))
    for setting in settings(grid):
        with overridden(tn.CONFIG, setting), kc.recording(tn, ("_norm_fwd_kernel", "_norm_bwd_kernel")) as launches:
            if direction == "fwd":
                tn._launch_fwd(x, a, gate, shift, scale, 1e-6, torch.bfloat16)
                tn._launch_fwd(x, None, None, shift, scale, 1e-6, torch.bfloat16)
            else:
                tn._launch_bwd(x, a, gate, scale, mean, rstd, a, x)
                tn._launch_bwd(x, None, None, scale, mean, rstd, a, x)
        cells = [", ".join(str(v) for v in kc.launch_usage(fn, args, kwargs).values())
                 for _, fn, args, kwargs in launches]
        print(f"| {' | '.join(str(v) for v in setting.values())} | {' | '.join(cells)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rows", default="1,2,4", help="rows per program to try, both directions")
    p.add_argument("--warps", default="4,8,16", help="warps per program to try, both directions")
    p.add_argument("--chunks", default="8,16,32,64", help="backward rows per program's chunk to try")
    p.add_argument("--registers", action="store_true",
                   help="compile every setting for sm_90 here (no GPU) and print registers, spills, warps per SM")
    args = p.parse_args(argv)
    try:
        rows, warps, chunks = (tuple(int(v) for v in arg.split(",")) for arg in (args.rows, args.warps, args.chunks))
    except ValueError:
        raise SystemExit(f"--rows, --warps and --chunks take integers joined by commas, not "
                         f"{args.rows!r}, {args.warps!r}, {args.chunks!r}") from None
    fwd = {"fwd_rows": rows, "fwd_warps": warps}
    bwd = {"bwd_rows": rows, "bwd_warps": warps, "bwd_chunk": chunks}
    if args.dim > tn.MAX_WIDTH:
        raise SystemExit(f"--dim {args.dim}: the fused kernels take rows of at most {tn.MAX_WIDTH} "
                         "(wider rows run the torch maths)")
    if args.registers:
        print(f"D {args.dim}, sm_90; defaults {tn.CONFIG}")
        registers(fwd, "fwd", args.dim)
        registers(bwd, "bwd", args.dim)
        return
    if not torch.cuda.is_available():
        raise SystemExit("norm_sweep.py times CUDA kernels: no GPU here")
    bytes_ = traffic(args.batch, args.tokens, args.dim)
    print(f"B {args.batch}, N {args.tokens}, D {args.dim}; defaults {tn.CONFIG}")
    best = {}
    for direction, grid in (("fwd", fwd), ("bwd", bwd)):
        kinds = (f"{direction} gated", f"{direction} plain")
        rows = sweep(grid, kinds, args)
        print(f"\n| {' | '.join(grid)} | " + " | ".join(f"{k} µs (GB/s)" for k in kinds) + " |")
        print("|" + "---|" * (len(grid) + len(kinds)))
        for setting, us in rows:
            cells = [f"{us[k]:.1f} ({bytes_[k] / us[k] / 1e3:,.0f})" for k in kinds]
            print(f"| {' | '.join(str(v) for v in setting.values())} | {' | '.join(cells)} |")
        if rows:
            best.update(rows[0][0])
    print(f"\nbest: CONFIG = {tn.CONFIG | best}")
    print("BEST " + ",".join(f"norm.{k}={v}" for k, v in best.items()))  # what bench train-step --triton-options takes


if __name__ == "__main__":
    main()
