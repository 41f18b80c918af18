"""Tune which cuBLASLt algorithm each MLP matmul of ``mlp_impl='cublaslt'`` runs, per problem, on this card.

    python experiments/bench/lt_tune.py --shapes s,s_masked            # prints the choices
    python experiments/bench/lt_tune.py --shapes s,s_masked --write    # and merges them into the table

For each shape (T rows, width D; the names of lt_parts.py: the training step's full and masked passes)
and each of the four matmuls (fc1 forward with GELU_AUX_BIAS, fc2's input gradient with DGELU, fc1's and
fc2's weight gradients with BGRADB), every algorithm cuBLASLt's heuristic offers is timed as CUDA-graph
replays (median). An algorithm is a candidate only if two runs give the same bits and its result agrees
with the first algorithm's to bf16 rounding (relative error < 1e-2). The fastest candidate is kept if it
beats the heuristic's first by more than ``--margin`` (default 2%); otherwise the problem stays on the
first. ``--write`` merges the choices into ``mdtzoo/models/cublaslt_algos.json`` under this card and
library version (``cublaslt.table_name``), where ``models.cublaslt`` reads them: the same problem then
always runs the same algorithm, in every run and every resume with this table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lt_parts import SHAPES, mlp_tensors  # noqa: E402  (the blocks' shapes and tensors, this folder)
from norm_sweep import graph_time  # noqa: E402  (CUDA-graph replay timing, this folder)

from mdtzoo.models import cublaslt  # noqa: E402
from mdtzoo.models.kernel_ops import overridden  # noqa: E402


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def problems(t: int, d: int, dev) -> list[tuple[str, str, object]]:
    """(label, epilogue, fn) for the four matmuls at T x D (hidden 4D), on bf16 tensors made here."""
    x, dy, w1, b1, w2 = mlp_tensors(t, d, dev)
    gl, u = cublaslt.linear_gelu(x, w1, b1)
    du = cublaslt.dgelu_linear(dy, w2, u)
    return [("fc1 forward", "gelu_aux_bias", lambda: cublaslt.linear_gelu(x, w1, b1)),
            ("fc2 input grad", "dgelu", lambda: cublaslt.dgelu_linear(dy, w2, u)),
            ("fc1 weight grad", "bgradb", lambda: cublaslt.weight_grad(du, x)),
            ("fc2 weight grad", "bgradb", lambda: cublaslt.weight_grad(dy, gl))]


def outputs(fn) -> tuple[torch.Tensor, ...]:
    out = fn()
    return tuple(t.clone() for t in (out if isinstance(out, tuple) else (out,)))


def keys_of(fn) -> list[tuple]:
    """The plan keys (problems) one call of ``fn`` runs."""
    seen, plan = [], cublaslt._plan
    cublaslt._plan = lambda *key: seen.append(key) or plan(*key)
    try:
        fn()
    finally:
        cublaslt._plan = plan
    return seen


def tune(fn, epilogue: str, repeats: int, margin: float) -> tuple[list[tuple], int, list[float]]:
    """The problem keys ``fn`` runs, the index chosen for them and each algorithm's seconds per call."""
    keys = keys_of(fn)
    count = min(len(cublaslt._plans[k][4]) for k in keys)
    with overridden(cublaslt.ALGO_PICK, {epilogue: 0}):
        ref = outputs(fn)
    times = []
    for index in range(count):
        with overridden(cublaslt.ALGO_PICK, {epilogue: index}):
            a, b = outputs(fn), outputs(fn)
            same = all(torch.equal(x, y) for x, y in zip(a, b))
            close = all(rel(x, r) < 1e-2 for x, r in zip(a, ref))
            times.append(graph_time(fn, repeats) if same and close else float("inf"))
    best = min(range(count), key=times.__getitem__)
    return keys, best if times[best] < times[0] * (1 - margin) else 0, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="s,s_masked", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--margin", type=float, default=0.02, help="keep another algorithm only if this much faster")
    ap.add_argument("--write", action="store_true", help=f"merge the choices into {cublaslt.TUNED_FILE}")
    args = ap.parse_args()
    dev = torch.device("cuda")
    table_key = cublaslt.table_name(dev.index or 0)
    print(f"table {table_key!r}", flush=True)
    chosen: dict[str, int] = {}
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
        t, d = SHAPES[name]
        for label, epilogue, fn in problems(t, d, dev):
            keys, index, times = tune(fn, epilogue, args.repeats, args.margin)
            us = " ".join("-" if s == float("inf") else f"{s * 1e6:.1f}" for s in times)
            print(f"{name:9s} {label:16s} #{index} {times[index] * 1e6:8.1f} µs (first {times[0] * 1e6:.1f}); "
                  f"all: {us}", flush=True)
            for key in keys:
                chosen[cublaslt.problem_name(key)] = index
    if args.write:
        table = {}
        if os.path.exists(cublaslt.TUNED_FILE):
            with open(cublaslt.TUNED_FILE) as f:
                table = json.load(f)
        entries = table.setdefault(table_key, {})
        for problem, index in chosen.items():
            if index:
                entries[problem] = index
            else:
                entries.pop(problem, None)
        tmp = cublaslt.TUNED_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: dict(sorted(v.items())) for k, v in sorted(table.items())}, f, indent=1)
            f.write("\n")
        os.replace(tmp, cublaslt.TUNED_FILE)
        print(f"wrote {sum(1 for i in chosen.values() if i)} tuned problems of {len(chosen)} to {cublaslt.TUNED_FILE}")


if __name__ == "__main__":
    main()
