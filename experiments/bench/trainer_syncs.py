"""The trainer's own img/s on ImageNet-latent shapes, and whether its steps wait for the GPU.

    python experiments/bench/trainer_syncs.py --model mdt_s2 --batch 256 [--graph-step] [--bf16-weights]   # a GPU

Runs ``train()`` (compiled, bf16, the fused update) on random 4x32x32 latents held in memory (no
files, 1000 classes) for ``--steps`` steps, logging every ``--log-every``. It prints the img/s the
trainer logged for each window -- the first includes compilation -- and counts the host-device
synchronisations torch reports (``torch.cuda.set_sync_debug_mode('warn')``) in the steady-state steps
between the first log and the last (no checkpoint, log or evaluation falls there): a trainer that
waits on every step shows about one per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import warnings

import torch
from torch.utils.data import Dataset

from mdtzoo import config
from mdtzoo.registry import DATASETS
from mdtzoo.training import train
from mdtzoo.training.objective import DiffusionObjective


class RandomLatents(Dataset):
    """``size`` fixed random 4x32x32 latents with labels 0..999 (ImageNet's latent shape)."""

    def __init__(self, split: str = "train", size: int = 4096, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, 32, 32, generator=g)
        self.y = torch.randint(0, 1000, (size,), generator=g)
        self.num_classes, self.image_size, self.channels, self.name = 1000, 32, 4, "random_latents"

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mdt_s2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--graph-step", action="store_true", help="train.graph_step: the step captured as CUDA graphs")
    ap.add_argument("--bf16-weights", action="store_true", help="train.bf16_weights: bfloat16 Linear weights, "
                                                                 "float32 masters in the fused update")
    ap.add_argument("--mlp-impl", default="torch", help="the blocks' mlp_impl (models.X.mlp_impl): torch, triton, "
                                                          "cublaslt")
    ap.add_argument("--error", action="store_true", help="raise at the first synchronising call of the steady steps "
                                                          "(its traceback says where it is)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    first, last = args.log_every + 2, args.steps - 2  # steady steps: past the first log, before the last
    state = {"syncs": 0}
    original = DiffusionObjective.draw  # every step draws (a replayed one calls no forward)

    def watched(self, x0, step, *a, **kw):  # the sync debug mode on for the steady steps only
        torch.cuda.set_sync_debug_mode(("error" if args.error else "warn") if first <= step < last else "default")
        return original(self, x0, step, *a, **kw)

    DiffusionObjective.draw = watched
    with tempfile.TemporaryDirectory() as tmp, DATASETS.temporary("random_latents", RandomLatents):
        run = os.path.join(tmp, "run")
        config.parse([], [f"build.model = @models.{args.model}", f"train.run_dir = '{run}'",
                          "train.dataset = 'datasets.random_latents'", "train.progress = False",
                          f"train.steps = {args.steps}", f"train.global_batch = {args.batch}",
                          f"train.log_every = {args.log_every}", f"train.ckpt_every = {10 * args.steps}",
                          "train.compile = True", "train.precision = 'bf16'", "train.lr = 1e-4",
                          f"train.graph_step = {args.graph_step}", f"train.bf16_weights = {args.bf16_weights}",
                          f"models.{args.model}.mlp_impl = {args.mlp_impl!r}"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train()
        # torch's prototype notice comes with every switch of the mode; the rest are synchronising calls
        messages = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()
                    and "prototype feature" not in str(w.message)]
        state["syncs"] = len(messages)
        for text, count in collections.Counter(m.splitlines()[0][:160] for m in messages).most_common(5):
            print(f"  {count} x {text}")
        records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    rates = [(r["step"], r["img_per_sec"]) for r in records if r["kind"] == "train"]
    kind = (" graph step" if args.graph_step else "") + (" bf16 weights" if args.bf16_weights else "")
    kind += f" mlp {args.mlp_impl}" if args.mlp_impl != "torch" else ""
    print(f"{args.model} b{args.batch}{kind}: img/s per log window (step, img/s): "
          + ", ".join(f"({s}, {v:,.1f})" for s, v in rates))
    print(f"synchronising calls in steps {first}..{last - 1}: {state['syncs']}"
          + (f"; first: {messages[0][:200]}" if messages else ""))
    steady = [v for s, v in rates[1:]]
    if steady:
        print(f"RESULT {args.model}{kind} steady img/s {sum(steady) / len(steady):,.1f} syncs {state['syncs']}")


if __name__ == "__main__":
    main()
