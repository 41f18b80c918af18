"""``mdtzoo bench``: time the training step and print FLOP-based utilisation.

    mdtzoo bench train-step --model mdt_xl2 --batch 64 --compile --precision bf16 --json out.json
    torchrun --nproc_per_node 2 -m mdtzoo bench train-step --model mdt_xl2 --batch 64 --compile  # DDP
    mdtzoo bench sample --model mdt_xl2 --batch 128 --compile        # 250-step DDPM + CFG, img/s
    mdtzoo bench attention                                           # biased attention kernels
    mdtzoo bench flops --model dit_xl2                      # analytic forward MACs / step FLOPs
    mdtzoo bench table results/*.json                       # a Markdown table of --json outputs
"""

from __future__ import annotations

import argparse
import json
import sys

# = mdtzoo.training.objective.COMPILE_MODES, mdtzoo.models.transformer.COMPILE_SCOPES,
# mdtzoo.models.attention.IMPLS and mdtzoo.models.blocks.NORM_IMPLS (tests keep them equal), spelled
# here so `mdtzoo --help` stays torch-free
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("blocks", "stacks")
ATTN_IMPLS = ("auto", "sdpa", "explicit", "flex", "triton")
NORM_IMPLS = ("torch", "triton")
MLP_IMPLS = ("torch", "triton", "cublaslt")


def run_train_step(args) -> int:
    from mdtzoo.bench import PASS_CHOICES, bench_train_step, format_result, write_json

    if args.passes not in PASS_CHOICES:
        raise ValueError(f"--passes must be one of {PASS_CHOICES}")
    result = bench_train_step(
        args.model, args.batch, compile=args.compile_mode or args.compile, compile_scope=args.compile_scope,
        precision=args.precision, passes=args.passes,
        steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops, device=args.device,
        seed=args.seed, attn_impl=args.attn, norm_impl=args.norm_impl, mlp_impl=args.mlp_impl,
        separate_passes=not args.joint_backward,
        activation_checkpointing=args.activation_checkpointing, profile=args.profile, flex_options=args.flex_options,
        triton_options=args.triton_options, inductor_options=args.inductor_options, update=args.update,
        hold_grads=not args.no_hold_grads, windows=args.windows, graph_step=args.graph_step,
        bf16_weights=args.bf16_weights,
        log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None,
    )
    from mdtzoo.training.distributed import env_info

    if env_info().rank == 0:
        if "profile" in result:
            print(result.pop("profile"), flush=True)
        print(format_result(result), flush=True)
        if args.json:
            write_json(result, args.json)
    return 1 if result["status"] == "graph_check_failed" else 0


def run_sample(args) -> int:
    from mdtzoo.bench import bench_sample, write_json

    r = bench_sample(args.model, args.batch, steps=args.steps, guidance=args.guidance, precision=args.precision,
                     compile=args.compile_mode or args.compile, attn_impl=args.attn, repeats=args.repeats,
                     check=args.check, peak_tflops=args.peak_tflops, device=args.device, seed=args.seed,
                     profile=args.profile, flex_options=args.flex_options, triton_options=args.triton_options,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if "profile" in r:
        print(r.pop("profile"), flush=True)
    check = (f"; vs the unoptimised fp32 path on {r['check_images']} images: relative difference "
             f"{r['check_rel_diff']:.2e}" if "check_images" in r else "")
    print(f"{r['model']} sample {r['steps']} steps, guidance={r['guidance']}, {r['precision']}"
          f"{' compile ' + r['compile'] if r['compile'] else ''}, attn {r['attn_impl']}, batch {r['batch']}: {r['img_per_s']:.2f} img/s, "
          f"{r['tflops']:.0f} TFLOP/s = {100 * r['peak_fraction']:.0f}% of {r['peak_tflops']:g}"
          + (f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else "") + check, flush=True)
    if args.json:
        write_json(r, args.json)
    return 0


def run_attention(args) -> int:
    from mdtzoo.bench import bench_attention

    rows = bench_attention(tuple(args.impl.split(",")), batch=args.batch, heads=args.heads, grid=args.grid,
                           keep=args.keep, dim=args.dim, compile=not args.no_compile, repeats=args.repeats,
                           log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"B {args.batch}, H {args.heads}, N {args.grid ** 2}, K {args.keep}, d {args.dim}; forward + backward "
          "(forward alone)")
    print("| impl | compile | full pass ms | masked pass ms | worst rel. error (bf16) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['impl']} | {r['compile']} | {r['error']} | | |")
            continue
        err = max((v for k, v in r.get("errors", {}).items() if "bfloat16" in k), default=float("nan"))
        print(f"| {r['impl']} | {r['compile']} | {r['full_ms']:.2f} ({r['full_fwd_ms']:.2f}) "
              f"| {r['masked_ms']:.2f} ({r['masked_fwd_ms']:.2f}) | {err:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
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
    t.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="compile with this torch.compile mode (reduce-overhead: blocks replay CUDA graphs)")
    t.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks",
                   help="one compiled region per block, or per stack of blocks (encoder, decoder; as train.compile_scope)")
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
    t.add_argument("--attn", default="auto", choices=ATTN_IMPLS,
                   help="attention path with the relative-position bias (explicit = the slow reference)")
    t.add_argument("--norm-impl", default="triton", choices=NORM_IMPLS,
                   help="the blocks' LayerNorm + modulate steps (and the attention's gated residual): "
                        "inductor's kernels (torch) or ours (triton, models/triton_norm.py; CUDA)")
    t.add_argument("--mlp-impl", default="torch", choices=MLP_IMPLS,
                   help="the blocks' MLP: timm's, compiled by inductor (torch), or with the GELU's backward fused "
                        "into the second linear's input-gradient matmul (triton, models/triton_mlp.py; CUDA; measured "
                        "slower, docs/performance.md session 13), or with the GELU and its backward inside cuBLASLt's "
                        "matmul epilogues (cublaslt, models/lt_mlp.py; bf16 on CUDA)")
    t.add_argument("--windows", type=int, default=0,
                   help="also time this many windows of --steps steps enqueued back to back (one sync per window)")
    t.add_argument("--graph-step", action="store_true",
                   help="the whole step captured as CUDA graphs (training/graph_step.py), checked against the eager "
                        "step before anything is timed (bitwise equal on an H100: docs/performance.md, session 15); "
                        "one GPU, default compile mode; the trainer's train.graph_step")
    t.add_argument("--bf16-weights", action="store_true",
                   help="the model's Linear weights and biases in bfloat16, their float32 masters in the fused update, "
                        "which writes the copies: no casts in the step (training/bf16_weights.py); one GPU, "
                        "held gradients, bf16 precision")
    t.add_argument("--joint-backward", action="store_true",
                   help="one backward of full + masked loss (default: the two passes in turn, less memory)")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    t.add_argument("--profile", action="store_true", help="print the top kernels of two extra steps")
    t.add_argument("--flex-options", metavar="VARIANT", default=None,
                   help="FlexAttention kernel options by name (bench.FLEX_VARIANTS, as in bench attention --impl flex:NAME)")
    t.add_argument("--triton-options", metavar="VARIANT", default=None,
                   help="our Triton kernel's settings: a name (bench.TRITON_VARIANTS, as in --impl triton:NAME) "
                        "or key=value pairs of triton_attention.CONFIG, e.g. fwd_bn=32,bwd_stages=1, and of "
                        "triton_norm.CONFIG prefixed norm., e.g. norm.bwd_rows=1,norm.bwd_warps=16")
    t.add_argument("--update", default="auto",
                   help="the optimiser side: AdamW + EMA + grad norm in one kernel (fused), torch's ops one by "
                        "one (op_by_op), or auto (fused on CUDA)")
    t.add_argument("--no-hold-grads", action="store_true",
                   help="with the fused update, let autograd add the full pass's gradients into .grad "
                        "(default: held aside and added in the update kernel, as train.hold_grads)")
    t.add_argument("--inductor-options", metavar="VARIANT", default=None,
                   help="torch.compile code-generation settings by name (bench.INDUCTOR_VARIANTS)")
    t.add_argument("--json", metavar="PATH", help="write the result as JSON")
    t.add_argument("--verbose", action="store_true", help="log warm-up progress to stderr")
    t.set_defaults(fn=run_train_step)

    sm = bsub.add_parser("sample", help="time DDPM sampling with guidance (VAE excluded); check vs fp32 path")
    sm.add_argument("--model", default="mdt_xl2")
    sm.add_argument("--batch", type=int, default=128, help="images sampled at once")
    sm.add_argument("--steps", type=int, default=250, help="DDPM steps (respaced)")
    sm.add_argument("--guidance", default="power_cosine", help="none | constant | power_cosine")
    sm.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    sm.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    sm.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                    help="compile the blocks with this torch.compile mode (reduce-overhead: CUDA graphs)")
    sm.add_argument("--profile", action="store_true", help="print the top kernels of 3 extra sampling steps")
    sm.add_argument("--flex-options", metavar="VARIANT", default=None,
                    help="FlexAttention kernel options by name (bench.FLEX_VARIANTS)")
    sm.add_argument("--triton-options", metavar="VARIANT", default=None,
                    help="our Triton kernel's settings by name (bench.TRITON_VARIANTS)")
    sm.add_argument("--attn", default="auto", choices=ATTN_IMPLS)
    sm.add_argument("--repeats", type=int, default=2, help="timed repeats (median)")
    sm.add_argument("--check", type=int, default=8,
                    help="images to compare with the unoptimised fp32 path first (0: skip)")
    sm.add_argument("--peak-tflops", type=float, default=790.0)
    sm.add_argument("--device", default=None)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--json", metavar="PATH")
    sm.set_defaults(fn=run_sample)

    a = bsub.add_parser("attention", help="time biased attention paths (checked against the reference first)")
    a.add_argument("--impl", default="explicit,auto,sdpa,flex", help="comma-separated attention impls")
    a.add_argument("--batch", type=int, default=256)
    a.add_argument("--heads", type=int, default=6)
    a.add_argument("--grid", type=int, default=16, help="token grid side (16: 256 tokens)")
    a.add_argument("--keep", type=int, default=179, help="kept tokens in the masked pass")
    a.add_argument("--dim", type=int, default=64, help="head dim (64: S/2, B/2; 72: XL/2)")
    a.add_argument("--repeats", type=int, default=20)
    a.add_argument("--no-compile", action="store_true")
    a.add_argument("--json", metavar="PATH")
    a.set_defaults(fn=run_attention)

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
