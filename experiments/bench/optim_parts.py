"""Time the optimizer-side parts of a training step one by one, on one GPU (issue 7 diagnostics).

    python experiments/bench/optim_parts.py --model mdt_xl2

For the model's parameters (float32, random gradients): the fused AdamW step, the EMA update
(``training.ema.EMA``), the gradient norm (``training.loop.grad_norm_``) and clip_grad_norm_ with an
infinite bound (its old form), each the median of CUDA-event times; with the bytes each must move at
least and the bandwidth that implies. Then the relative-position bias table's gradient: the autograd
scatter-add (the table gather's backward) against ``offset_sums``
(``RelativePositionBias.full()``'s backward) and index_add_, eager and compiled.

The one-kernel update (``training.fused_update.FusedAdamWEMA``: AdamW + EMA + grad norm) is first
checked against the op-by-op update on MDT-S/2's parameters (three steps, float32), then timed
against it.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch


def timed(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


MODEL_CHECK = "mdt_s2"


def check_fused(dev: torch.device) -> dict[str, float]:
    """Three steps of FusedAdamWEMA and of OpByOpUpdate from the same weights and gradients (MDT-S/2,
    weight decay on, a clipped step): the largest relative difference (to each tensor's largest
    entry) of the weights, of the EMA weights, and of the returned norm."""
    from mdtzoo.models import build_model
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.fused_update import FusedAdamWEMA, OpByOpUpdate
    from mdtzoo.training.loop import make_optimizer

    def rel(a, b):
        return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))

    torch.manual_seed(1)
    ref = build_model(MODEL_CHECK, input_size=32, in_channels=4, num_classes=1000).to(dev)
    fused = copy.deepcopy(ref)
    worst = dict(weights=0.0, ema=0.0, norm=0.0)
    updates = [cls(make_optimizer(m.parameters(), "adamw", 1e-4, 0.01, (0.9, 0.999), fused=True), EMA(m, 0.99))
               for cls, m in ((OpByOpUpdate, ref), (FusedAdamWEMA, fused))]
    with torch.no_grad():
        for step in range(1, 4):
            for a, b in zip(ref.parameters(), fused.parameters()):
                a.grad = torch.randn_like(a) * 1e-3
                b.grad = a.grad.clone()
            norms = [u.step(step, 1.0 if step == 2 else None) for u in updates]
            worst["norm"] = max(worst["norm"], rel(norms[0], norms[1]))
            for key, (ma, mb) in dict(weights=(ref, fused), ema=(updates[0].ema.model, updates[1].ema.model)).items():
                worst[key] = max([worst[key]] + [rel(a, b) for a, b in zip(ma.parameters(), mb.parameters())])
    if not max(worst.values()) < 1e-5:
        raise AssertionError(f"FusedAdamWEMA differs from the op-by-op update: {worst}")
    return worst


def main() -> None:
    from mdtzoo.models import build_model
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.loop import grad_norm_, make_optimizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mdt_xl2")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("optim_parts.py times CUDA kernels; no CUDA GPU is visible here")
    dev = torch.device("cuda")
    model = build_model(args.model, input_size=32, in_channels=4, num_classes=1000).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    opt = make_optimizer(params, "adamw", 1e-4, 0.0, (0.9, 0.999), fused=True)
    ema = EMA(model, 0.9999, warmup=True)
    gb = n * 4 / 1e9  # one float32 pass over all parameters, GB
    rows = [("fused AdamW step", timed(opt.step), 7 * gb),  # read p, g, m, v; write p, m, v
            ("EMA update (foreach lerp)", timed(lambda: ema.update(100)), 3 * gb),  # read e, p; write e
            ("grad norm (grad_norm_)", timed(lambda: grad_norm_(params)), gb),
            ("clip_grad_norm_(inf) (before)", timed(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf"))),
             3 * gb)]
    from mdtzoo.training.fused_update import FusedAdamWEMA, OpByOpUpdate

    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check_fused(dev).items())
    print(f"FusedAdamWEMA vs op by op, MDT-S/2, 3 steps, largest relative differences: {diffs}")
    op_by_op = OpByOpUpdate(opt, ema)
    rows.append(("AdamW + EMA + grad norm, op by op", timed(lambda: op_by_op.step(100)), 11 * gb))
    fused_opt = make_optimizer(params, "adamw", 1e-4, 0.0, (0.9, 0.999), fused=True)
    fused = FusedAdamWEMA(fused_opt, EMA(model, 0.9999, warmup=True))
    rows.append(("the same, one kernel (FusedAdamWEMA)", timed(lambda: fused.step(100)), 9 * gb))
    print(f"{args.model}: {len(params)} tensors, {n / 1e6:.1f}M parameters, {torch.cuda.get_device_name(dev)}, "
          f"torch {torch.__version__}")
    print("| part | ms | least GB moved | GB/s |\n|---|---|---|---|")
    for name, ms, moved in rows:
        print(f"| {name} | {ms:.2f} | {moved:.1f} | {moved / ms * 1e3:,.0f} |")

    bias = next(b.attn.rel_pos_bias for b in model.blocks)
    index = bias.relative_position_index
    table = bias.relative_position_bias_table
    upstream = torch.randn(table.shape[1], *index.shape, device=dev)

    scatter_full = bias.table_gather  # the plain gather: its backward is autograd's index_put
    def backward_of(full_fn):
        def run():
            table.grad = None
            full_fn().backward(upstream)
        return run

    flat = index.reshape(-1)

    def index_add_path():
        out = torch.zeros_like(table)
        out.index_add_(0, flat, upstream.permute(1, 2, 0).reshape(-1, table.shape[1]))
        return out

    backward_of(scatter_full)()
    reference = table.grad.clone()
    backward_of(bias.full)()
    assert torch.allclose(table.grad, reference, rtol=1e-4, atol=1e-4)
    assert torch.allclose(index_add_path(), reference, rtol=1e-4, atol=1e-4)
    from mdtzoo.posenc.relbias import offset_sums

    def torch_offset_sums():
        table.grad = None
        return offset_sums(upstream, bias.grid, table.shape[0])

    torch.testing.assert_close(torch_offset_sums(), reference, rtol=1e-4, atol=1e-4)
    rows = [("autograd scatter (index_put), eager", backward_of(scatter_full)),
            ("autograd scatter (index_put), compiled", backward_of(torch.compile(scatter_full))),
            ("full()'s backward (the Triton offset-sum kernel on CUDA), eager", backward_of(bias.full)),
            ("full()'s backward (the Triton offset-sum kernel on CUDA), compiled", backward_of(torch.compile(bias.full))),
            ("offset_sums in torch ops (backward only), eager", torch_offset_sums),
            ("index_add_ (atomics, backward only), eager", index_add_path)]
    print("| bias table gradient, forward + backward | ms |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {timed(fn, repeats=20):.3f} |")


if __name__ == "__main__":
    main()
