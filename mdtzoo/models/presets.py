"""Model presets (registry ``models``): dit_{s,b,l,xl}{2,4,8}, mdt_{s,b,l,xl}{2,4,8}, mdtv2_{s,b,l,xl}2.

Sizes are the DiT paper's; a preset is a size plus the family's component choices.
Every preset takes the transformer's options as overrides (``decode_layer=4``,
``masking="block"``, ...), from Python or from gin (``models.mdt_s2.decode_layer = 4``).
"""

from __future__ import annotations

import inspect

from mdtzoo.models.transformer import DiffusionTransformer
from mdtzoo.registry import MODELS

# name: (depth, hidden size, heads); "xs" is ours, a CPU-sized model for demos and tests.
SIZES = {"xs": (6, 128, 4), "s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
PATCHES = (2, 4, 8)

# The component choices that make a family; everything else is the transformer's default.
FAMILIES = {
    # DiT: fixed sin-cos table, no relative bias, no masking, no interpolator.
    "dit": dict(pos_embed="sincos", rel_pos="none", masking="none", interp=None, decode_layer=0),
    # MDT v1 (the paper): learnable sin-cos, relative bias in every block, random masking 0.3,
    # side-interpolator before the last 2 blocks.
    "mdt": dict(pos_embed="sincos_learnable", rel_pos="relbias", masking="random", interp="side", decode_layer=2),
    # MDT v2 (reference main branch): ratio jitter U[0.3, 0.5), long + dense skips, 4 decoder blocks.
    "mdtv2": dict(
        pos_embed="sincos_learnable",
        rel_pos="relbias",
        masking="random_jitter",
        interp="side",
        decode_layer=4,
        long_skips=True,
        dense_skips=True,
    ),
}
# The reference MDT v2 trains S/2 with decode_layer 6 (its run.sh); XL/2 uses 4.
V2_DECODE_LAYER = {"xs": 2, "s": 6, "b": 4, "l": 4, "xl": 4}

# Published parameter counts (SPEC section 2; DiT exact, MDT to the reported 1e3).
PUBLISHED = {
    "dit_s2": 32_963_360, "dit_b2": 130_512_416, "dit_l2": 458_102_816, "dit_xl2": 675_129_632,
    "mdt_s2": 35_797_000, "mdt_b2": 141_489_000, "mdt_l2": 477_641_000, "mdt_xl2": 699_778_000,
    "mdt_s4": 35_648_000, "mdt_s8": 35_819_000, "mdt_b4": 141_189_000, "mdt_b8": 141_531_000,
    "mdt_l4": 477_101_000, "mdt_l8": 477_523_000, "mdt_xl4": 699_160_000, "mdt_xl8": 699_632_000,
    "mdtv2_xl2": 742_264_000,
}

OPTIONS = [p for p in inspect.signature(DiffusionTransformer.__init__).parameters if p != "self"]
SIZE_OPTIONS = ("depth", "hidden_size", "num_heads", "patch_size")


def _preset(family: str, size: str, patch: int):
    depth, width, heads = SIZES[size]
    defaults = dict(FAMILIES[family], depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    if family == "mdtv2":
        defaults["decode_layer"] = V2_DECODE_LAYER[size]
    label = {"dit": "DiT", "mdt": "MDT", "mdtv2": "MDTv2"}[family]

    def build(**overrides) -> DiffusionTransformer:
        unknown = sorted(set(overrides) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"models.{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTIONS)}"
            )
        fixed = sorted(set(overrides) & set(SIZE_OPTIONS))
        if fixed:
            raise TypeError(f"models.{name}: {', '.join(fixed)} define the preset; pick another preset instead")
        return DiffusionTransformer(**{**defaults, **overrides})

    name = f"{family}_{size}{patch}"
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{label}-{size.upper()}/{patch}: depth {depth}, width {width}, {heads} heads, patch {patch}."
    build.defaults = defaults
    return name, build


def _register_all() -> None:
    for family in FAMILIES:
        for size in SIZES:
            for patch in PATCHES if family != "mdtv2" else (2,):
                MODELS.add(*_preset(family, size, patch))


_register_all()
