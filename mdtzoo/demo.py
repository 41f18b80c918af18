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

import pandas as pd

from mdtzoo import config as cfg
from mdtzoo.tables.render import markdown_table

DEMO_DIR = cfg.EXPERIMENTS_DIR / "demo"
MODELS = ("mdt", "dit")


def train_one(name: str, out: Path, steps: int | None, bindings: list[str]) -> dict:
    from mdtzoo.training import RunDir, train

    extra = [f"train.run_dir = {str(out / name)!r}", *bindings]
    if steps is not None:
        extra.append(f"train.steps = {int(steps)}")
    cfg.parse([DEMO_DIR / f"{name}.gin"], extra)
    run = RunDir(out / name)
    if run.is_done():
        if not run.matches(cfg.config_str()):
            raise FileExistsError(f"{run.path} holds a finished run with another configuration; "
                                  "pass --out to put this demo elsewhere")
        return {"status": "done", "step": None, "seconds": float("nan"), "reused": True}
    start = time.perf_counter()
    result = cfg.call_root(train)
    result["seconds"] = time.perf_counter() - start
    return result


def evaluate_one(name: str, out: Path, samples_per_class: int, sample_steps: str, seed: int) -> tuple[dict, Path]:
    """Evaluate the run (EMA weights): held-out loss and oracle relation accuracy; the row of the table."""
    import shutil

    from mdtzoo.evaluation import evaluate_run
    from mdtzoo.training import RunDir
    from mdtzoo.training.checkpoint import load

    run = RunDir(out / name)
    state = load(run.latest_checkpoint())
    num_classes = state["model_shape"]["num_classes"]
    result = evaluate_run(run.path, num_samples=samples_per_class * num_classes, sample_steps=sample_steps,
                          seed=seed, device="cpu")
    grid = out / f"{name}_samples.png"
    shutil.copyfile(run.path / "eval" / result["grid"], grid)
    train_log = [r for r in run.read_metrics() if r.get("kind") == "train"]
    metrics = result["metrics"]
    row = {
        "params": sum(v.numel() for k, v in state["model"].items() if not k.endswith("relative_position_index")),
        "steps": result["step"],
        "train_loss": train_log[-1]["loss"] if train_log else float("nan"),
        "heldout_mse": metrics["heldout_mse"],
        "heldout_vb": metrics["heldout_vb"],
        "relation_acc": metrics["relation_acc"],
        "relation_score": metrics["relation_score"],
        **{k.replace("relation_score_", "score_"): v for k, v in metrics.items() if k.startswith("relation_score_")},
    }
    return row, grid


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, samples_per_class: int = 32,
             sample_steps: str = "50", seed: int = 0, bindings: list[str] | None = None) -> pd.DataFrame:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, grids, seconds = {}, {}, {}
    for name in MODELS:
        print(f"[demo] training {name} ...", flush=True)
        result = train_one(name, out, steps, list(bindings or []))
        seconds[name] = result["seconds"]
        if result.get("reused"):
            print(f"[demo] {name}: finished earlier in {out / name}; reusing it", flush=True)
        else:
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
    cols = ["params", "steps", "heldout_mse", "relation_acc", "relation_score"] + [
        c for c in table.columns if c.startswith("score_")]
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
