"""`posenc.none`: no positional signal in this slot."""

from mdtzoo.registry import POSENC


@POSENC.register("none")
def none(dim: int = 0, grid: tuple[int, int] = (0, 0), num_heads: int = 0) -> None:
    """No positional encoding: the slot (absolute table or attention bias) stays empty."""
    return None


none.kind = "any"
