"""``mdtzoo bench``: time the training step and print FLOP-based utilisation.

    mdtzoo bench train-step --model mdt_xl2 --batch 64 --compile --precision bf16 --json out.json
    mdtzoo bench flops --model dit_xl2                      # analytic forward MACs / step FLOPs
    mdtzoo bench table results/*.json                       # a Markdown table of --json outputs
"""

from __future__ import annotations

import argparse
import json
import sys


def run_train_step(args) -> int:
    from mdtzoo.bench import PASS_CHOICES, bench_train_step, format_result, write_json

    if args.passes not in PASS_CHOICES:
        raise ValueError(f"--passes must be one of {PASS_CHOICES}")
    result = bench_train_step(
        args.model, args.batch, compile=args.compile, precision=args.precision, passes=args.passes,
        steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops, device=args.device,
        seed=args.seed, log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None,
    )
    print(format_result(result), flush=True)
    if args.json:
        write_json(result, args.json)
    return 0


def run_flops(args) -> int:
    import torch

    from mdtzoo.bench import expected_kept_tokens, forward_macs, resolve_passes, train_step_flops
    from mdtzoo.models import build_model

    with torch.device("meta"):
        model = build_model(args.model)
    passes = resolve_passes(model, args.passes)
    print(f"{args.model}: forward {forward_macs(model) / 1e9:.2f} G MACs per image (full pass)")
    if model.interp is not None:
        kept = expected_kept_tokens(model)
        print(f"  masked pass ({kept:.1f} of {model.num_tokens} tokens kept): "
              f"{forward_macs(model, masked=True, kept=kept) / 1e9:.2f} G MACs per image")
    flops = train_step_flops(model, args.batch, passes)
    print(f"  train step, passes={passes}, batch {args.batch}: {flops / 1e12:.2f} TFLOP (forward + backward)")
    return 0


def run_table(args) -> int:
    from mdtzoo.bench import markdown_table

    results = []
    for path in args.paths:
        with open(path) as f:
            results.append(json.load(f))
    print(markdown_table(results))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the training step (img/s, TFLOP/s, peak memory)",
                       description=__doc__.splitlines()[0])
    bsub = p.add_subparsers(dest="bench_command", required=True)

    t = bsub.add_parser("train-step", help="time the trainer's full training step on random ImageNet latents")
    t.add_argument("--model", default="mdt_xl2", help="a model preset (mdt_xl2, dit_s2, ...)")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--compile", action="store_true", help="torch.compile the objective (as train.compile)")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on a GPU, fp32 on the CPU)")
    t.add_argument("--passes", default="auto", choices=["auto", "both", "full", "masked"],
                   help="auto: both (full + masked) for MDT, full for DiT")
    t.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    t.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    t.add_argument("--peak-tflops", type=float, default=790.0,
                   help="matmul peak for the utilisation fraction (H100 bf16, measured: 790)")
    t.add_argument("--device", default=None, help="cuda, cpu, cuda:1 (default: cuda if available)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", metavar="PATH", help="write the result as JSON")
    t.add_argument("--verbose", action="store_true", help="log warm-up progress to stderr")
    t.set_defaults(fn=run_train_step)

    f = bsub.add_parser("flops", help="analytic matmul FLOP count of a preset's training step")
    f.add_argument("--model", default="mdt_xl2")
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--passes", default="auto", choices=["auto", "both", "full", "masked"])
    f.set_defaults(fn=run_flops)

    s = bsub.add_parser("table", help="a Markdown table of train-step --json results")
    s.add_argument("paths", nargs="+", metavar="JSON")
    s.set_defaults(fn=run_table)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="mdtzoo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.fn(a))
