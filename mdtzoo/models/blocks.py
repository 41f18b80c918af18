"""The transformer parts shared by DiT and MDT: embedders, adaLN-Zero block, final layer.

Facts follow the DiT / MDT reference code (SPEC section 2); key names inside a
block match the reference checkpoints so that conversion only renames prefixes.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdtzoo.models.attention import attention, check_impl

NORM_IMPLS = ("torch", "triton")
MLP_IMPLS = ("torch", "triton", "cublaslt")


def check_norm_impl(impl: str) -> str:
    if impl not in NORM_IMPLS:
        raise ValueError(f"unknown norm_impl {impl!r}; valid: {', '.join(repr(i) for i in NORM_IMPLS)}")
    return impl


def check_mlp_impl(impl: str) -> str:
    if impl not in MLP_IMPLS:
        raise ValueError(f"unknown mlp_impl {impl!r}; valid: {', '.join(repr(i) for i in MLP_IMPLS)}")
    return impl


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with an optional relative position bias module.

    x: (B, N, D) -> (B, N, D). ``ids_keep`` (B, K) tells the bias which grid
    positions the N = K tokens sit at in the masked pass.
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_bias: nn.Module | None = None, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = rel_pos_bias
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.rel_pos_bias, ids_keep, impl=self.impl, qkv=qkv)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """DiT block with adaLN-Zero conditioning; optionally fuses a skip input first (MDT v2).

    x: (B, N, D), c: (B, D), skip: (B, N, D) or None -> (B, N, D).
    With ``skip_linear``: x <- Linear(2D -> D)([x, skip]) before the block (U-ViT long skips,
    MDT v2 dense input skips). ``norm_impl``: 'triton' (default: both LayerNorm + modulate steps,
    the second with the attention's gated residual, as one kernel each way, ``models.triton_norm``;
    the same maths, on CUDA with rows of at most 8192 -- elsewhere the torch maths) or 'torch' (the
    maths below, compiled by inductor; docs/performance.md, session 10). ``mlp_impl``: 'torch' (default:
    timm's Mlp, compiled by inductor), 'triton' (the same maths with the GELU's backward fused into the
    second linear's input-gradient matmul, ``models.triton_mlp``; CUDA, elsewhere the module itself) or
    'cublaslt' (the GELU and its backward in cuBLASLt's matmul epilogues, ``models.lt_mlp``; bf16/fp16
    on CUDA, elsewhere the same maths in torch ops).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        rel_pos_bias: nn.Module | None = None,
        skip: bool = False,
        attn_impl: str = "auto",
        norm_impl: str = "triton",
        mlp_impl: str = "torch",
    ):
        super().__init__()
        self.norm_impl = check_norm_impl(norm_impl)
        self.mlp_impl = check_mlp_impl(mlp_impl)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_bias=rel_pos_bias, impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.checkpoint_activations = False

    def forward(self, x, c, skip=None, ids_keep=None):
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, skip, ids_keep, use_reentrant=False)
        return self._forward(x, c, skip, ids_keep)

    def _forward(self, x, c, skip=None, ids_keep=None):
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block fuses a skip input (skip_linear) but got none")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.norm_impl == "triton":
            from mdtzoo.models.triton_norm import gated_residual_norm, norm_fork

            x, h = norm_fork(x, shift_msa, scale_msa, self.norm1.eps)
            x, h = gated_residual_norm(x, self.attn(h, ids_keep), gate_msa, shift_mlp, scale_mlp, self.norm2.eps)
        else:
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)
            h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        if self.mlp_impl != "torch":
            from mdtzoo.models.triton_mlp import gelu_mlp

            return x + gate_mlp.unsqueeze(1) * gelu_mlp(h, self.mlp, self.mlp_impl)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN modulate (shift, scale) -> Linear(D, p*p*C_out). (B, N, D) -> (B, N, p*p*C_out)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = exp(-ln(P) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """(B,) t -> (B, D): 256 sinusoidal frequencies, then Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # float32 table, cast for float64 tests


class LabelEmbedder(nn.Module):
    """(B,) labels -> (B, D); row ``num_classes`` is the null class for classifier-free guidance.

    In training, each label is replaced by the null class with probability ``dropout_prob``.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = float(dropout_prob)
        self.embedding_table = nn.Embedding(num_classes + int(self.dropout_prob > 0), dim)

    def forward(self, labels, train: bool, generator: torch.Generator | None = None):
        if train and self.dropout_prob > 0:
            gen_device = generator.device if generator is not None else labels.device
            drop = torch.rand(labels.shape[0], device=gen_device, generator=generator) < self.dropout_prob
            labels = torch.where(drop.to(labels.device), self.num_classes, labels)
        return self.embedding_table(labels)
