"""Masking strategies (registry ``masking``): which tokens the encoder keeps in the masked pass.

Every strategy is a callable ``strategy(batch, grid, *, device, generator) -> MaskOut``
registered under one name. Adding one is one small file plus an import line here;
the property tests in tests/test_masking.py then cover it automatically.
"""

from mdtzoo.masking.base import MaskOut, from_mask, from_shuffle, keep_count
from mdtzoo.masking import random, jitter, block, none  # noqa: F401  (registration)

__all__ = ["MaskOut", "from_mask", "from_shuffle", "keep_count"]
