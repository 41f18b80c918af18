"""``mdtzoo demo``: a tiny MDT and a same-size tiny DiT on the bundled relations data, on a CPU.

Both train for the same number of steps from ``experiments/demo/{mdt,dit}.gin``, then
sample from their EMA weights, get scored by the relations oracle (does each image obey
its class's relation?) and by the held-out diffusion loss, and land in one small pandas
table. Everything goes under ``runs/demo/`` (``--out``); a finished run is reused, so
running the demo again only redoes what is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mdtzoo import config as cfg

DEMO_DIR = cfg.EXPERIMENTS_DIR / "demo"
MODELS = ("mdt", "dit")


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional tabulate package)."""
    def fmt(v):
        return floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)

    cols = [str(df.index.name or "")] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [fmt(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def train_one(name: str, out: Path, steps: int | None, bindings: list[str]) -> dict:
    from mdtzoo.training import train

    extra = [f"train.run_dir = {str(out / name)!r}", *bindings]
    if steps is not None:
        extra.append(f"train.steps = {int(steps)}")
    cfg.parse([DEMO_DIR / f"{name}.gin"], extra)
    start = time.perf_counter()
    result = cfg.call_root(train)
    result["seconds"] = time.perf_counter() - start
    return result


def evaluate_one(name: str, out: Path, samples_per_class: int, sample_steps: str, seed: int) -> dict:
    """Sample from the run's EMA weights, score with the oracle; read the held-out loss from its log."""
    from mdtzoo.launch.sample_cmd import load_model
    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.models import count_parameters
    from mdtzoo.registry import DATASETS
    from mdtzoo.sample import generate, save_grid
    from mdtzoo.training import RunDir

    run = RunDir(out / name)
    model, _ = load_model(str(run.path), None)
    data = DATASETS.build("relations", split="heldout")  # gin still holds this run's bindings
    labels = [c for c in range(data.num_classes) for _ in range(samples_per_class)]
    images, labels = generate(model, build_diffusion(respacing=sample_steps), "ddpm", "none",
                              num_samples=len(labels), labels=labels, batch_size=256, seed=seed,
                              num_classes=data.num_classes, rank=0, world_size=1)
    grid_path = out / f"{name}_samples.png"
    order = np.argsort(np.tile(np.arange(samples_per_class), data.num_classes), kind="stable")
    save_grid(grid_path, images[order][: 8 * data.num_classes], nrow=data.num_classes)
    scores = data.oracle.accuracy(images, labels)
    heldout = [r for r in run.read_metrics() if r.get("kind") == "heldout"]
    train_log = [r for r in run.read_metrics() if r.get("kind") == "train"]
    row = {
        "params": count_parameters(model),
        "steps": train_log[-1]["step"] if train_log else 0,
        "train_loss": train_log[-1]["loss"] if train_log else float("nan"),
        "heldout_mse": heldout[-1]["heldout_mse"] if heldout else float("nan"),
        "heldout_vb": heldout[-1]["heldout_vb"] if heldout else float("nan"),
        "relation_acc": scores["overall"],
        **{f"acc_{k}": v for k, v in scores["per_class"].items()},
    }
    return row, grid_path


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, samples_per_class: int = 32,
             sample_steps: str = "50", seed: int = 0, bindings: list[str] | None = None) -> pd.DataFrame:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, grids, seconds = {}, {}, {}
    for name in MODELS:
        print(f"[demo] training {name} ...", flush=True)
        result = train_one(name, out, steps, list(bindings or []))
        seconds[name] = result["seconds"]
        print(f"[demo] {name}: {result['status']} at step {result['step']} ({result['seconds']:.0f}s)", flush=True)
        rows[name], grids[name] = evaluate_one(name, out, samples_per_class, sample_steps, seed)
        rows[name]["train_seconds"] = round(seconds[name], 1)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    table.to_csv(out / "demo_table.csv")
    (out / "demo_table.md").write_text(markdown_table(table))
    (out / "demo_table.json").write_text(json.dumps(rows, indent=2))
    return table, grids


def main(args) -> int:
    start = time.perf_counter()
    table, grids = run_demo(args.out, args.steps, args.samples_per_class, args.sample_steps, args.seed, args.gin)
    out = Path(args.out)
    cols = ["params", "steps", "heldout_mse", "heldout_vb", "relation_acc"] + [
        c for c in table.columns if c.startswith("acc_")]
    print()
    print(markdown_table(table[cols]))
    print(f"runs:          {out / 'mdt'}  {out / 'dit'}  (config.gin, metrics.jsonl, checkpoints/, samples/)")
    print(f"sample grids:  {grids['mdt']}  {grids['dit']}  (one column per class)")
    print(f"table:         {out / 'demo_table.csv'}  {out / 'demo_table.md'}")
    print(f"total time:    {time.perf_counter() - start:.0f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny MDT and DiT on the bundled relations data and compare them")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo gin files')")
    p.add_argument("--samples-per-class", type=int, default=32)
    p.add_argument("--sample-steps", default="50", help="respaced DDPM steps for sampling (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gin", action="append", default=[], metavar="BINDING", help="extra binding for both runs")
    p.set_defaults(fn=main)
