"""Reference checkpoints: DiT, MDT v1 and MDT v2 state-dict layouts <-> our models.

Reference layouts (SPEC section 2): DiT's keys (``x_embedder.proj.*``, ``pos_embed``,
``blocks.{i}.*``, ``final_layer.*``, ...); MDT v1 adds ``decoder_pos_embed``,
``mask_token``, ``sideblocks.{j}.*`` and ``*.attn.rel_pos_bias.relative_position_bias_table``
/ ``relative_position_index``; MDT v2 splits ``blocks`` into ``en_inblocks``,
``en_outblocks`` and ``de_blocks`` (the last two with ``skip_linear``).

Our models keep all blocks in one ``blocks`` list, the positional tables as
``pos_embed.weight`` and the interpolator's parts under ``interp.``; conversion is
a pure renaming, so a round trip is lossless.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch
from torch import nn

LAYOUTS = ("dit", "mdt_v1", "mdt_v2")


def _reference_name(model: nn.Module, name: str) -> str:
    """Our parameter/buffer name -> the reference code's name."""
    if name == "pos_embed.weight":
        return "pos_embed"
    if name == "interp.pos_embed.weight":
        return "decoder_pos_embed"
    if name == "interp.mask_token":
        return "mask_token"
    m = re.match(r"interp\.blocks\.(\d+)\.(.*)", name)
    if m:
        return f"sideblocks.{m.group(1)}.{m.group(2)}"
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m and reference_layout(model) == "mdt_v2":
        i, rest = int(m.group(1)), m.group(2)
        half = model.num_skip_pairs
        if i < half:
            return f"en_inblocks.{i}.{rest}"
        if i < 2 * half:
            return f"en_outblocks.{i - half}.{rest}"
        return f"de_blocks.{i - 2 * half}.{rest}"
    return name


def reference_layout(model: nn.Module) -> str:
    """Which reference layout a model maps to: 'dit', 'mdt_v1' or 'mdt_v2'.

    Raises ValueError for zoo variants that no reference code can hold.
    """
    if model.long_skips or model.dense_skips:
        if not (model.long_skips and model.dense_skips and 2 * model.num_skip_pairs == model.num_encoder_blocks):
            raise ValueError(
                "only the MDT v2 arrangement (long skips over an even encoder and dense decoder skips) "
                "has a reference layout; this model mixes them"
            )
        return "mdt_v2"
    if model.symmetric:
        raise ValueError("symmetric encoders (input_mask_token) have no reference layout")
    return "mdt_v1" if model.interp is not None else "dit"


def to_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's state dict in the reference code's layout (tensors cloned, on CPU)."""
    reference_layout(model)  # raises for variants without a layout
    return {_reference_name(model, k): v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_reference(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a reference-layout state dict into ``model``, strictly.

    Raises ValueError naming every missing, unexpected and mis-shaped key (with both
    shapes) before touching the model; the relative-position index buffers must equal ours.
    """
    state_dict = _strip_prefixes(state_dict)
    ours = model.state_dict()
    to_ours = {_reference_name(model, k): k for k in ours}
    missing = sorted(set(to_ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(to_ours))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(ours[to_ours[k]].shape)}"
        for k in sorted(set(to_ours) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(ours[to_ours[k]].shape)
    ]
    bad_index = [
        k
        for k in sorted(set(to_ours) & set(state_dict))
        if k.endswith("relative_position_index")
        and k not in mis_shaped
        and tuple(state_dict[k].shape) == tuple(ours[to_ours[k]].shape)
        and not torch.equal(state_dict[k].to(torch.int64).cpu(), ours[to_ours[k]].cpu())
    ]
    if missing or unexpected or mis_shaped or bad_index:
        layout = reference_layout(model)
        raise ValueError(
            f"checkpoint does not match the model (expected the {layout} reference layout):\n"
            + _listing("missing keys", missing)
            + _listing("unexpected keys", unexpected)
            + _listing("mis-shaped", mis_shaped)
            + _listing("relative_position_index differs (different token grid?)", bad_index)
        )
    model.load_state_dict({to_ours[k]: v for k, v in state_dict.items()}, strict=True)


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    if not items:
        return ""
    # Top-level keys (pos_embed, x_embedder, ...) say most about a mismatch; per-block repeats last.
    items = sorted(items, key=lambda k: ("blocks." in k, k))
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}\n"


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'dit', 'mdt_v1' or 'mdt_v2' from the keys of a reference state dict."""
    keys = set(_strip_prefixes(state_dict))
    if any(k.startswith("en_inblocks.") for k in keys):
        return "mdt_v2"
    if "mask_token" in keys or any(k.startswith("sideblocks.") for k in keys):
        return "mdt_v1"
    if "pos_embed" in keys and any(k.startswith("blocks.") for k in keys):
        return "dit"
    raise ValueError("not a DiT / MDT reference state dict (no pos_embed, blocks.* or en_inblocks.* keys)")


def infer_preset(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """(preset name, overrides) that build a model matching a reference state dict.

    Size and patch come from tensor shapes; input size from the token count; the
    v2 decoder depth from ``de_blocks``. (v1's decode_layer is a run-time choice the
    weights do not record; the paper's 2 is assumed. The label table is assumed to carry
    the null-class row, as every guidance-trained checkpoint does.)
    """
    from mdtzoo.models.presets import SIZES

    sd = _strip_prefixes(state_dict)
    layout = detect_layout(sd)
    width = sd["pos_embed"].shape[-1]
    num_tokens = sd["pos_embed"].shape[-2]
    patch = sd["x_embedder.proj.weight"].shape[-1]
    in_channels = sd["x_embedder.proj.weight"].shape[1]
    block_ids = {m.group(1) for k in sd if (m := re.match(r"((?:blocks|en_inblocks|en_outblocks|de_blocks)\.\d+)\.", k))}
    depth = len(block_ids)
    size = next((s for s, (d, w, _) in SIZES.items() if d == depth and w == width), None)
    if size is None:
        raise ValueError(f"no preset has depth {depth} and width {width}; known sizes: {SIZES}")
    family = {"dit": "dit", "mdt_v1": "mdt", "mdt_v2": "mdtv2"}[layout]
    grid = int(round(num_tokens**0.5))
    overrides = dict(
        input_size=grid * patch,
        in_channels=in_channels,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == patch * patch * 2 * in_channels,
    )
    if layout == "mdt_v2":
        overrides["decode_layer"] = len({k.split(".")[1] for k in sd if k.startswith("de_blocks.")})
    return f"{family}_{size}{patch}", overrides


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file, loaded with ``weights_only=True``.

    Training checkpoints that wrap several state dicts (``{"model": ..., "ema": ...}``,
    as DiT's do) are unwrapped: ``key`` picks one, default ``ema`` then ``model``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling code is refused by weights_only=True
        raise ValueError(f"cannot read {path} as a weights-only checkpoint: {e}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for candidate in [key] if key else ["ema", "model", "state_dict"]:
        if candidate in obj and isinstance(obj[candidate], Mapping):
            return dict(obj[candidate])
    raise ValueError(
        f"{path} wraps several entries ({', '.join(map(str, obj))}); choose one with key=... "
        "(none of 'ema', 'model', 'state_dict' found)"
    )
