"""The MLP's GELU inside cuBLASLt's matmul epilogues (``mlp_impl='cublaslt'``), as three torch operators.

- ``mdtzoo::lt_linear_gelu(x, w1, b1) -> (g, u)``: fc1 with its bias and the tanh GELU in one matmul,
  which also writes the GELU's input u for the backward (cuBLASLt's GELU_AUX_BIAS epilogue).
- ``mdtzoo::lt_dgelu_linear(dy, w2, u) -> du``: fc2's input gradient with the GELU's backward in one
  matmul (DGELU): no dg, no GELU-backward kernel.
- ``mdtzoo::lt_weight_grad(dy, x) -> (dw, db)``: a Linear layer's weight gradient with its bias
  gradient (dy's column sums) in the same matmul (BGRADB), for fc2 (dy, g) and fc1 (du, h).

Against the default (cuBLAS matmuls and inductor's GELU kernels) this drops the GELU forward's read
of u, the backward's GELU kernel and both bias sums; it keeps g as well as u for fc2's weight
gradient (the default may keep u alone and recompute g), one more (tokens, 4D) tensor per block.
``GeluMLP`` in ``models.triton_mlp`` is the autograd Function that calls them (with ``fused='cublaslt'``).

On CUDA with bf16 or fp16 inputs the ops call cuBLASLt (``models.cublaslt``); elsewhere (the CPU,
float32) they are the same maths in torch, so the block, its gradients and its compiled graph are
tested without a GPU, and the cuBLASLt calls are checked against these on one (``check_mlp``).
The epilogues compute in float32 from the matmul's accumulator: results agree with the default
path to bf16 rounding, not bitwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mdtzoo.models.triton_mlp import gelu_tanh_grad

LT_DTYPES = (torch.bfloat16, torch.float16)
# The weight and bias gradients from one cuBLASLt matmul (BGRADB); MDTZOO_LT_WGRAD=0 before import:
# torch's matmul and column sum instead (the benchmarks' baseline, docs/performance.md, session 17).
WGRAD_EPILOGUE = os.environ.get("MDTZOO_LT_WGRAD", "1") != "0"


def _lt(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype in LT_DTYPES for t in tensors)


@torch.library.custom_op("mdtzoo::lt_linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u) with u = x w^T + b and g = gelu_tanh(u): x (T, K), w (F, K), b (F,) -> (T, F) each."""
    if _lt(x, w, b):
        from mdtzoo.models import cublaslt

        return cublaslt.linear_gelu(x, w, b)
    u = F.linear(x, w, b)
    return F.gelu(u, approximate="tanh"), u


@linear_gelu.register_fake
def _(x, w, b):
    out = x.new_empty((x.shape[0], w.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("mdtzoo::lt_dgelu_linear", mutates_args=())
def dgelu_linear(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """du = (dy w) gelu_tanh'(u) in u's dtype: dy (T, K), w (K, F) (fc2's weight), u (T, F).
    Off cuBLASLt: float32 maths (or u's, if wider), then rounded."""
    if _lt(dy, w, u):
        from mdtzoo.models import cublaslt

        return cublaslt.dgelu_linear(dy, w, u)
    wide = torch.promote_types(u.dtype, torch.float32)
    return ((dy.to(wide) @ w.to(wide)) * gelu_tanh_grad(u.to(wide))).to(u.dtype)


@dgelu_linear.register_fake
def _(dy, w, u):
    return torch.empty_like(u)


@torch.library.custom_op("mdtzoo::lt_weight_grad", mutates_args=())
def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, db) of y = x w^T + b: dw = dy^T x and db = dy's column sums, both dy's dtype (the sums
    accumulated in float32): dy (T, F), x (T, K) -> (F, K), (F,). On cuBLASLt one matmul (BGRADB),
    unless ``WGRAD_EPILOGUE`` is off; elsewhere torch's matmul and sum."""
    if WGRAD_EPILOGUE and _lt(dy, x):
        from mdtzoo.models import cublaslt

        return cublaslt.weight_grad(dy, x)
    return dy.t() @ x, dy.sum(0, dtype=torch.float32).to(dy.dtype)


@weight_grad.register_fake
def _(dy, x):
    return dy.new_empty((dy.shape[1], x.shape[1])), dy.new_empty((dy.shape[1],))


def check_library(model: torch.nn.Module, device: torch.device) -> None:
    """A ValueError, before any work, if ``model`` has blocks with ``mlp_impl='cublaslt'`` that will
    run on CUDA and libcublasLt cannot be loaded, or has no algorithm for their widths (each width's
    three matmuls are run once on 8 rows of bf16 zeros). Off CUDA the ops are torch's maths: nothing
    to check."""
    widths = sorted({(m.mlp.fc1.in_features, m.mlp.fc1.out_features) for m in model.modules()
                     if getattr(m, "mlp_impl", None) == "cublaslt"})
    if device.type != "cuda" or not widths:
        return
    from mdtzoo.models import cublaslt

    try:
        cublaslt.library()
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    for d, f in widths:
        try:
            x, dy = (torch.zeros(8, d, device=device, dtype=torch.bfloat16) for _ in range(2))
            w1, w2 = torch.zeros(f, d, device=device, dtype=x.dtype), torch.zeros(d, f, device=device, dtype=x.dtype)
            _, u = cublaslt.linear_gelu(x, w1, torch.zeros(f, device=device, dtype=x.dtype))
            cublaslt.weight_grad(cublaslt.dgelu_linear(dy, w2, u), x)
        except RuntimeError as err:
            raise ValueError(f"mlp_impl='cublaslt' at width {d} (hidden {f}): {err}") from err
