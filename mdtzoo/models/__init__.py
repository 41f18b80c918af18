"""Models (registry ``models``): DiT / MDT v1 / MDT v2 presets assembled from registered parts."""

from __future__ import annotations

from torch import nn

from mdtzoo.models.transformer import DiffusionTransformer
from mdtzoo.models import presets  # noqa: F401  (registration)
from mdtzoo.models.convert import (
    detect_layout,
    infer_preset,
    load_reference,
    read_state_dict,
    reference_layout,
    to_reference,
)
from mdtzoo.registry import MODELS

__all__ = [
    "DiffusionTransformer",
    "build_model",
    "count_parameters",
    "load_reference",
    "to_reference",
    "detect_layout",
    "infer_preset",
    "read_state_dict",
    "reference_layout",
]


def build_model(name: str, **overrides) -> DiffusionTransformer:
    """Build the preset ``name`` (e.g. ``mdt_s2``, ``dit_xl2``, ``mdtv2_xl2``) with overrides.

    Gin bindings for ``models.<name>`` and for the chosen components apply.
    """
    return MODELS.build(name, **overrides)


def count_parameters(model: nn.Module, inference: bool = False) -> int:
    """All parameters (frozen tables included, as the published counts do).

    ``inference=True`` leaves out what only the masked training pass uses: the
    side-interpolator's blocks and mask token (the paper's "inference path" count).
    """
    total = sum(p.numel() for p in model.parameters())
    if inference and getattr(model, "interp", None) is not None:
        interp = model.interp
        total -= sum(p.numel() for p in interp.blocks.parameters())
        if interp.mask_token is not None:
            total -= interp.mask_token.numel()
    return total
