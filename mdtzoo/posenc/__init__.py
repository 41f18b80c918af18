"""Positional encodings (registry ``posenc``).

Each entry is a factory ``(dim, grid, num_heads) -> nn.Module | None``, tagged with
``kind``: ``absolute`` entries give an additive (1, N, D) table (``pos_embed``,
the side-interpolator's ``decoder_pos_embed``); ``relative`` entries give a per-block
attention bias. ``none`` fits either slot.
"""

from mdtzoo.posenc.sincos import AbsolutePosEmbed, sincos_1d, sincos_2d
from mdtzoo.posenc.relbias import RelativePositionBias, relative_position_index
from mdtzoo.posenc import none  # noqa: F401  (registration)
from mdtzoo.registry import POSENC

__all__ = ["AbsolutePosEmbed", "RelativePositionBias", "sincos_1d", "sincos_2d", "relative_position_index", "build"]


def build(name_or_obj, kind: str, dim: int, grid: tuple[int, int], num_heads: int):
    """Build the positional encoding ``name_or_obj`` for a ``kind`` slot ('absolute' or 'relative').

    Raises ValueError when an entry of the other kind is put in the slot, naming the valid ones.
    """
    if not isinstance(name_or_obj, str):
        return POSENC.resolve(name_or_obj, dim=dim, grid=tuple(grid), num_heads=num_heads)
    entry_kind = getattr(POSENC.get(name_or_obj), "kind", "any")
    if entry_kind not in (kind, "any"):
        valid = [n for n in POSENC.names() if getattr(POSENC.get(n), "kind", "any") in (kind, "any")]
        raise ValueError(
            f"posenc.{name_or_obj} is a {entry_kind} position encoding and cannot fill the {kind} slot; "
            f"valid choices: {', '.join(valid)}"
        )
    return POSENC.build(name_or_obj, dim=dim, grid=tuple(grid), num_heads=num_heads)
