"""Gin text -> config columns, without gin and without importing models (collection stays cheap).

A run directory holds ``config.gin`` (what was bound) and ``operative_config.gin`` (what the
called configurables actually used, defaults included, written after the first step). Both are
gin's own printout:

    # Parameters for masking.random:
    masking.random.ratio = 0.3
    datasets.relations.classes = \\
        ('face',
         'count_2')
    LATENTS = 'x'                         # a macro (config.gin only)
    datasets.latents.root = %LATENTS

``parse_gin_text`` reads that into ``{"masking.random.ratio": 0.3, ...}``; ``config_columns``
adds the columns the paper tables match on (``model``, ``decode_layer``, ``train.passes`` ...),
filling the defaults that a binding-only ``config.gin`` leaves out. The defaults below mirror
``mdtzoo.models.presets.FAMILIES`` and the component signatures; tests/test_tables.py checks
that they still agree.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Mapping

_STATEMENT = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")
_MODEL = re.compile(r"^(mdtv2|mdt|dit)_(xs|s|b|l|xl)(\d+)$")

# The component choices of each preset family (mdtzoo/models/presets.py FAMILIES), plus the
# transformer options no family sets (DiffusionTransformer defaults).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "dit": dict(pos_embed="sincos", rel_pos="none", masking="none", interp=None, decode_layer=0),
    "mdt": dict(pos_embed="sincos_learnable", rel_pos="relbias", masking="random", interp="side", decode_layer=2),
    "mdtv2": dict(pos_embed="sincos_learnable", rel_pos="relbias", masking="random_jitter", interp="side",
                  decode_layer=4, long_skips=True, dense_skips=True),
}
TRANSFORMER_DEFAULTS = dict(symmetric=False, long_skips=False, dense_skips=False)
V2_DECODE_LAYER = {"xs": 2, "s": 6, "b": 4, "l": 4, "xl": 4}
MODEL_OPTIONS = ("pos_embed", "rel_pos", "masking", "interp", "decode_layer", "symmetric", "long_skips", "dense_skips")
# Columns config_columns adds beside the qualified bindings (which all contain a dot).
DERIVED_COLUMNS = ("model", "family", "size", "patch", "dataset", *MODEL_OPTIONS)

# Parameters of components, filled in when the component is in use and config.gin leaves them out.
COMPONENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "masking.random": {"ratio": 0.3},
    "masking.block": {"ratio": 0.3},
    "masking.random_jitter": {"ratio": 0.3, "span": 0.2},
    "interp.side": {"num_blocks": 1, "mask_token": True, "pos_embed": "sincos_learnable", "shortcut": True},
    "interp.none": {"mask_token": True, "pos_embed": "sincos_learnable"},
}
TRAIN_DEFAULTS = {"train.passes": "auto", "train.masked_loss_on": "all", "train.seed": 0}


def parse_value(text: str) -> Any:
    """A gin value as Python: literals via ast; references (``@models.mdt_s2``) and macros stay strings."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value  # hashable: runs are grouped by config


def parse_gin_text(text: str) -> dict[str, Any]:
    """``name.param = value`` statements of gin's printout -> {"name.param": value}; macros resolved.

    Handles comments, backslash continuations and values spread over lines inside brackets;
    ``include`` / ``import`` lines are skipped (gin's printouts have none; hand-written files may).
    """
    statements: list[list[str]] = []
    depth = 0
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if depth == 0 and (not stripped or stripped.startswith("#")):
            continue
        if depth == 0 and not line.startswith((" ", "\t")) and _STATEMENT.match(stripped):
            statements.append([stripped])
        elif statements:
            statements[-1].append(stripped)
        else:
            continue
        depth = max(0, depth + _bracket_balance(stripped))
    values: dict[str, Any] = {}
    for parts in statements:
        joined = " ".join(p[:-1].rstrip() if p.endswith("\\") else p for p in parts)
        m = _STATEMENT.match(joined)
        if m and not m.group(1).startswith(("include", "import")):
            values[m.group(1)] = parse_value(m.group(2))
    macros = {k: v for k, v in values.items() if "." not in k}
    return {k: _resolve_macro(v, macros) for k, v in values.items() if "." in k}


def _bracket_balance(line: str) -> int:
    """Open minus closed brackets outside string literals (a tuple printed over several lines)."""
    balance, quote = 0, None
    for ch in line:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            balance += 1
        elif ch in ")]}":
            balance -= 1
    return balance


def _resolve_macro(value: Any, macros: Mapping[str, Any], depth: int = 0) -> Any:
    if isinstance(value, str) and value.startswith("%") and depth < 10:
        name = value[1:]
        return _resolve_macro(macros[name], macros, depth + 1) if name in macros else value
    return value


def reference_name(value: Any) -> Any:
    """``@interp.none`` / ``@masking.block()`` / ``'block'`` -> the component's short name ('none', 'block')."""
    if isinstance(value, str) and value.startswith("@"):
        return value[1:].removesuffix("()").split(".")[-1]
    return value


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def config_columns(bindings: Mapping[str, Any], substitute: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every binding under its qualified name, plus the matching columns of the paper tables.

    Added columns: ``model`` ('mdt_s2', after ``substitute``, e.g. {'mdt_xs2': 'mdt_s2'} to put
    debug runs in the paper's rows), ``family``, ``size``, ``patch``, the model options
    (``decode_layer``, ``pos_embed``, ``rel_pos``, ``masking``, ``interp``, ``symmetric``, ...
    from ``models.<model>.<option>`` bindings or the family default), ``dataset`` ('latents').
    Component parameters in use get their defaults (``masking.random.ratio``,
    ``interp.side.num_blocks`` ...), and ``train.passes`` 'auto' is resolved to what the trainer
    runs: 'both' with an interpolator, else 'full'.
    """
    cols: dict[str, Any] = dict(bindings)
    raw_model = reference_name(bindings.get("build.model"))
    model = (substitute or {}).get(raw_model, raw_model)
    cols["model"] = model
    m = _MODEL.match(model) if isinstance(model, str) else None
    family, size = (m.group(1), m.group(2)) if m else (None, None)
    cols["family"], cols["size"], cols["patch"] = family, size, int(m.group(3)) if m else None
    options = dict(TRANSFORMER_DEFAULTS, **FAMILY_DEFAULTS.get(family, {}))
    if family == "mdtv2":
        options["decode_layer"] = V2_DECODE_LAYER[size]
    prefix = f"models.{raw_model}."
    options.update({k[len(prefix):]: reference_name(v) for k, v in bindings.items() if k.startswith(prefix)})
    cols.update(options if family else {k: options.get(k) for k in MODEL_OPTIONS})
    for component in (f"masking.{cols.get('masking')}", f"interp.{cols.get('interp')}"):
        for param, default in COMPONENT_DEFAULTS.get(component, {}).items():
            cols.setdefault(f"{component}.{param}", default)
    for key, default in TRAIN_DEFAULTS.items():
        cols.setdefault(key, default)
    if cols["train.passes"] == "auto":
        cols["train.passes"] = "full" if is_missing(cols.get("interp")) else "both"
    dataset = bindings.get("train.dataset")
    cols["dataset"] = dataset.removeprefix("datasets.") if isinstance(dataset, str) else dataset
    return cols
