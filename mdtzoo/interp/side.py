"""Side-interpolators (registry ``interp``): turn the encoder's kept tokens back into a full grid.

Training, masked pass only (MDT paper section 3.3): put the kept encoder outputs
back in place, fill removed places with a learnable mask token, add the
interpolator's own positional embedding -> q; run block(s) -> k; masked shortcut
out = mask * k + (1 - mask) * q (removed places take the prediction, kept places
keep q; the paper's equation swaps M and 1-M, its prose and code agree with this).
In the full pass only the positional embedding is added (``unmasked``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mdtzoo import posenc
from mdtzoo.masking.base import MaskOut
from mdtzoo.registry import INTERP


def scatter_back(x: torch.Tensor, mask_out: MaskOut, fill: torch.Tensor | None) -> torch.Tensor:
    """Kept tokens x: (B, K, D) -> (B, N, D) in grid order; removed places get ``fill`` (D,) or 0."""
    return _scatter_back(x, mask_out.ids_restore, fill)


def _scatter_back(x: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    b, k, d = x.shape
    n = ids_restore.shape[1]
    if fill is None:
        filler = x.new_zeros(b, n - k, d)
    else:
        filler = fill.to(x.dtype).expand(b, n - k, d)
    shuffled = torch.cat([x, filler], dim=1)
    return torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(b, n, d))


def _fill(interp: "Interpolator", x: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
    """The blocks' input q: kept tokens scattered back (unless x is already the grid), removed places
    taking the mask token, plus the interpolator's positions."""
    if ids_restore is not None:
        x = _scatter_back(x, ids_restore, None if interp.mask_token is None else interp.mask_token.reshape(-1))
    return interp.unmasked(x)


def _shortcut(h: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked shortcut: removed places (mask 1) take the blocks' output h, kept places keep q.
    Products by 0 or 1 and one add: exact, so compiled it is the eager result bit for bit."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return m * h + (1 - m) * q


_GLUE = {"fill": _fill, "shortcut": _shortcut}  # the pieces around the blocks; compile_glue compiles them


class Interpolator(nn.Module):
    """Mask token + positional embedding + ``num_blocks`` blocks + masked shortcut, each switchable.

    forward(x, c, mask_out): x (B, K, D) kept tokens (or (B, N, D) already in grid order,
    symmetric encoders), c (B, D) -> (B, N, D).
    unmasked(x): (B, N, D) -> (B, N, D), the full-pass path (adds the positional embedding).
    """

    def __init__(
        self,
        make_block: Callable[[], nn.Module],
        dim: int,
        grid: tuple[int, int],
        num_blocks: int = 1,
        mask_token: bool = True,
        pos_embed: str = "sincos_learnable",
        shortcut: bool = True,
    ):
        super().__init__()
        self.blocks = nn.ModuleList([make_block() for _ in range(int(num_blocks))])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        self.pos_embed = posenc.build(pos_embed, "absolute", dim, grid, num_heads=0)
        self.shortcut = bool(shortcut)
        self._glue = dict(_GLUE)

    def compile_glue(self, **options) -> None:
        """The scatter-back with the mask token and positions, and the masked shortcut, compiled
        (static shapes; ``options`` go to torch.compile). The blocks are compiled by the model."""
        self._glue = {name: torch.compile(fn, dynamic=False, **options) for name, fn in _GLUE.items()}

    def unmasked(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pos_embed is None else x + self.pos_embed()

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask_out: MaskOut) -> torch.Tensor:
        scattered = x.shape[1] != mask_out.ids_restore.shape[1]
        q = self._glue["fill"](self, x, mask_out.ids_restore if scattered else None)
        h = q
        for block in self.blocks:
            h = block(h, c)
        if not self.shortcut or not len(self.blocks):
            return h
        return self._glue["shortcut"](h, q, mask_out.mask)

    def extra_repr(self) -> str:
        return f"num_blocks={len(self.blocks)}, mask_token={self.mask_token is not None}, shortcut={self.shortcut}"


@INTERP.register("side")
def side(
    make_block: Callable[[], nn.Module],
    dim: int,
    grid: tuple[int, int],
    num_blocks: int = 1,
    mask_token: bool = True,
    pos_embed: str = "sincos_learnable",
    shortcut: bool = True,
) -> Interpolator:
    """MDT side-interpolator: mask token, own pos-embed, num_blocks blocks, masked shortcut."""
    if int(num_blocks) < 1:
        raise ValueError(f"interp.side needs num_blocks >= 1 (use interp.none for no block); got {num_blocks}")
    return Interpolator(make_block, dim, grid, num_blocks, mask_token, pos_embed, shortcut)


@INTERP.register("none")
def none(
    make_block: Callable[[], nn.Module],
    dim: int,
    grid: tuple[int, int],
    mask_token: bool = True,
    pos_embed: str = "sincos_learnable",
) -> Interpolator:
    """No interpolator block: scatter kept tokens back, fill removed ones with the mask token."""
    return Interpolator(make_block, dim, grid, 0, mask_token, pos_embed, shortcut=False)
