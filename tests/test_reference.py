"""Our models against the reference checkpoint layouts and an independent functional oracle.

The oracle (tests/reference_forward.py) re-derives the DiT / MDT v1 / MDT v2 forward
passes from SPEC section 2 over a reference-layout state dict; it shares no code with
mdtzoo.models. Weights are randomised (adaLN-Zero init would make every output 0 and
hide mistakes) and everything runs in float64, so agreement is to rounding (1e-10).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from mdtzoo.masking import from_shuffle, keep_count
from mdtzoo.models import (
    build_model,
    detect_layout,
    infer_preset,
    load_reference,
    read_state_dict,
    to_reference,
)
from mdtzoo.posenc import sincos_2d
from reference_forward import frequency_features, grid_bias, reference_forward

TOL = 1e-10
BATCH = 3

# name: (preset, overrides, reference layout, decode_layer). 4x4 token grids keep this fast.
CASES = {
    "dit_s2": ("dit_s2", dict(input_size=8), "dit", 0),
    "mdt_s2": ("mdt_s2", dict(input_size=8), "mdt_v1", 2),
    "mdt_s4": ("mdt_s4", dict(input_size=16, num_classes=10), "mdt_v1", 2),
    "mdtv2_s2": ("mdtv2_s2", dict(input_size=8), "mdt_v2", 6),
}
MASKED = [name for name, (_, _, layout, _) in CASES.items() if layout != "dit"]


def as_float64(model: torch.nn.Module) -> torch.nn.Module:
    """model.double() in eval mode. The timestep frequencies are computed in float32 (as in the
    reference); cast them for the float64 t-MLP."""
    model.double().eval()
    model.t_embedder.mlp.register_forward_pre_hook(lambda mod, args: (args[0].to(mod[0].weight.dtype),))
    return model


def randomise_(tensors, seed: int, bound: float = 0.08):
    """Every floating tensor ~ U(-bound, bound) (std 0.046), in place; integer buffers
    (relative_position_index) untouched. Random weights keep adaLN-Zero from hiding errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in tensors:
            if v.is_floating_point():
                v.uniform_(-bound, bound, generator=g)


@functools.lru_cache(maxsize=None)
def _bundle(case: str):
    """(random reference-layout state dict, a fresh model loaded from it with load_reference).

    The state dict is ``to_reference`` of a freshly built model with every floating tensor then
    redrawn at random, so the model still holds its initial values until ``load_reference``
    overwrites them; a key it failed to set would show in the round-trip and forward tests.
    """
    preset, overrides, _, _ = CASES[case]
    torch.set_default_dtype(torch.float64)  # build in float64 directly (cheaper than .double())
    try:
        model = as_float64(build_model(preset, **overrides))
    finally:
        torch.set_default_dtype(torch.float32)
    sd = to_reference(model)
    randomise_(sd.values(), seed=sorted(CASES).index(case) + 1)
    load_reference(model, sd)
    pairs = list(zip(model.state_dict().values(), sd.values()))  # to_reference keeps state_dict order
    assert all(a.shape == b.shape for a, b in pairs)
    return sd, model, pairs


def random_reference_sd(case: str) -> dict[str, torch.Tensor]:
    """The case's random float64 state dict in the reference layout (a new dict each call)."""
    return dict(_bundle(case)[0])


def loaded(case: str) -> torch.nn.Module:
    return _bundle(case)[1]


def changed_tensors(case: str) -> int:
    """How many tensors of the cached model differ from the cached state dict."""
    return sum(not torch.equal(a, b) for a, b in _bundle(case)[2])


@contextlib.contextmanager
def scratch(case: str):
    """Lend a cached model to a test that changes it; its weights are put back afterwards."""
    try:
        yield loaded(case)
    finally:
        with torch.no_grad():
            for a, b in _bundle(case)[2]:
                if not torch.equal(a, b):
                    a.copy_(b)


@pytest.fixture(scope="module", autouse=True)
def _free_cached_models():
    """The cached float64 models and state dicts take ~2 GB; release them after this file."""
    yield
    _bundle.cache_clear()
    full_passes.cache_clear()


def inputs(case: str, seed: int = 0):
    _, overrides, _, _ = CASES[case]
    size = overrides["input_size"]
    num_classes = overrides.get("num_classes", 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 517, 999])
    y = torch.tensor([3, num_classes, num_classes - 1])  # the null class included
    return x, t, y


def oracle(case: str, sd, x, t, y, **mask_kw) -> torch.Tensor:
    _, _, layout, decode_layer = CASES[case]
    model = loaded(case)
    return reference_forward(
        sd, x, t, y, layout=layout, num_heads=model.num_heads, patch_size=model.patch_size,
        decode_layer=decode_layer, **mask_kw,
    )


def random_mask(num_tokens: int, num_keep: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.stack([torch.randperm(num_tokens, generator=g) for _ in range(BATCH)])
    return from_shuffle(ids_shuffle, num_keep)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------
# (a) forward passes equal the oracle
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def full_passes(case: str):
    """(ours, oracle) full-pass outputs for the case's inputs (each float64 pass reads ~280 MB of weights)."""
    x, t, y = inputs(case)
    with torch.no_grad():
        ours = loaded(case)(x, t, y)
    return ours, oracle(case, random_reference_sd(case), x, t, y)


@pytest.mark.parametrize("case", list(CASES))
def test_full_pass_matches_oracle(case):
    ours, expected = full_passes(case)
    assert expected.abs().max() > 0.1  # randomised weights: a non-trivial output
    assert max_diff(ours, expected) < TOL


# ratio 0.3 keeps int(16 * 0.7) = 11 of 16 tokens; 0.45 keeps 8 (v2 draws ratios in [0.3, 0.5))
MASK_RATIOS = {"mdt_s2": 0.3, "mdt_s4": 0.3, "mdtv2_s2": 0.45}


@pytest.mark.parametrize("case", MASKED)
def test_masked_pass_matches_oracle(case):
    model = loaded(case)
    x, t, y = inputs(case)
    n = model.num_tokens
    mo = random_mask(n, keep_count(n, MASK_RATIOS[case]), seed=len(case))
    expected = oracle(case, random_reference_sd(case), x, t, y,
                      ids_keep=mo.ids_keep, ids_restore=mo.ids_restore, mask=mo.mask)
    with torch.no_grad():
        via_maskout = model(x, t, y, mask=mo)
        via_tensor = model(x, t, y, mask=mo.mask)  # kept tokens re-ordered ascending: same result
    assert max_diff(via_maskout, expected) < TOL
    assert max_diff(via_tensor, expected) < TOL
    assert max_diff(via_maskout, full_passes(case)[0]) > 1e-3  # the masked pass is a different computation


def test_drawn_mask_matches_oracle():
    """mask=True draws with the preset's strategy (v2: ratio jitter); the same generator state
    gives the same mask."""
    case = "mdtv2_s2"
    model = loaded(case)
    x, t, y = inputs(case, seed=2)
    mo = model.sample_mask(BATCH, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        ours = model(x, t, y, mask=True, generator=torch.Generator().manual_seed(42))
    expected = oracle(case, random_reference_sd(case), x, t, y, ids_keep=mo.ids_keep, mask=mo.mask)
    assert max_diff(ours, expected) < TOL


def test_oracle_pieces_follow_the_spec():
    """The oracle's own building blocks against SPEC section 2 numbers (no model involved)."""
    # relative bias: table row (dr + G - 1)(2G - 1) + (dc + G - 1), per head; 3 unused rows at the end
    g = 4
    table = torch.arange((2 * g - 1) ** 2 + 3, dtype=torch.float64)[:, None] * torch.tensor([1.0, -1.0])
    full = grid_bias(table, g, g)  # (H, N, N)
    assert full.shape == (2, 16, 16)
    assert full[0, 0, 1] == (0 + 3) * 7 + (-1 + 3)  # query (0,0), key (0,1): dr 0, dc -1
    assert full[1, 5, 0] == -((1 + 3) * 7 + (1 + 3))  # query (1,1), key (0,0)
    assert full[0].max() == 48 and full[0].min() == 0  # the 3 trailing rows are never read
    kept = torch.tensor([[5, 0, 15], [15, 5, 0]])
    masked = grid_bias(table, g, g, kept)  # (B, H, K, K): bias at the kept tokens' rows and columns
    assert torch.equal(masked[0, :, 0, 1], full[:, 5, 0]) and torch.equal(masked[1, :, 2, 0], full[:, 0, 15])
    # timestep features: [cos | sin], f_0 = 1, f_k = exp(-ln(1e4) k / 128)
    e = frequency_features(torch.tensor([0, 3]))
    assert e.shape == (2, 256) and e.dtype == torch.float32
    assert torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert abs(e[1, 0].item() - torch.cos(torch.tensor(3.0)).item()) < 1e-6
    assert abs(e[1, 128 + 64].item() - torch.sin(torch.tensor(3 * 1e4 ** -0.5)).item()) < 1e-6


def test_oracle_rejects_inconsistent_masks():
    case = "mdt_s2"
    x, t, y = inputs(case)
    mo = random_mask(loaded(case).num_tokens, 11, 0)
    sd = random_reference_sd(case)
    with pytest.raises(AssertionError):
        oracle(case, sd, x, t, y, ids_keep=mo.ids_keep, mask=1 - mo.mask)
    with pytest.raises(AssertionError):
        oracle(case, sd, x, t, y, ids_keep=mo.ids_keep, ids_restore=mo.ids_restore.flip(1))


# ---------------------------------------------------------------------------
# (b) round trip
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_lossless(case):
    sd = random_reference_sd(case)
    model = loaded(case)  # built fresh, then load_reference(sd): see _bundle
    back = to_reference(model)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert len(back) == len(model.state_dict())  # one reference key per parameter and buffer


def test_reference_keys_follow_the_checkpoint_layout():
    v1, v2, dit = random_reference_sd("mdt_s2"), random_reference_sd("mdtv2_s2"), random_reference_sd("dit_s2")
    assert {"pos_embed", "decoder_pos_embed", "mask_token", "sideblocks.0.attn.qkv.weight"} <= set(v1)
    assert "sideblocks.1.attn.qkv.weight" not in v1 and "blocks.11.mlp.fc1.weight" in v1
    assert v1["blocks.0.attn.rel_pos_bias.relative_position_bias_table"].shape == (7 * 7 + 3, 6)
    assert v1["blocks.0.attn.rel_pos_bias.relative_position_index"].dtype == torch.int64
    assert v1["mask_token"].shape == (1, 1, 384) and v1["pos_embed"].shape == (1, 16, 384)
    assert {"en_inblocks.2.attn.qkv.weight", "en_outblocks.2.skip_linear.weight",
            "de_blocks.5.skip_linear.weight"} <= set(v2)
    assert "en_inblocks.3.attn.qkv.weight" not in v2 and "en_inblocks.0.skip_linear.weight" not in v2
    assert v2["de_blocks.0.skip_linear.weight"].shape == (384, 768)
    assert not any("rel_pos_bias" in k or k in ("mask_token", "decoder_pos_embed") for k in dit)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
            "blocks.11.mlp.fc2.bias"} <= set(dit)
    assert not any(k.startswith(("module.", "blocks.12.")) for k in dit)


# ---------------------------------------------------------------------------
# (c) load_reference errors
# ---------------------------------------------------------------------------
def _untouched_on_failure(case: str, sd) -> str:
    """load_reference raises ValueError before touching the model; returns the message."""
    with scratch(case) as model:
        with pytest.raises(ValueError) as info:
            load_reference(model, sd)
        changed = changed_tensors(case)
    assert changed == 0, f"a failed load changed {changed} tensors"
    return str(info.value)


@pytest.mark.parametrize("case", ["mdt_s2", "mdtv2_s2"])
def test_missing_key_is_named(case):
    sd = random_reference_sd(case)
    key = "decoder_pos_embed" if case == "mdt_s2" else "en_outblocks.1.skip_linear.bias"
    del sd[key]
    assert key in _untouched_on_failure(case, sd)


def test_unexpected_key_is_named():
    sd = random_reference_sd("mdt_s2")
    sd["blocks.12.attn.qkv.weight"] = torch.zeros(3)
    msg = _untouched_on_failure("mdt_s2", sd)
    assert "unexpected" in msg and "blocks.12.attn.qkv.weight" in msg


def test_mis_shaped_key_names_both_shapes():
    sd = random_reference_sd("mdt_s2")
    sd["y_embedder.embedding_table.weight"] = torch.zeros(11, 384, dtype=torch.float64)
    msg = _untouched_on_failure("mdt_s2", sd)
    assert "y_embedder.embedding_table.weight" in msg
    assert str((11, 384)) in msg and str((1001, 384)) in msg


def test_checkpoint_for_another_patch_size_is_rejected():
    msg = _untouched_on_failure("mdt_s2", random_reference_sd("mdt_s4"))  # both 4x4 grids, patch 4 vs 2
    assert "x_embedder.proj.weight" in msg and str((384, 4, 4, 4)) in msg and str((384, 4, 2, 2)) in msg


def test_wrong_relative_position_index_is_rejected():
    sd = random_reference_sd("mdt_s2")
    key = "blocks.3.attn.rel_pos_bias.relative_position_index"
    sd[key] = sd[key].t().contiguous()  # same shape, offsets negated
    assert key in _untouched_on_failure("mdt_s2", sd)


def test_module_prefixes_are_accepted():
    case = "mdtv2_s2"
    sd = random_reference_sd(case)
    changed = dict(sd, mask_token=sd["mask_token"] + 1.0)
    with scratch(case) as model:
        load_reference(model, {f"module.{k}": v for k, v in changed.items()})
        assert changed_tensors(case) == 1
        assert torch.equal(model.interp.mask_token, changed["mask_token"])


def test_wrong_layout_is_rejected():
    """A DiT checkpoint cannot fill an MDT model (no relative bias, side block, ...)."""
    msg = _untouched_on_failure("mdt_s2", random_reference_sd("dit_s2"))
    assert "missing keys" in msg and "blocks.0.attn.rel_pos_bias.relative_position_bias_table" in msg


# ---------------------------------------------------------------------------
# (d) layout and preset detection
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_detect_layout_and_infer_preset(case):
    preset, overrides, layout, decode_layer = CASES[case]
    sd = random_reference_sd(case)
    assert detect_layout(sd) == layout
    assert detect_layout({f"module.{k}": v for k, v in sd.items()}) == layout
    name, found = infer_preset(sd)
    assert name == preset
    expected = dict(dict(in_channels=4, learn_sigma=True, num_classes=1000), **overrides)
    if layout == "mdt_v2":
        expected["decode_layer"] = decode_layer
    assert found == expected


def test_inferred_preset_accepts_the_checkpoint():
    sd = random_reference_sd("mdt_s4")  # non-default num_classes and input size
    name, found = infer_preset({f"module.{k}": v for k, v in sd.items()})
    model = build_model(name, **found)
    load_reference(model, sd)
    assert torch.equal(model.y_embedder.embedding_table.weight, sd["y_embedder.embedding_table.weight"].float())


def test_detect_layout_rejects_other_state_dicts():
    with pytest.raises(ValueError):
        detect_layout({"encoder.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------
# (e) reading files
# ---------------------------------------------------------------------------
class NotATensor:
    """Pickled by reference to this module; a weights-only load must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _small_sd(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"pos_embed": torch.ones(1, 4, 8) * scale,
            "blocks.0.attn.qkv.weight": torch.arange(6.0).reshape(2, 3) * scale}


def _same(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_read_plain_pt(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_small_sd(), path)
    assert _same(read_state_dict(path), _small_sd())
    assert _same(read_state_dict(str(path)), _small_sd())


def test_read_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(_small_sd(), str(path))
    assert _same(read_state_dict(path), _small_sd())


def test_read_unwraps_training_checkpoints(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _small_sd(1.0), "ema": _small_sd(2.0), "opt": {"step": torch.tensor(3)}}, path)
    assert _same(read_state_dict(path), _small_sd(2.0))  # ema preferred
    assert _same(read_state_dict(path, key="model"), _small_sd(1.0))
    only_model = tmp_path / "model_only.pt"
    torch.save({"model": _small_sd(1.0), "args": {"lr": 1e-4}}, only_model)
    assert _same(read_state_dict(only_model), _small_sd(1.0))


def test_read_a_wrapped_reference_checkpoint(tmp_path):
    full = random_reference_sd("mdtv2_s2")
    keep = ("en_inblocks.0.", "de_blocks.0.")  # a slice keeps the file small
    sd = {k: v for k, v in full.items() if not k.startswith(("en_", "de_")) or k.startswith(keep)}
    path = tmp_path / "mdtv2.pt"
    torch.save({"ema": sd, "model": {k: v * 0 for k, v in sd.items()}, "args": {"lr": 1e-4}}, path)
    got = read_state_dict(path)
    assert _same(got, sd) and all(got[k].dtype == v.dtype for k, v in sd.items())
    assert detect_layout(got) == "mdt_v2"


def test_read_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "weights-only" in msg


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------
# composition: MDT without its MDT parts is DiT
# ---------------------------------------------------------------------------
def test_mdt_without_relbias_and_decoder_pos_is_dit():
    """With zero relative-bias tables and a zero decoder_pos_embed, an mdt_s2 full pass is dit_s2
    carrying the same shared weights, the MDT's pos_embed set to the DiT's fixed table."""
    x, t, y = inputs("mdt_s2", seed=5)
    with scratch("mdt_s2") as mdt, scratch("dit_s2") as dit, torch.no_grad():
        fixed = torch.from_numpy(sincos_2d(384, 4, 4)).unsqueeze(0)
        dit.pos_embed.weight.copy_(fixed)  # the DiT table is the fixed sin-cos table (the cached model is random)
        mdt_params = dict(mdt.named_parameters())
        for name, p in mdt.named_parameters():
            if name.endswith("relative_position_bias_table") or name == "interp.pos_embed.weight":
                p.zero_()
        shared = 0
        for name, p in dit.named_parameters():
            if name == "pos_embed.weight":
                mdt_params[name].copy_(p)
            else:
                p.copy_(mdt_params[name])
            shared += 1
        assert shared == len(list(dit.parameters())) and not dit.pos_embed.weight.requires_grad
        a, b = mdt(x, t, y), dit(x, t, y)
        assert b.abs().max() > 0.1
        assert max_diff(a, b) < TOL
