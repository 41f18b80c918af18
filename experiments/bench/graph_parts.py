"""Which part of a training step survives CUDA-graph capture (GPU): each stage in its own process.

    python experiments/bench/graph_parts.py                 # every stage, one line each
    python experiments/bench/graph_parts.py --stage update  # one stage, in this process

Stages capture, replay twice and synchronise: 'fb' the forward and backward only, 'update' the
fused update only (gradients from an eager backward), 'step' the whole ``StepGraph``; each eager
and compiled (``_c``). A stage that crashes the CUDA context leaves the others unaffected.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys

import torch

STAGES = ("fb", "update", "step", "fb_c", "update_c", "step_c")


def run_stage(stage: str, model_name: str, batch: int) -> str:
    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.models import build_model
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.fused_update import FusedAdamWEMA
    from mdtzoo.training.graph_step import StepGraph
    from mdtzoo.training.loop import make_optimizer
    from mdtzoo.training.objective import DiffusionObjective, backward_parts, prepare_step

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(model_name, input_size=32, in_channels=4, num_classes=1000).to(dev).train()
    opt = make_optimizer(model.parameters(), "adamw", 1e-4, 0.0, (0.9, 0.999), fused=True)
    updater = FusedAdamWEMA(opt, EMA(model, 0.9999, warmup=True))
    passes = "both" if model.interp is not None else "full"
    objective = DiffusionObjective(model, build_diffusion(), passes, "all", seed=0)
    step_fn, parts = prepare_step(objective, dev, 1, compile=stage.endswith("_c"))
    hold = updater.hold_grads if len(parts) > 1 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    x0 = torch.randn(batch, 4, 32, 32, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def eager(step):
        backward_parts(step_fn, parts, (x0, y, step), autocast, hold=hold)
        updater.step(step + 1)
        opt.zero_grad(set_to_none=True)

    for step in range(2):
        eager(step)
    torch.cuda.synchronize()
    kind = stage.removesuffix("_c")
    if kind == "step":
        graph = StepGraph(objective, step_fn, parts, updater, autocast, hold=hold)
        for step in range(2, 5):
            out, norm = graph(x0, y, step)
            torch.cuda.synchronize()
        return f"loss {out['loss'].item():.4f} norm {norm.item():.4f}"
    g = torch.cuda.CUDAGraph()
    if kind == "fb":
        draws = objective.draw(x0, 2)
        with torch.cuda.graph(g):
            out = backward_parts(step_fn, parts, (x0, y, 2), autocast, draws=draws)
    else:  # the update alone, gradients from an eager backward
        backward_parts(step_fn, parts, (x0, y, 2), autocast, hold=hold)
        torch.cuda.synchronize()
        launches = updater.prepare_launches()
        with torch.cuda.graph(g):
            norm = updater.launch(launches)
        out = {"loss": norm}
    for step in range(3, 5):
        if kind == "update":
            updater.before_replay(step)
        g.replay()
        torch.cuda.synchronize()
    return f"value {out['loss'].item():.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--model", default="dit_s2")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.stage:
        print(f"{args.stage}: ok, {run_stage(args.stage, args.model, args.batch)}")
        return
    for stage in STAGES:
        proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--model", args.model,
                               "--batch", str(args.batch)], capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode:
            errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
            last = f"{stage}: FAILED ({errors[-1][:200] if errors else proc.returncode})"
            with contextlib.suppress(OSError):
                with open(f"graph_parts_{stage}.err", "w") as fh:
                    fh.write(proc.stderr)
        print(last, flush=True)


if __name__ == "__main__":
    main()
