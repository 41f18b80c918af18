"""The MLP's GELU backward fused into fc2's input-gradient matmul (models/triton_mlp.py), timed
against what inductor makes of the same maths, at the blocks' shapes.

    python experiments/bench/mlp_parts.py                  # XL/2 (B 64), B/2 and S/2 (B 256), full + masked pass
    python experiments/bench/mlp_parts.py --shapes xl --grid "BN=128,256 num_warps=4,8"

For each shape (M = batch x tokens rows, width D, hidden 4D) it times, as CUDA-graph replays (median):
  * ``cublas``: dg = dy W2 alone (bf16 cuBLAS) -- the matmul's floor;
  * ``inductor``: dg = dy W2, du = gelu'(u) dg and fc1's bias gradient du.sum(0), compiled by
    torch.compile (cuBLAS + inductor's kernels) -- what the training step runs with ``mlp_impl='torch'``;
  * ``fused``: ``triton_mlp.linear_dgelu`` at each launch setting of the grid (default: a small grid
    around ``CONFIG``), each first checked against ``reference_dgelu`` (relative error < 1e-2 in bf16).
``bench.check_mlp`` checks the whole MLP (forward, all gradients) at each width first. Prints one row
per shape and setting, fastest first, the saving against ``inductor`` in µs, and last the best setting
per shape.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from norm_sweep import graph_time  # noqa: E402  (CUDA-graph replay timing, this folder)

from mdtzoo.bench import check_mlp  # noqa: E402
from mdtzoo.models import triton_mlp as tm  # noqa: E402
from mdtzoo.models.kernel_ops import overridden  # noqa: E402

SHAPES = {  # name -> (rows M, width D): the full pass and the masked pass (179 of 256 tokens kept)
    "xl": (64 * 256, 1152), "xl_masked": (64 * 179, 1152),
    "b": (256 * 256, 768), "b_masked": (256 * 179, 768),
    "s": (256 * 256, 384), "s_masked": (256 * 179, 384),
}
GRID = "BM=128 BN=128,256 BK=64 num_warps=4,8 num_stages=3,4"


def parse_grid(text: str) -> list[dict]:
    keys, values = [], []
    for item in text.split():
        key, _, vals = item.partition("=")
        if key not in tm.CONFIG:
            raise SystemExit(f"unknown setting {key!r}; valid: {', '.join(tm.CONFIG)}")
        try:
            values.append([int(v) for v in vals.split(",")])
        except ValueError:
            raise SystemExit(f"--grid item {item!r}: want KEY=v1,v2,... with integer values") from None
        keys.append(key)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="xl,xl_masked,b,s", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--grid", default=GRID, help="launch settings, 'KEY=v1,v2 KEY=v ...' (triton_mlp.CONFIG keys)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    names = args.shapes.split(",")
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True

    def unfused(dy, w, u):
        du = torch.ops.aten.gelu_backward(dy @ w, u, approximate="tanh")
        return du, du.sum(0, dtype=torch.float32)

    inductor = torch.compile(unfused, dynamic=False)
    rows, checked = [], set()
    for name in names:
        m, d = SHAPES[name]
        if d not in checked:
            print(f"check_mlp D={d}: {check_mlp(d, device=dev)}", flush=True)
            checked.add(d)
        g = torch.Generator(device="cpu").manual_seed(0)
        dy = torch.randn(m, d, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(d, 4 * d, generator=g) / d ** 0.5).to(dev, torch.bfloat16)
        u = torch.randn(m, 4 * d, generator=g).to(dev, torch.bfloat16)
        ref_du, ref_db = tm.reference_dgelu(dy, w, u)
        flop = 2 * m * d * 4 * d
        base = {"cublas": graph_time(lambda: dy @ w, args.repeats) * 1e6,
                "inductor": graph_time(lambda: inductor(dy, w, u), args.repeats) * 1e6}
        for key, us in base.items():
            rows.append((name, key, us, flop / us / 1e6, 0.0))
        for setting in parse_grid(args.grid):
            with overridden(tm.CONFIG, setting):
                try:
                    du, db = tm.linear_dgelu(dy, w, u)
                    err = max(((du.float() - ref_du.float()).norm() / ref_du.float().norm()).item(),
                              ((db - ref_db).norm() / ref_db.norm()).item())
                    if not err < 1e-2:
                        raise AssertionError(f"relative error {err:.2e}")
                    us = graph_time(lambda: tm.linear_dgelu(dy, w, u), args.repeats) * 1e6
                except Exception as exc:  # a setting that does not compile or fit: reported, the rest go on
                    print(f"{name} {setting}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
            label = " ".join(f"{k}={v}" for k, v in setting.items())
            rows.append((name, f"fused {label}", us, flop / us / 1e6, base["inductor"] - us))
        print(f"{name} done", flush=True)
    print(f"\n{'shape':<10} {'path':<52} {'µs':>8} {'matmul TFLOP/s':>15} {'saved µs':>9}")
    best = {}
    for name in names:
        mine = sorted((r for r in rows if r[0] == name), key=lambda r: r[2])
        for r in mine:
            print(f"{r[0]:<10} {r[1]:<52} {r[2]:8.1f} {r[3]:15.0f} {r[4]:9.1f}")
        fused = [r for r in mine if r[1].startswith("fused")]
        if fused:
            best[name] = fused[0][1][6:]
    for name, label in best.items():
        print(f"BEST {name}: {label}")


if __name__ == "__main__":
    main()
