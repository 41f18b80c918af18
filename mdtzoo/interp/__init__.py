"""Side-interpolators (registry ``interp``). See side.py."""

from mdtzoo.interp.side import Interpolator, scatter_back  # noqa: F401  (registration)

__all__ = ["Interpolator", "scatter_back"]
