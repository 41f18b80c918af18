"""Where one transformer block's forward + backward spends its GPU time, kernel by kernel (issue 7).

    python experiments/bench/block_parts.py --model dit_xl2 --batch 64
    python experiments/bench/block_parts.py --model dit_xl2 --batch 64 --variant persist
    python experiments/bench/block_parts.py --model dit_xl2 --batch 64 --norm-impl triton   # our fused norm kernels
    python experiments/bench/block_parts.py --model mdt_xl2 --batch 64 --kept 179   # MDT's masked pass
    TORCH_LOGS=output_code python experiments/bench/block_parts.py 2> code.log   # + inductor's kernels

Builds one block of the model's size (an MDT preset's with the relative-position bias, read by our
Triton attention; ``--kept K``: its masked pass on K tokens), compiles it as the trainer does (``Block.compile(dynamic=False)``), and
runs forward + backward under bf16 autocast on a float32 residual stream (B, N, D) -- as in the
model, where the patch embedding plus the float32 positional table makes the stream float32.
Prints the median time of a block call (CUDA events), the device time by kernel (torch.profiler),
and the same shapes' matrix products alone (cuBLAS, bf16) for the matmul floor. ``--variant``
changes inductor's code generation: ``persist`` keeps rows of up to 2048 elements in registers
(inductor's default stops at 1024, so XL's 1152-wide LayerNorms loop over each row),
``multikernel`` lets inductor time both forms of every reduction and keep the faster.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re

import torch

from mdtzoo.bench import _cuda_time, check_norm, persistent_rows
from mdtzoo.models.blocks import NORM_IMPLS, Block
from mdtzoo.models.presets import SIZES
from mdtzoo.posenc.relbias import RelativePositionBias

TOKENS = 256  # 32x32 latents, patch 2


def size_of(model: str) -> str:
    """'dit_xl2' -> 'xl' (patch 2: 256 tokens)."""
    m = re.fullmatch(r"(?:dit|mdt|mdtv2)_([a-z]+)2", model)
    if not m or m.group(1) not in SIZES:
        raise SystemExit(f"unknown model {model!r}; valid: a patch-2 preset such as dit_xl2, mdt_s2")
    return m.group(1)


def make(model: str, batch: int, seed: int = 0, norm_impl: str = "triton", kept: int = 0):
    """The block, its inputs and output gradient. MDT presets get the relative-position bias (our
    Triton attention); ``kept`` > 0: the masked pass, that many tokens at random grid positions."""
    _, dim, heads = SIZES[size_of(model)]
    torch.manual_seed(seed)
    grid = int(TOKENS ** 0.5)
    bias = RelativePositionBias((grid, grid), heads) if model.startswith("mdt") else None
    block = Block(dim, heads, rel_pos_bias=bias, norm_impl=norm_impl).cuda()
    for p in block.parameters():  # adaLN-Zero starts at zero: random weights so every path carries signal
        torch.nn.init.normal_(p, std=0.02)
    n = kept or TOKENS
    ids = torch.rand(batch, TOKENS, device="cuda").argsort(1)[:, :n].sort(1).values if kept else None
    x = torch.randn(batch, n, dim, device="cuda", requires_grad=True)
    c = torch.randn(batch, dim, device="cuda", requires_grad=True)
    dy = torch.randn(batch, n, dim, device="cuda")
    return block, (x, c, ids), dy


def call(block, inputs, dy):
    x, c, ids = inputs
    for t in (x, c, *block.parameters()):  # one backward's gradients, as a training step makes them
        t.grad = None
    with torch.autocast("cuda", torch.bfloat16):
        y = block(x, c, ids_keep=ids)
    y.backward(dy)


def time_ms(fn, repeats: int = 30, warmup: int = 5) -> float:
    """Median ms of ``fn()`` (CUDA events, ``bench._cuda_time``)."""
    return _cuda_time(fn, repeats, warmup) * 1e3


def kernels(fn, iters: int = 5) -> list[tuple[str, float, int]]:
    """(name, µs per call of fn, launches per call), slowest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            count[e.name] += 1
    return sorted(((n, t / iters, count[n] // iters) for n, t in total.items()), key=lambda r: -r[1])


def host_time(fn, iters: int = 8, top: int = 25) -> tuple[float, str]:
    """ms of host (Python) time per ``fn()`` -- the calls launched back to back, unsynchronised, so
    the host never waits for the GPU while the launch queue has room -- and cProfile's slowest
    functions of the same calls by own time (profiled separately: cProfile slows the host)."""
    import cProfile
    import io
    import pstats
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return host, text.getvalue()


def matmul_floor(model: str, batch: int, tokens: int = TOKENS) -> float:
    """ms of the block's forward + backward matrix products alone (bf16 cuBLAS)."""
    dim = SIZES[size_of(model)][1]
    t = batch * tokens
    shapes = [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)]
    mats = [(torch.randn(t, i, device="cuda", dtype=torch.bfloat16), torch.randn(i, o, device="cuda", dtype=torch.bfloat16),
             torch.randn(t, o, device="cuda", dtype=torch.bfloat16)) for i, o in shapes]

    def run():
        for a, w, g in mats:
            a @ w
            g @ w.t()
            a.t() @ g
    return time_ms(run)


def apply_variant(name: str, stack: contextlib.ExitStack) -> None:
    import torch._inductor.config as inductor_config

    if name == "persist":
        stack.enter_context(persistent_rows(2048))
    elif name == "multikernel":
        inductor_config.triton.multi_kernel = 1
    elif name != "base":
        raise SystemExit(f"unknown variant {name!r}; valid: base, persist, multikernel")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit_xl2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--kept", type=int, default=0, help="MDT presets: the masked pass with this many kept tokens")
    p.add_argument("--norm-impl", default="triton", choices=NORM_IMPLS,
                   help="the block's gated residual + LayerNorm 2: inductor's kernels or ours (checked first)")
    p.add_argument("--host", action="store_true",
                   help="also the host time per call (launches unsynchronised) and cProfile's slowest functions")
    p.add_argument("--variant", default="base", help="base | persist (rows up to 2048 kept in registers) | multikernel")
    args = p.parse_args(argv)
    stack = contextlib.ExitStack()
    apply_variant(args.variant, stack)
    if args.norm_impl == "triton":
        print("fused norm checked against the block's maths:", check_norm(SIZES[size_of(args.model)][1], compile=True))
    if args.kept > TOKENS or (args.kept and not args.model.startswith("mdt")):
        raise SystemExit(f"--kept takes 1..{TOKENS} kept tokens of an MDT preset (the masked pass); got {args.kept}")
    block, inputs, dy = make(args.model, args.batch, norm_impl=args.norm_impl, kept=args.kept)
    block.compile(dynamic=False)
    run = lambda: call(block, inputs, dy)  # noqa: E731
    ms = time_ms(run)
    rows = kernels(run)
    busy = sum(r[1] for r in rows) / 1e3
    floor = matmul_floor(args.model, args.batch, args.kept or TOKENS)
    print(f"{args.model} block ({args.variant}, norm {args.norm_impl}{f', {args.kept} kept' if args.kept else ''}), batch {args.batch}: {ms:.3f} ms per forward + backward "
          f"(GPU busy {busy:.3f} ms); its matrix products alone {floor:.3f} ms")
    if args.host:
        host, stats = host_time(run)
        print(f"host time {host:.3f} ms per forward + backward (launched back to back)")
    print("| kernel | µs per call | launches |\n|---|---|---|")
    for name, us, n in rows[: args.top]:
        print(f"| {name[:110]} | {us:.1f} | {n} |")
    if args.host:
        print(stats)


if __name__ == "__main__":
    main()
