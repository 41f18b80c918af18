"""``mdtzoo train CONFIG.gin [--gin BINDING ...] [--run-dir DIR] [--dry-run]`` (torchrun for many GPUs)."""

from __future__ import annotations

import json

from mdtzoo import config as cfg


def run(args) -> int:
    bindings = list(args.gin)
    if args.run_dir:
        bindings.append(f"train.run_dir = {args.run_dir!r}")
    resolved = cfg.parse(args.config, bindings)
    if args.dry_run:
        import gin
        import torch

        from mdtzoo.models import count_parameters
        from mdtzoo.registry import DATASETS
        from mdtzoo.training.loop import build_for_dataset

        dataset = gin.query_parameter("train.dataset")
        data = DATASETS.build(dataset, split="train")
        with torch.device("meta"):
            model = build_for_dataset(data)
        print("# Resolved gin config")
        print(resolved.rstrip())
        print()
        print(f"data: {dataset}, {len(data)} items, {data.channels}x{data.image_size}x{data.image_size}, "
              f"{data.num_classes} classes")
        print(f"parameters: {count_parameters(model):,}")
        print(f"architecture: {model.summary()}")
        return 0
    from mdtzoo.training import train

    result = cfg.call_root(train)
    print(json.dumps(result))
    return 0 if result["status"] == "done" else 3


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from gin files into a run directory")
    p.add_argument("config", nargs="+", help="gin file(s), later ones win")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING")
    p.add_argument("--run-dir", help="the run directory (same as --gin \"train.run_dir='DIR'\")")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and model; do not train")
    p.set_defaults(fn=run)
