"""The MLP's GELU inside cuBLASLt's epilogues (models/lt_mlp.py, mlp_impl='cublaslt') timed against what
inductor makes of the same maths (mlp_impl='torch'), at the blocks' shapes.

    python experiments/bench/lt_parts.py                 # XL/2 (B 64), B/2 and S/2 (B 256), full + masked pass

For each shape (T = batch x tokens rows, width D, hidden F = 4D), each first checked against the
float64 closed form (relative error < 1e-2), timed as CUDA-graph replays (median), µs per call:
  * forward: ``torch`` = x W1^T + b1 (cuBLAS) and gelu(u) compiled by inductor, both kept;
    ``cublaslt`` = ``lt_linear_gelu`` (GELU_AUX_BIAS: g and u from one matmul);
  * backward of the GELU: ``torch`` = dg = dy W2, du = gelu'(u) dg and du's column sums, compiled;
    ``cublaslt`` = ``lt_dgelu_linear`` (DGELU; the sums move into fc1's weight gradient); ``bgrad`` =
    the sums in this epilogue (DGELU_BGRAD); ``matmul`` = dy W2 alone, the floor;
  * weight gradients with their bias sums, fc1's (du, x) and fc2's (dy, g): ``torch`` = the matmul and
    the column sum, compiled; ``cublaslt`` = ``lt_weight_grad`` (BGRADB, one matmul);
  * with ``--sweep``, each epilogue with every other algorithm the heuristic offers (``#i``);
  * the whole MLP forward + backward (all four parameter gradients and dh): timm's Mlp compiled
    against ``GeluMLP`` with ``fused='cublaslt'`` compiled, with and without the BGRADB weight
    gradients (``lt_mlp.WGRAD_EPILOGUE``).
Prints one row per shape and path, and the saving against ``torch``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from timm.layers import Mlp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from norm_sweep import graph_time  # noqa: E402  (CUDA-graph replay timing, this folder)

from mdtzoo.models import cublaslt, lt_mlp  # noqa: E402  (lt_mlp registers the mdtzoo::lt_* operators)
from mdtzoo.models.kernel_ops import overridden  # noqa: E402
from mdtzoo.models.triton_mlp import gelu_mlp, gelu_tanh_grad  # noqa: E402

SHAPES = {  # name -> (rows T, width D): the full pass and the masked pass (179 of 256 tokens kept)
    "xl": (64 * 256, 1152), "xl_masked": (64 * 179, 1152),
    "b": (256 * 256, 768), "s": (256 * 256, 384), "s_masked": (256 * 179, 384),
}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mlp_tensors(t: int, d: int, dev) -> tuple[torch.Tensor, ...]:
    """x, dy (T, D), w1 (4D, D), b1 (4D,), w2 (D, 4D): bf16, seeded, the weights at unit-variance outputs."""
    f = 4 * d
    g = torch.Generator(device="cpu").manual_seed(0)
    bf = dict(device=dev, dtype=torch.bfloat16)
    x, dy = torch.randn(t, d, generator=g).to(**bf), torch.randn(t, d, generator=g).to(**bf)
    w1, b1 = (torch.randn(f, d, generator=g) / d ** 0.5).to(**bf), torch.randn(f, generator=g).to(**bf)
    return x, dy, w1, b1, (torch.randn(d, f, generator=g) / f ** 0.5).to(**bf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also every other algorithm cuBLASLt's heuristic offers")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    lin_gelu, dgelu = torch.ops.mdtzoo.lt_linear_gelu, torch.ops.mdtzoo.lt_dgelu_linear
    wgrad = torch.ops.mdtzoo.lt_weight_grad

    def fwd(x, w, b):
        u = F.linear(x, w, b)
        return F.gelu(u, approximate="tanh"), u

    def bwd(dy, w, u):
        du = torch.ops.aten.gelu_backward(dy @ w, u, approximate="tanh")
        return du, du.sum(0)

    def wgrad_torch(dy, x):
        return dy.t() @ x, dy.sum(0, dtype=torch.float32).to(dy.dtype)

    fwd_c, bwd_c = torch.compile(fwd, dynamic=False), torch.compile(bwd, dynamic=False)
    wgrad_c = torch.compile(wgrad_torch, dynamic=False)
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
        t, d = SHAPES[name]
        f = 4 * d
        x, dy, w1, b1, w2 = mlp_tensors(t, d, dev)
        gl, u = lin_gelu(x, w1, b1)
        ref_u = x.double() @ w1.double().t() + b1.double()
        du = dgelu(dy, w2, u)
        ref_du = (dy.double() @ w2.double()) * gelu_tanh_grad(u.double())
        dw1, db1 = wgrad(du, x)
        dw2, db2 = wgrad(dy, gl)
        errs = {"u": rel(u, ref_u), "g": rel(gl, F.gelu(ref_u, approximate="tanh")), "du": rel(du, ref_du),
                "dw1": rel(dw1, du.double().t() @ x.double()), "db1": rel(db1, du.double().sum(0)),
                "dw2": rel(dw2, dy.double().t() @ gl.double()), "db2": rel(db2, dy.double().sum(0))}
        print(f"{name}: cuBLASLt against float64: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
        if not max(errs.values()) < 1e-2:
            raise SystemExit(f"{name}: the cuBLASLt epilogues disagree with the closed form: {errs}")
        fwd_flop, mm = 2 * t * d * f, {}
        mm["forward torch"] = graph_time(lambda: fwd_c(x, w1, b1), args.repeats)
        mm["forward cublaslt"] = graph_time(lambda: lin_gelu(x, w1, b1), args.repeats)
        mm["forward matmul"] = graph_time(lambda: F.linear(x, w1, b1), args.repeats)
        mm["gelu backward torch"] = graph_time(lambda: bwd_c(dy, w2, u), args.repeats)
        mm["gelu backward cublaslt"] = graph_time(lambda: dgelu(dy, w2, u), args.repeats)  # (no bias sum)
        du_b, db_b = cublaslt.dgelu_linear_bgrad(dy, w2, u)
        print(f"{name}: DGELU_BGRAD against float64: du {rel(du_b, ref_du):.2e}, db {rel(db_b, ref_du.sum(0)):.2e}")
        mm["gelu backward bgrad"] = graph_time(lambda: cublaslt.dgelu_linear_bgrad(dy, w2, u), args.repeats)
        mm["fc1 wgrad torch"] = graph_time(lambda: wgrad_c(du, x), args.repeats)
        mm["fc1 wgrad cublaslt"] = graph_time(lambda: wgrad(du, x), args.repeats)
        mm["fc2 wgrad torch"] = graph_time(lambda: wgrad_c(dy, gl), args.repeats)
        mm["fc2 wgrad cublaslt"] = graph_time(lambda: wgrad(dy, gl), args.repeats)
        if args.sweep:  # every algorithm the heuristic offers, each epilogue (the default runs the first)
            for epilogue, label, fn in (("gelu_aux_bias", "forward", lambda: lin_gelu(x, w1, b1)),
                                        ("dgelu", "gelu backward", lambda: dgelu(dy, w2, u)),
                                        ("bgradb", "fc1 wgrad", lambda: wgrad(du, x))):
                for pick in range(1, cublaslt.candidates(epilogue)):
                    with overridden(cublaslt.ALGO_PICK, {epilogue: pick}):
                        mm[f"{label} #{pick}"] = graph_time(fn, args.repeats)
        mm["gelu backward matmul"] = graph_time(lambda: dy @ w2, args.repeats)
        mlp = Mlp(d, f, act_layer=lambda: torch.nn.GELU(approximate="tanh")).to(dev, torch.bfloat16)
        h = x.view(64 if name.startswith("xl") else 256, -1, d).detach().requires_grad_(True)
        dyv = dy.view_as(h)
        params = [h] + list(mlp.parameters())
        lt_forward = torch.compile(lambda v: gelu_mlp(v, mlp, "cublaslt"), dynamic=False)
        default = lt_mlp.WGRAD_EPILOGUE
        for label, forward, epilogue in (("mlp fwd+bwd torch", torch.compile(mlp, dynamic=False), True),
                                         ("mlp fwd+bwd cublaslt", lt_forward, True),
                                         ("mlp fwd+bwd cublaslt, torch wgrad", lt_forward, False)):
            def step(forward=forward):
                torch.autograd.grad(forward(h), params, dyv)
            lt_mlp.WGRAD_EPILOGUE = epilogue  # (read by the op at each call)
            try:
                mm[label] = graph_time(step, args.repeats)
            except Exception as exc:  # reported; the other rows stand
                print(f"{name} {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            finally:
                lt_mlp.WGRAD_EPILOGUE = default
        for label, s in mm.items():
            part = next(p for p in ("forward", "gelu backward", "fc1 wgrad", "fc2 wgrad", "mlp fwd+bwd")
                        if label.startswith(p))
            base = mm.get(f"{part} torch")
            flop = 6 * fwd_flop if label.startswith("mlp") else fwd_flop  # the MLP: 2 matmuls forward, 4 backward
            rows.append((name, label, s * 1e6, flop / s / 1e12, (base - s) * 1e6 if base else 0.0))
        print(f"{name} done", flush=True)
    print(f"\n{'shape':<10} {'path':<36} {'µs':>9} {'TFLOP/s':>8} {'saved µs':>9}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<36} {r[2]:9.1f} {r[3]:8.0f} {r[4]:9.1f}")


if __name__ == "__main__":
    main()
