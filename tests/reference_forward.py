"""An independent oracle: the DiT / MDT v1 / MDT v2 forward passes as plain functions.

Everything here is re-derived from the model facts in SPEC section 2 and reads a
state dict in the *reference* key layout (``blocks.{i}``, ``sideblocks.{j}``,
``en_inblocks.{i}``, ``decoder_pos_embed``, ``*.attn.rel_pos_bias.*`` ...). It
deliberately imports nothing from ``mdtzoo.models`` and spells the maths out
differently from our modules (patchify as a reshape + matmul, the relative bias
from token coordinates, scatter-back by ``ids_keep``), so that the model code
and this file would have to make the same mistake for a test to pass.

Conventions: x (B, C, H, W); t (B,) timesteps; y (B,) labels (eval: no label
dropout); the masked pass is described by ``ids_keep`` (B, K), the grid
positions the encoder sees, in the order it sees them; ``mask`` (B, N) is
1 for removed tokens (derived from ``ids_keep`` when not given).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["reference_forward", "frequency_features", "grid_bias", "LAYOUTS"]

LAYOUTS = ("dit", "mdt_v1", "mdt_v2")
LN_EPS = 1e-6
FREQ_DIM = 256


# ---------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------
def _affine(sd: Mapping[str, Tensor], name: str, h: Tensor) -> Tensor:
    """h W^T + b for the Linear stored under ``name``."""
    return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _plain_norm(h: Tensor) -> Tensor:
    """LayerNorm over the last axis without affine parameters (eps 1e-6), written out."""
    centred = h - h.mean(dim=-1, keepdim=True)
    var = (centred * centred).mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(var + LN_EPS)


def _shift_scale(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: h * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens."""
    return torch.addcmul(shift[:, None, :], h, 1.0 + scale[:, None, :])


def frequency_features(t: Tensor, dim: int = FREQ_DIM) -> Tensor:
    """(B,) -> (B, dim) float32: [cos(t f_k) | sin(t f_k)], f_k = exp(-ln(1e4) k / (dim/2)).

    The reference evaluates this table in float32 whatever the model's dtype; the
    oracle does the same so that float64 comparisons can be tight.
    """
    n = dim // 2
    k = torch.arange(n, dtype=torch.float32)
    f = torch.exp(-math.log(10000.0) * k / n)
    phase = t.to(torch.float32).reshape(-1, 1) * f.reshape(1, -1)
    return torch.cat([phase.cos(), phase.sin()], dim=1)


def _conditioning(sd, t: Tensor, y: Tensor) -> Tensor:
    dtype = sd["t_embedder.mlp.0.weight"].dtype
    e = frequency_features(t).to(dtype)
    e = _affine(sd, "t_embedder.mlp.2", F.silu(_affine(sd, "t_embedder.mlp.0", e)))
    return e + sd["y_embedder.embedding_table.weight"].index_select(0, y)


def _to_tokens(sd, x: Tensor, p: int) -> Tensor:
    """Non-overlapping p x p patches, row-major over the grid, each flattened as (C, p, p) -> (B, N, D)."""
    b, c, hh, ww = x.shape
    rows, cols = hh // p, ww // p
    patches = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    return patches @ w.reshape(w.shape[0], -1).transpose(0, 1) + sd["x_embedder.proj.bias"]


def _to_image(tokens: Tensor, p: int, rows: int, cols: int) -> Tensor:
    """(B, N, p*p*C) -> (B, C, rows*p, cols*p); every token holds (p_row, p_col, C)."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (p * p)
    img = tokens.reshape(b, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return img.reshape(b, c, rows * p, cols * p)


def grid_bias(table: Tensor, rows: int, cols: int, positions: Tensor | None = None) -> Tensor:
    """Relative position bias from token coordinates.

    table: ((2R-1)(2C-1) + 3, H). positions: (B, K) grid indices (row-major) of the tokens
    in sequence order, or None for all N tokens in grid order. The offset (dr, dc) between
    query and key reads row (dr + R - 1)(2C - 1) + (dc + C - 1).
    Returns (H, N, N) or (B, H, K, K).
    """
    if positions is None:
        positions = torch.arange(rows * cols).unsqueeze(0)
        squeeze = True
    else:
        squeeze = False
    r = torch.div(positions, cols, rounding_mode="floor")
    c = positions - r * cols
    dr = r.unsqueeze(-1) - r.unsqueeze(-2)  # query minus key
    dc = c.unsqueeze(-1) - c.unsqueeze(-2)
    flat = (dr + rows - 1) * (2 * cols - 1) + (dc + cols - 1)  # (B, K, K)
    bias = table[flat.reshape(-1)].reshape(*flat.shape, table.shape[1]).movedim(-1, 1)
    return bias[0] if squeeze else bias


def _attend(sd, name: str, h: Tensor, heads: int, bias: Tensor | None) -> Tensor:
    b, n, d = h.shape
    hd = d // heads
    q, k, v = _affine(sd, f"{name}.qkv", h).reshape(b, n, 3, heads, hd).unbind(2)  # (B, N, H, hd) each
    logits = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(hd)
    if bias is not None:
        logits = logits + bias
    weights = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhqk,bkhe->bqhe", weights, v).reshape(b, n, d)
    return _affine(sd, f"{name}.proj", out)


def _block(sd, name: str, h: Tensor, c: Tensor, heads: int, grid, positions=None, skip=None) -> Tensor:
    """One adaLN-Zero transformer block stored under ``name``.

    positions: grid indices of h's tokens (masked pass) or None (all tokens, grid order).
    skip: fused first through ``skip_linear`` (MDT v2) when the block has one.
    """
    if f"{name}.skip_linear.weight" in sd:
        assert skip is not None, f"{name} has a skip_linear but no skip input was routed to it"
        h = _affine(sd, f"{name}.skip_linear", torch.cat([h, skip], dim=-1))
    else:
        assert skip is None, f"{name} has no skip_linear"
    m = _affine(sd, f"{name}.adaLN_modulation.1", F.silu(c))
    s1, g1, e1, s2, g2, e2 = torch.split(m, m.shape[1] // 6, dim=1)  # shift, scale, gate (x2)
    table_key = f"{name}.attn.rel_pos_bias.relative_position_bias_table"
    bias = grid_bias(sd[table_key], *grid, positions) if table_key in sd else None
    h = h + e1[:, None, :] * _attend(sd, f"{name}.attn", _shift_scale(_plain_norm(h), s1, g1), heads, bias)
    inner = _affine(sd, f"{name}.mlp.fc1", _shift_scale(_plain_norm(h), s2, g2))
    inner = F.gelu(inner, approximate="tanh")
    return h + e2[:, None, :] * _affine(sd, f"{name}.mlp.fc2", inner)


def _head(sd, h: Tensor, c: Tensor) -> Tensor:
    m = _affine(sd, "final_layer.adaLN_modulation.1", F.silu(c))
    shift, scale = m[:, : m.shape[1] // 2], m[:, m.shape[1] // 2 :]
    return _affine(sd, "final_layer.linear", _shift_scale(_plain_norm(h), shift, scale))


def _count(sd, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    assert ids == set(range(len(ids))), f"{prefix} indices are not contiguous: {sorted(ids)}"
    return len(ids)


def _strip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------
# side-interpolator (MDT, masked pass)
# ---------------------------------------------------------------------------
def _side_interpolate(sd, kept: Tensor, c: Tensor, heads: int, grid, ids_keep: Tensor, removed: Tensor) -> Tensor:
    """kept (B, K, D) in encoder order -> (B, N, D): place kept tokens at their grid positions,
    fill the rest with mask_token, add decoder_pos_embed -> q; side block(s) -> k_hat;
    masked shortcut removed * k_hat + (1 - removed) * q."""
    b, _, d = kept.shape
    n = grid[0] * grid[1]
    canvas = sd["mask_token"].reshape(1, 1, d).to(kept.dtype).repeat(b, n, 1)
    canvas = canvas.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), kept)
    q = canvas + sd["decoder_pos_embed"]
    k_hat = q
    for j in range(_count(sd, "sideblocks")):
        k_hat = _block(sd, f"sideblocks.{j}", k_hat, c, heads, grid)
    w = removed.to(q.dtype).unsqueeze(-1)
    return w * k_hat + (1.0 - w) * q


# ---------------------------------------------------------------------------
# the forward pass
# ---------------------------------------------------------------------------
def reference_forward(
    sd: Mapping[str, Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    layout: str,
    num_heads: int,
    patch_size: int,
    decode_layer: int,
    ids_keep: Tensor | None = None,
    ids_restore: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The reference model's output for a reference-layout state dict ``sd``.

    layout: 'dit', 'mdt_v1' or 'mdt_v2'. decode_layer: number of decoder blocks after the
    side-interpolator (v1: a run-time choice; v2: must equal the number of ``de_blocks``).
    Full pass when ids_keep is None; otherwise the masked training pass keeping the
    tokens ids_keep (B, K). ids_restore (B, N), if given, must be consistent with ids_keep
    (inverse of a permutation whose first K entries are ids_keep). mask (B, N), 1 = removed,
    defaults to the complement of ids_keep.
    Returns (B, C_out, H, W).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    sd = _strip(sd)
    p = patch_size
    rows, cols = x.shape[-2] // p, x.shape[-1] // p
    grid = (rows, cols)
    n = rows * cols
    masked = ids_keep is not None
    if masked and layout == "dit":
        raise ValueError("DiT has no masked pass")

    if masked:
        b = x.shape[0]
        kept_flags = torch.zeros(b, n, dtype=torch.bool).scatter(1, ids_keep, True)
        assert int(kept_flags.sum()) == ids_keep.numel(), "ids_keep repeats a token"
        removed = (~kept_flags).to(x.dtype) if mask is None else mask
        assert torch.equal(removed.to(torch.bool), ~kept_flags), "mask disagrees with ids_keep"
        if ids_restore is not None:
            k = ids_keep.shape[1]
            assert torch.equal(
                torch.gather(ids_restore, 1, ids_keep), torch.arange(k).expand_as(ids_keep)
            ), "ids_restore is not the inverse of a shuffle that starts with ids_keep"

    c = _conditioning(sd, t, y)
    tokens = _to_tokens(sd, x, p) + sd["pos_embed"]  # (B, N, D), unmasked input embedding
    h = tokens
    positions = None
    if masked:
        h = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        positions = ids_keep

    if layout == "dit":
        for i in range(_count(sd, "blocks")):
            h = _block(sd, f"blocks.{i}", h, c, num_heads, grid)
        return _to_image(_head(sd, h, c), p, rows, cols)

    if layout == "mdt_v1":
        depth = _count(sd, "blocks")
        enc = [f"blocks.{i}" for i in range(depth - decode_layer)]
        dec = [f"blocks.{i}" for i in range(depth - decode_layer, depth)]
        for name in enc:
            h = _block(sd, name, h, c, num_heads, grid, positions)
        dense = None
    else:
        n_in, n_out, n_de = _count(sd, "en_inblocks"), _count(sd, "en_outblocks"), _count(sd, "de_blocks")
        assert n_in == n_out, "v2 pairs every in-block with an out-block"
        assert n_de == decode_layer, f"state dict has {n_de} de_blocks, decode_layer says {decode_layer}"
        stack = []
        for i in range(n_in):
            h = _block(sd, f"en_inblocks.{i}", h, c, num_heads, grid, positions)
            stack.append(h)
        for i in range(n_out):  # U-ViT long skips: the last in-block output feeds the first out-block
            h = _block(sd, f"en_outblocks.{i}", h, c, num_heads, grid, positions, skip=stack.pop())
        dec = [f"de_blocks.{i}" for i in range(n_de)]
        dense = tokens  # every decoder block sees the full, unmasked input embedding

    if masked:
        h = _side_interpolate(sd, h, c, num_heads, grid, ids_keep, removed)
    else:
        h = h + sd["decoder_pos_embed"]
    for name in dec:
        h = _block(sd, name, h, c, num_heads, grid, skip=dense)
    return _to_image(_head(sd, h, c), p, rows, cols)
