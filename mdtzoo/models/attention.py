"""Attention with an optional learned relative-position bias: the reference maths and fast paths.

MDT adds a per-head bias B[h, i, j] = T[r(i, j), h] to every attention logit, where T is a
learned table over grid offsets (``posenc.relbias``). In the full pass the bias is one
(H, N, N) tensor shared by the whole batch; in the masked pass each sample keeps other
tokens, so the bias is B[h, keep_b[i], keep_b[j]] -- a (B, H, K, K) tensor.

The cost is not the attention but the bias: gathered per sample straight from the table,
its gradient is a scatter-add of B*H*K*K values into ~1,000 table rows (sorted or atomic
with heavy contention). The fast paths avoid that:

* :func:`kept_bias` gathers from the materialised (H, N, N) bias instead; within one
  sample every (i, j) pair hits a different entry, so the backward writes each sample's
  gradient without collisions (a plain scatter) and sums over the batch -- no atomics,
  deterministic. The (H, N, N) -> table step is then a small gather of N*N entries.
* ``impl`` picks the kernel: ``"auto"`` = flash SDPA without a bias; with a bias on CUDA, our Triton
  kernel where a gradient is needed and FlexAttention where none is (each the fastest measured
  there: training step, sampling; docs/performance.md), and the explicit maths with the
  collision-free gather on the CPU; ``"flex"`` is FlexAttention
  reading the shared (H, N, N) bias -- materialised first, see :func:`materialized` -- at the kept
  positions inside the kernel (CUDA; on the CPU its forward, and the explicit maths where a gradient
  is needed); ``"triton"`` is our own kernel (models/triton_attention.py); ``"sdpa"`` passes the
  bias as a float mask.
* ``"explicit"`` is the reference for tests: the naive per-sample table gather and
  softmax(q k^T / sqrt(d) + bias) v spelled out.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMPLS = ("auto", "sdpa", "explicit", "flex", "triton")

# FlexAttention's default kernel blocks run out of shared memory with a captured bias on H100
# (SPEC section 6); these fit, and bench's attention check runs them before any timing.
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                       "num_stages": 2}


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(repr(i) for i in IMPLS)}")
    return impl


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _KeptBias(torch.autograd.Function):
    """(H, N, N) full bias, (B, K) kept positions -> (B, H, K, K); collision-free backward."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids_keep)
        ctx.grid = full.shape[-1]
        h, n, _ = full.shape
        b, k = ids_keep.shape
        flat = (ids_keep[:, :, None] * n + ids_keep[:, None, :]).reshape(-1)
        return full.reshape(h, n * n).index_select(1, flat).reshape(h, b, k, k).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids_keep,) = ctx.saved_tensors
        return reduce_kept_grad(grad, ids_keep, ctx.grid), None


def reduce_kept_grad(grad: torch.Tensor, ids_keep: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, K, K) gradient at each sample's kept positions (B, K) -> (H, N, N) summed over b.

    Each sample's K*K pairs are distinct grid pairs, so nothing collides: on CUDA a Triton
    kernel gathers, for every grid pair, the entries of the samples that kept it and sums them
    in a fixed order (``triton_attention.kept_grad``); elsewhere each sample is scattered into its
    own (H, N*N) slab and the slabs are summed. Both deterministic, no atomics, accumulated in
    float32 for 16-bit gradients.
    """
    b, h, k, _ = grad.shape
    acc = _accumulation_dtype(grad.dtype)
    if grad.is_cuda and grad.dtype != torch.float64 and _triton_available():
        from mdtzoo.models.triton_attention import kept_grad

        return kept_grad(grad, ids_keep, n).to(grad.dtype)
    flat = (ids_keep[:, :, None] * n + ids_keep[:, None, :]).reshape(b, 1, k * k).expand(b, h, k * k)
    per_sample = grad.new_zeros((b, h, n * n), dtype=acc)
    per_sample.scatter_(2, flat, grad.reshape(b, h, k * k).to(acc))
    return per_sample.sum(0).to(grad.dtype).reshape(h, n, n)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kept_bias(full: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(H, N, N) shared bias and (B, K) kept grid positions -> (B, H, K, K) = full[:, keep_i, keep_j]."""
    return _KeptBias.apply(full, ids_keep)


def explicit_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v, spelled out; bias broadcasts against (B, H, Nq, Nk)."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).to(v.dtype) @ v


def _fused_explicit(q, k, v, bias):
    """The same maths shaped for torch.compile: scores, bias and softmax in float32 (one fused
    kernel between the two matmuls when compiled), probabilities back in v's dtype."""
    acc = _accumulation_dtype(q.dtype)
    scores = (q @ k.transpose(-2, -1)).to(acc) * q.shape[-1] ** -0.5 + bias.to(acc)
    return scores.softmax(dim=-1).to(v.dtype) @ v


@functools.cache
def _flex(cuda: bool):
    from torch.nn.attention.flex_attention import flex_attention as flex

    # Compiled on CUDA (its only fast form); eager on the CPU, where it is a correctness reference.
    return torch.compile(flex, dynamic=False) if cuda else flex


@torch.library.custom_op("mdtzoo::materialized", mutates_args=())
def materialized(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` behind an opaque op: torch.compile cannot fuse the computation of
    ``x`` into the kernel that reads it. Without it, inductor folded the bias gather
    table[index[i, j], h] into FlexAttention's score_mod, two dependent loads per logit: MDT-XL/2's
    sampling spent 34% of its GPU time there (docs/performance.md). Gradient passes through."""
    out = x.new_empty(x.shape)
    out.copy_(x)
    return out


@materialized.register_fake
def _(x):
    return x.new_empty(x.shape)


materialized.register_autograd(lambda ctx, grad: grad)


def flex_attention(q, k, v, full, ids_keep=None, kernel_options=None):
    """FlexAttention with ``full[h, pos_i, pos_j]`` (pos = ids_keep rows, or 0..N-1) added in-kernel.

    ``kernel_options`` may carry ``bias_fp32`` (the bias read, and its gradient accumulated, in
    float32 rather than q's dtype) and ``bias_groups`` G > 1 (experiments of ``bench``): the
    bias is read from G copies, sample b from copy b % G, so fewer programs add into the same
    gradient entry; the copies' gradients are summed by autograd.
    """
    n = full.shape[-1]
    options = dict(kernel_options or FLEX_KERNEL_OPTIONS)
    groups = int(options.pop("bias_groups", 1))
    bias_dtype = torch.float32 if options.pop("bias_fp32", False) else q.dtype
    options = options if q.is_cuda else None
    full = materialized(full.to(bias_dtype)).reshape(full.shape[0], n * n)  # a plain (H, N*N) tensor in-kernel
    if groups > 1:
        full = full.unsqueeze(0).expand(groups, *full.shape).contiguous()
        if ids_keep is None:
            def score_mod(score, b, h, i, j):
                return score + full[b % groups, h, i * n + j]
        else:
            def score_mod(score, b, h, i, j):
                return score + full[b % groups, h, ids_keep[b, i] * n + ids_keep[b, j]]
    elif ids_keep is None:
        def score_mod(score, b, h, i, j):
            return score + full[h, i * n + j]
    else:
        def score_mod(score, b, h, i, j):
            return score + full[h, ids_keep[b, i] * n + ids_keep[b, j]]
    return _flex(q.is_cuda)(q, k, v, score_mod=score_mod, kernel_options=options)


def auto_impl(cuda: bool, dtype: torch.dtype, training: bool, triton: bool) -> str:
    """The path ``impl='auto'`` takes with a bias. Measured fastest (docs/performance.md): on CUDA our
    Triton kernel where a gradient is needed (training step at S/2, B/2, XL/2) and FlexAttention where
    none is (sampling); elsewhere, and for float64, the explicit maths ('auto' itself)."""
    if not cuda or dtype == torch.float64:
        return "auto"
    return "triton" if training and triton else "flex"


def attention(q, k, v, rel_pos_bias=None, ids_keep=None, impl: str = "auto", qkv=None):
    """Multi-head attention with an optional relative-position bias module.

    q, k, v: (B, H, N, d); ``qkv``: optionally the (B, N, 3, H, d) tensor they are views of (as
    ``qkv.permute(2, 0, 3, 1, 4)``), which our Triton kernel then reads directly: its output is
    then a (B, H, N, d) view of a (B, N, H, d) tensor, and the gradient reaches ``qkv`` in one
    piece (other paths ignore it). rel_pos_bias: a module with ``full() -> (H, G, G)`` over the whole
    grid (what the fast paths read; the Triton kernel's masked pass reads ``offsets()`` -> (H, 2R - 1,
    2C - 1), the bias by grid offset, instead) and optionally ``table_gather(ids_keep)`` (the naive
    per-sample gather, the reference); a module with neither is called as ``module(ids_keep)``
    and used with the explicit maths. ``ids_keep`` (B, N) are the grid positions of the N
    tokens in the masked pass (None: all G = N positions in order).
    """
    check_impl(impl)
    if rel_pos_bias is None:
        if impl == "explicit":
            return explicit_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)
    if not hasattr(rel_pos_bias, "full"):  # a user's relative encoding with only forward(ids_keep)
        return explicit_attention(q, k, v, rel_pos_bias(ids_keep))
    if impl == "explicit":
        gather = getattr(rel_pos_bias, "table_gather", None)
        bias = gather(ids_keep) if gather else (rel_pos_bias.full() if ids_keep is None
                                                 else kept_bias(rel_pos_bias.full(), ids_keep))
        return explicit_attention(q, k, v, bias)
    full = rel_pos_bias.full()
    training = torch.is_grad_enabled() and any([t.requires_grad for t in (q, k, v, full)])
    # our Triton kernel's masked pass reads the bias by grid offset: a module without offsets() cannot
    offsets = getattr(rel_pos_bias, "offsets", None)
    if impl == "auto":
        triton = q.is_cuda and _triton_available() and (ids_keep is None or offsets is not None)
        impl = auto_impl(q.is_cuda, q.dtype, training, triton)
    if impl == "flex" and not (q.device.type == "cpu" and training):
        return flex_attention(q, k, v, full, ids_keep)  # (FlexAttention has no backward on the CPU)
    if impl == "triton":
        if ids_keep is not None and offsets is None:
            raise ValueError(f"attn_impl 'triton' reads the masked pass's bias by grid offset; "
                             f"{type(rel_pos_bias).__name__} has no offsets() (H, 2R - 1, 2C - 1): "
                             "use 'flex' or 'explicit'")
        return _triton(q, k, v, full, ids_keep, qkv, offsets() if ids_keep is not None else None)
    bias = full if ids_keep is None else kept_bias(full, ids_keep)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return _fused_explicit(q, k, v, bias)  # auto off CUDA


def _triton(q, k, v, full, ids_keep, qkv=None, offsets=None):
    """Our Triton kernel; a clear error where it cannot run (no GPU, no triton)."""
    import os

    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attn_impl 'triton' runs on a CUDA GPU (or under TRITON_INTERPRET=1, slowly); "
                         f"on {q.device.type} use one of: 'auto', 'sdpa', 'explicit'")
    try:
        from mdtzoo.models.triton_attention import triton_attention, triton_attention_qkv
    except ImportError as err:
        raise ValueError(f"attn_impl 'triton' needs the triton package ({err}); use 'auto' or 'flex'") from None
    if qkv is not None:
        return triton_attention_qkv(qkv, full, ids_keep, offsets).transpose(1, 2)
    return triton_attention(q, k, v, full, ids_keep, offsets)
