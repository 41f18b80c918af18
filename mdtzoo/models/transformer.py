"""DiT and MDT (v1, v2) as one transformer assembled from registered parts.

    x (B, C, H, W) -> patchify -> + pos_embed -> tokens (B, N, D)
      full pass:    encoder blocks -> interp.unmasked (+ its pos table) -> decoder blocks
      masked pass:  keep K tokens -> encoder blocks on K tokens (bias at kept positions)
                    -> interp (scatter back, mask token, side block, masked shortcut)
                    -> decoder blocks on N tokens
    -> final layer -> unpatchify -> (B, 2C, H, W)

The encoder is the first ``depth - decode_layer`` blocks and the decoder the last
``decode_layer`` (the paper's side-interpolator position, Table 4). DiT is the
same transformer with a fixed sin-cos table, no relative bias, no interpolator.
MDT v2 adds U-ViT long skips inside the encoder and a dense skip from the
unmasked input embedding into every decoder block.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import nn

from mdtzoo import masking as masking_lib
from mdtzoo import posenc
from mdtzoo.masking.base import MaskOut
from mdtzoo.models.blocks import (Block, FinalLayer, LabelEmbedder, TimestepEmbedder, check_mlp_impl,
                                  check_norm_impl)
from mdtzoo.registry import INTERP, MASKING


class DiffusionTransformer(nn.Module):
    """A class-conditional diffusion transformer; see the module docstring for the data flow.

    Forward: ``model(x, t, y)`` full pass; ``model(x, t, y, mask=M)`` masked pass with
    M (B, N) 1 = removed (or a MaskOut, or ``True`` to draw one with ``self.masking``).
    x: (B, C, H, W), t: (B,) int or float timesteps, y: (B,) int64 labels
    -> (B, 2C, H, W) with learned sigma, else (B, C, H, W).
    ``attn_impl``, ``norm_impl`` and ``mlp_impl`` pick the blocks' kernels (``Attention``, ``Block``);
    none changes the maths.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        pos_embed: str | nn.Module | None = "sincos_learnable",
        rel_pos: str = "relbias",
        masking: str | object = "random",
        interp: str | None = "side",
        decode_layer: int = 2,
        symmetric: bool = False,
        long_skips: bool = False,
        dense_skips: bool = False,
        attn_impl: str = "auto",
        norm_impl: str = "triton",
        mlp_impl: str = "torch",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"input size {input_size} is not divisible by patch size {patch_size}; "
                f"valid patch sizes for {input_size}: "
                f"{[p for p in (1, 2, 4, 8, 16) if input_size % p == 0]}"
            )
        check_norm_impl(norm_impl)  # before any parameters are made
        check_mlp_impl(mlp_impl)
        if not 0 <= decode_layer <= depth:
            raise ValueError(f"decode_layer (side-interpolator position) must be in 0..{depth}; got {decode_layer}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.hidden_size, self.num_heads = num_classes, hidden_size, num_heads
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.decode_layer, self.symmetric = int(decode_layer), bool(symmetric)
        self.long_skips, self.dense_skips = bool(long_skips), bool(dense_skips)
        num_patches = self.grid[0] * self.grid[1]

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = posenc.build(pos_embed, "absolute", hidden_size, self.grid, num_heads)

        def make_block(skip: bool = False) -> Block:
            bias = posenc.build(rel_pos, "relative", hidden_size, self.grid, num_heads)
            return Block(hidden_size, num_heads, mlp_ratio, rel_pos_bias=bias, skip=skip, attn_impl=attn_impl,
                         norm_impl=norm_impl, mlp_impl=mlp_impl)

        n_enc = depth - self.decode_layer
        # U-ViT long skips: the first half of the encoder feeds the second half, last in first out.
        self.num_skip_pairs = n_enc // 2 if self.long_skips else 0
        self.blocks = nn.ModuleList(
            [make_block(skip=i >= n_enc - self.num_skip_pairs) for i in range(n_enc)]
            + [make_block(skip=self.dense_skips) for _ in range(self.decode_layer)]
        )
        self.masking = MASKING.resolve(masking)
        self.interp = (
            None
            if interp is None or interp == "off"
            else INTERP.resolve(interp, make_block=make_block, dim=hidden_size, grid=self.grid)
        )
        self.input_mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if self.symmetric else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # the functions forward runs for the input embedding and the encoder's and decoder's blocks: eager,
        # or compiled by compile_blocks (the model is their argument)
        self._regions = {**_STACKS, **_GLUE}
        self.initialize_weights()
        assert num_patches == self.x_embedder.num_patches

    # -- init -------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear, zero adaLN and output layers, so the output is exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.all_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.input_mask_token is not None:
            nn.init.normal_(self.input_mask_token, std=0.02)

    def all_blocks(self):
        yield from self.blocks
        if self.interp is not None:
            yield from self.interp.blocks

    def compile_blocks(self, mode: str | None = None, scope: str = "blocks") -> None:
        """Regional torch.compile: the transformer blocks (and the timestep embedder and final
        layer) compiled in place, static shapes.

        ``scope`` 'blocks': every block its own region. Blocks of one shape share one graph
        (parameters are graph inputs), so compiling costs one graph per token count -- full pass,
        masked pass (a fixed kept count compiles once) -- not one per layer. 'stacks': the
        encoder's blocks as one region and the decoder's as another (the side-interpolator's
        blocks one by one): fewer region calls per step, each with its guards and autograd
        wrappers on the host, for a longer compile. At either scope the input embedding (patches,
        positions, the kept tokens' gather) and the side-interpolator's pieces around its blocks
        (``Interpolator.compile_glue``) are compiled too: outputs bitwise the eager ones, gradients to
        float32 rounding (batch sums in another order). Masks and label dropout stay eager, where the
        per-step random generators live; state-dict keys are unchanged. ``mode``: a
        torch.compile mode (None or 'default': the default; 'reduce-overhead' replays each
        region as CUDA graphs).
        """
        check_compile_scope(scope)
        options = {} if mode in (None, "default") else {"mode": mode}
        # the model is an argument, so copies (EMA) run their own weights
        compiled = {**_GLUE, **(_STACKS if scope == "stacks" else {})}
        self._regions = {**_STACKS, **{name: torch.compile(fn, dynamic=False, **options)
                                      for name, fn in compiled.items()}}
        if hasattr(self.interp, "compile_glue"):
            self.interp.compile_glue(**options)
        stacked = set(self.blocks) if scope == "stacks" else set()
        for block in self.all_blocks():
            if block not in stacked:
                block.compile(dynamic=False, **options)
        # the small eager pieces around them too: a few kernels instead of dozens of launches a pass
        for module in (self.t_embedder, self.final_layer):
            module.compile(dynamic=False, **options)

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """Recompute each block's activations in the backward (less memory, ~1/3 more compute)."""
        for block in self.all_blocks():
            block.checkpoint_activations = bool(on)

    # -- structure ----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_encoder_blocks(self) -> int:
        return len(self.blocks) - self.decode_layer

    def sample_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> MaskOut:
        """Draw a mask for a masked pass with this model's masking strategy."""
        if self.masking is None:
            raise ValueError("this model has no masking strategy; pass an explicit mask")
        return self.masking(batch, self.grid, device=device, generator=generator)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); each token is read as (p_row, p_col, C)."""
        b, p, c = x.shape[0], self.patch_size, self.out_channels
        rows, cols = self.grid
        x = x.reshape(b, rows, cols, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, rows * p, cols * p)

    def _check_inputs(self, x, t, y) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model, which takes (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) (in_channels={self.in_channels}, input_size={self.input_size})"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},); got {tuple(t.shape)} and {tuple(y.shape)}")

    def _resolve_mask(self, mask, batch: int, device, generator) -> MaskOut | None:
        if mask is None or mask is False:
            return None
        if mask is True:
            return self.sample_mask(batch, device, generator)
        if isinstance(mask, MaskOut):
            out = mask
        else:
            out = masking_lib.from_mask(mask)
        if out.mask.shape != (batch, self.num_tokens):
            raise ValueError(
                f"mask of shape {tuple(out.mask.shape)} does not fit: expected ({batch}, {self.num_tokens}) "
                f"for a {self.grid[0]}x{self.grid[1]} token grid"
            )
        return out.to(device)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x, t, y, mask=None, *, generator: torch.Generator | None = None,
                drop_labels: bool | None = None):
        """Full pass (mask None) or masked training pass; see the class docstring.

        drop_labels: label dropout for guidance (default: in training mode); a trainer that
        drops labels itself (to draw per-sample randomness globally) passes False.
        """
        self._check_inputs(x, t, y)
        mask_out = self._resolve_mask(mask, x.shape[0], x.device, generator)
        if mask_out is not None and self.interp is None:
            raise ValueError("a masked pass needs a side-interpolator; this model was built with interp=None")
        drop = self.training if drop_labels is None else drop_labels
        c = self.t_embedder(t) + self.y_embedder(y, drop, generator)

        ids_keep = None
        if mask_out is not None and not self.symmetric:
            mask_out = mask_out.in_grid_order()  # the same result; contiguous bias reads in attention
            ids_keep = mask_out.ids_keep
        removed = mask_out.mask if mask_out is not None and self.symmetric else None
        h, input_skip = self._regions["embed"](self, x, removed, ids_keep)

        h = self._regions["encode"](self, h, c, ids_keep)
        if self.interp is not None:
            h = self.interp(h, c, mask_out) if mask_out is not None else self.interp.unmasked(h)
        h = self._regions["decode"](self, h, c, input_skip)
        return self.unpatchify(self.final_layer(h, c))

    def _embed(self, x, removed, ids_keep):
        """Tokens (B, N, D) with their absolute positions, then the kept ones (B, K, D) where ``ids_keep``
        is given; also the tokens before that gather when the decoder takes them (dense skips), else
        None. ``removed`` (B, N), 1 = removed: a symmetric encoder's mask, its places take the input
        mask token. Elementwise maths only (products by 0 or 1 and single adds), so compiled
        (``compile_blocks``) its output is the eager one bit for bit."""
        h = self.x_embedder(x)  # (B, N, D)
        if removed is not None:
            # Symmetric encoder (paper Table 5a): removed tokens stay, replaced by a learned token.
            m = removed.to(h.dtype).unsqueeze(-1)
            h = h * (1 - m) + m * self.input_mask_token.to(h.dtype)
        if self.pos_embed is not None:
            h = h + self.pos_embed()
        input_skip = h if self.dense_skips else None
        if ids_keep is not None:
            h = torch.gather(h, 1, ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return h, input_skip

    def _decode(self, h, c, input_skip):
        for block in self.blocks[self.num_encoder_blocks :]:
            h = block(h, c, skip=input_skip)
        return h

    def _encode(self, h, c, ids_keep):
        n_enc, pairs = self.num_encoder_blocks, self.num_skip_pairs
        skips = []
        for i, block in enumerate(self.blocks[:n_enc]):
            if i >= n_enc - pairs:
                h = block(h, c, skip=skips.pop(), ids_keep=ids_keep)
            else:
                h = block(h, c, ids_keep=ids_keep)
                if i < pairs:
                    skips.append(h)
        return h

    def summary(self) -> str:
        """One line: the architecture choices and parameter count."""
        n_params = sum(p.numel() for p in self.parameters())
        rel = any(b.attn.rel_pos_bias is not None for b in self.blocks)
        pos = "none" if self.pos_embed is None else ("learnable" if self.pos_embed.weight.requires_grad else "fixed")
        interp = "none" if self.interp is None else repr_interp(self.interp)
        return (
            f"{len(self.blocks)} blocks (encoder {self.num_encoder_blocks}, decoder {self.decode_layer}), "
            f"width {self.hidden_size}, {self.num_heads} heads, patch {self.patch_size}, "
            f"{self.grid[0]}x{self.grid[1]} tokens, pos {pos}, relbias {'on' if rel else 'off'}, "
            f"masking {self.masking!r}, interp {interp}, "
            f"{'symmetric' if self.symmetric else 'asymmetric'}, long skips {self.num_skip_pairs}, "
            f"dense skips {'on' if self.dense_skips else 'off'}; {n_params:,} parameters"
        )


def repr_interp(interp: nn.Module) -> str:
    return f"{type(interp).__name__}({interp.extra_repr()})"


COMPILE_SCOPES = ("blocks", "stacks")  # what compile_blocks compiles as one region: each block, or each stack


def check_compile_scope(scope: str) -> str:
    """``scope`` if it is one of ``COMPILE_SCOPES``; else a ValueError naming the valid ones."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; valid: {', '.join(COMPILE_SCOPES)}")
    return scope


# how forward runs the encoder's and the decoder's blocks: eager, or compiled by compile_blocks(scope='stacks')
_STACKS = {"encode": DiffusionTransformer._encode, "decode": DiffusionTransformer._decode}
# the eager pieces between the compiled blocks, compiled by compile_blocks at either scope
_GLUE = {"embed": DiffusionTransformer._embed}
