"""Models: parameter counts, init, the masked pass, the side-interpolator, options and errors."""

import gin
import pytest
import torch

from mdtzoo.interp import Interpolator, scatter_back
from mdtzoo.masking import from_mask, from_shuffle
from mdtzoo.models import build_model, count_parameters
from mdtzoo.models.blocks import Block
from mdtzoo.registry import MODELS

# SPEC section 2: published parameter counts (exact for DiT, in M to 3 decimals for MDT).
DIT_COUNTS = {"dit_s2": 32_963_360, "dit_b2": 130_512_416, "dit_l2": 458_102_816, "dit_xl2": 675_129_632}
MDT_COUNTS_M = {
    "mdt_s2": 35.797, "mdt_b2": 141.489, "mdt_l2": 477.641, "mdt_xl2": 699.778,
    "mdt_s4": 35.648, "mdt_s8": 35.819, "mdt_b4": 141.189, "mdt_b8": 141.531,
    "mdt_l4": 477.101, "mdt_l8": 477.523, "mdt_xl4": 699.160, "mdt_xl8": 699.632,
    "mdtv2_xl2": 742.264,
}
INFERENCE_COUNTS_M = {"mdt_xl2": 675.856, "mdtv2_xl2": 718.342}


def meta(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


@pytest.mark.parametrize("name,count", DIT_COUNTS.items())
def test_dit_parameter_counts_equal_the_published_ones(name, count):
    assert count_parameters(meta(name)) == count


@pytest.mark.parametrize("name,millions", MDT_COUNTS_M.items())
def test_mdt_parameter_counts_equal_the_published_ones(name, millions):
    assert round(count_parameters(meta(name)) / 1e6, 3) == millions


@pytest.mark.parametrize("name,millions", INFERENCE_COUNTS_M.items())
def test_inference_path_counts(name, millions):
    assert round(count_parameters(meta(name), inference=True) / 1e6, 3) == millions


@pytest.mark.parametrize("name", MODELS.names())
def test_every_preset_builds_with_its_documented_size(name):
    model = meta(name)
    depth, width, heads = {"xs": (6, 128, 4), "s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}[
        name.split("_")[1][:-1]
    ]
    assert len(model.blocks) == depth and model.hidden_size == width and model.num_heads == heads
    assert model.patch_size == int(name[-1])


SMALL = [n for n in MODELS.names() if n.split("_")[1].startswith("s")]


def randomise(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize("name", SMALL)
def test_output_is_exactly_zero_at_init(name):
    model = build_model(name, input_size=16)
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    assert torch.count_nonzero(out) == 0
    if model.interp is not None:
        assert torch.count_nonzero(model(x, t, y, mask=True)) == 0


@pytest.mark.parametrize("name", ["mdt_s2", "mdtv2_s2"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_masked_pass_with_nothing_removed_equals_the_full_pass(name, symmetric):
    model = randomise(build_model(name, input_size=8, symmetric=symmetric)).eval()
    x, t, y = inputs(model)
    full = model(x, t, y)
    none_removed = model(x, t, y, mask=torch.zeros(3, model.num_tokens))
    torch.testing.assert_close(none_removed, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mdt_s2", "mdtv2_s2", "mdt_s4"])
def test_explicit_mask_is_honoured_in_train_and_eval_mode(name):
    model = randomise(build_model(name, input_size=8, class_dropout_prob=0.0))
    x, t, y = inputs(model)
    n = model.num_tokens
    mask = torch.zeros(3, n)
    mask[0, : n // 4], mask[1, 1 : 1 + n // 4], mask[2, -(n // 4) :] = 1, 1, 1
    train_out = model.train()(x, t, y, mask=mask)
    eval_out = model.eval()(x, t, y, mask=mask)
    assert torch.equal(train_out, eval_out)
    assert not torch.allclose(eval_out, model(x, t, y))  # the mask changed the computation


def test_masked_pass_does_not_depend_on_the_order_of_kept_tokens():
    model = randomise(build_model("mdt_s2", input_size=8)).eval().double()
    x, t, y = inputs(model)
    x = x.double()
    mask = from_mask((torch.rand(3, 16, generator=torch.Generator().manual_seed(1)).argsort(1) < 6).double())
    perm = torch.randperm(mask.num_keep, generator=torch.Generator().manual_seed(2))
    shuffled = torch.cat([mask.ids_keep[:, perm], mask.ids_removed], dim=1)
    a = model(x, t, y, mask=mask)
    b = model(x, t, y, mask=from_shuffle(shuffled, mask.num_keep))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_masked_pass_depends_only_on_kept_inputs_in_the_encoder():
    # Asymmetric MDT v1: removed tokens' inputs never reach the output (the decoder sees mask tokens).
    model = randomise(build_model("mdt_s2", input_size=8)).eval()
    x, t, y = inputs(model)
    mask = torch.zeros(3, 16)
    mask[:, 4:8] = 1  # remove grid row 1 (2x2 patches on an 8x8 input -> 4x4 tokens)
    x2 = x.clone()
    x2[:, :, 2:4, :] += 10.0  # perturb exactly the removed row's pixels
    torch.testing.assert_close(model(x, t, y, mask=mask), model(x2, t, y, mask=mask), rtol=0, atol=1e-5)
    # MDT v2's dense input skip carries the removed tokens' inputs to the decoder.
    v2 = randomise(build_model("mdtv2_s2", input_size=8)).eval()
    assert not torch.allclose(v2(x, t, y, mask=mask), v2(x2, t, y, mask=mask), atol=1e-3)


def make_interp(shortcut, num_blocks=1, dim=16, heads=2, grid=(3, 3)):
    def make_block():
        return Block(dim, heads)

    interp = Interpolator(make_block, dim, grid, num_blocks=num_blocks, shortcut=shortcut)
    return randomise(interp, std=0.2).double()


@pytest.mark.parametrize("shortcut", [True, False])
def test_masked_shortcut(shortcut):
    interp = make_interp(shortcut)
    g = torch.Generator().manual_seed(0)
    mask_out = from_mask(torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1, 0]]).double())
    kept = torch.randn(2, 5, 16, generator=g).double()
    c = torch.randn(2, 16, generator=g).double()
    out = interp(kept, c, mask_out)
    q = scatter_back(kept, mask_out, interp.mask_token.reshape(-1)) + interp.pos_embed()
    block_out = interp.blocks[0](q, c)
    removed = mask_out.mask.bool()
    if shortcut:
        assert torch.equal(out[~removed], q[~removed])  # kept places keep q exactly
        assert torch.equal(out[removed], block_out[removed])  # removed places take the prediction
    else:
        assert torch.equal(out, block_out)
    assert not torch.allclose(block_out[~removed], q[~removed])  # the block does change tokens


def test_side_interpolator_trains_only_in_the_masked_pass():
    model = randomise(build_model("mdt_s2", input_size=8))
    x, t, y = inputs(model)
    model(x, t, y).square().mean().backward()
    assert model.interp.mask_token.grad is None
    assert all(p.grad is None for p in model.interp.blocks.parameters())
    assert model.interp.pos_embed.weight.grad.abs().sum() > 0  # decoder_pos_embed is on the full path
    model.zero_grad(set_to_none=True)
    model(x, t, y, mask=True, generator=torch.Generator().manual_seed(0)).square().mean().backward()
    assert model.interp.mask_token.grad.abs().sum() > 0
    assert model.interp.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [0, 1, 6, 12])
def test_side_interpolator_position(k):
    model = randomise(build_model("mdt_s2", input_size=8, decode_layer=k))
    assert model.num_encoder_blocks == 12 - k
    x, t, y = inputs(model)
    assert model(x, t, y, mask=True).shape == (3, 8, 8, 8)


def test_mdtv2_wiring():
    model = build_model("mdtv2_s2", input_size=8)
    assert model.decode_layer == 6 and model.num_skip_pairs == 3
    has_skip = [b.skip_linear is not None for b in model.blocks]
    assert has_skip == [False] * 3 + [True] * 3 + [True] * 6
    assert model.masking.ratio == 0.3 and model.masking.span == 0.2
    assert meta("mdtv2_xl2").decode_layer == 4  # the released XL/2 checkpoint's setting


def test_dit_has_no_masked_pass():
    model = build_model("dit_s2", input_size=8)
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="side-interpolator"):
        model(x, t, y, mask=torch.zeros(3, 16))


def test_relative_bias_is_taken_at_kept_tokens():
    model = randomise(build_model("mdt_s2", input_size=8))
    bias = model.blocks[0].attn.rel_pos_bias
    full = bias()  # (H, N, N)
    ids = torch.tensor([[0, 5, 15], [3, 2, 9]])
    kept = bias(ids)  # (B, H, K, K)
    for b in range(2):
        torch.testing.assert_close(kept[b], full[:, ids[b]][:, :, ids[b]], rtol=0, atol=0)


def test_input_shape_errors_name_both_sides():
    model = build_model("mdt_s2", input_size=8)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(2, 16\)"):
        model(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
              mask=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        build_model("mdt_s4", input_size=10)
    with pytest.raises(TypeError, match="valid options"):
        build_model("mdt_s2", decode_layr=3)
    with pytest.raises(TypeError, match="define the preset"):
        build_model("mdt_s2", depth=3)
    with pytest.raises(ValueError, match="absolute slot"):
        build_model("mdt_s2", pos_embed="relbias")


def test_ablation_options_change_the_structure():
    base = count_parameters(meta("mdt_s2"))
    block = count_parameters(meta("mdt_s2")) - count_parameters(meta("mdt_s2", interp="none"))
    assert block > 2_600_000  # one S block
    assert count_parameters(meta("mdt_s2", rel_pos="none")) == base - 13 * (31 * 31 + 3) * 6
    sym = meta("mdt_s2", symmetric=True)
    assert count_parameters(sym) == base + 384  # the encoder's input mask token
    gin.parse_config("interp.side.num_blocks = 3")  # Table 5f, through gin
    assert count_parameters(meta("mdt_s2")) == base + 2 * block


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 6), (2, 1), (16, 16)])
def test_relbias_table_gradient_by_offset_sums_equals_the_scatter_add(grid):
    """full()'s backward sums the gradient per grid offset with skewed sums (no scatter): equal to
    autograd's scatter-add into the table, unused rows zero, on square and rectangular grids."""
    from mdtzoo.posenc.relbias import UNUSED_ROWS, RelativePositionBias

    torch.manual_seed(0)
    bias = RelativePositionBias(grid, 3).double()
    n = grid[0] * grid[1]
    upstream = torch.randn(3, n, n, dtype=torch.float64)
    full = bias.full()
    table, index = bias.relative_position_bias_table, bias.relative_position_index
    assert torch.equal(full, table[index].permute(2, 0, 1))
    full.backward(upstream)
    expected = torch.zeros_like(table).index_put_((index.reshape(-1),), upstream.permute(1, 2, 0).reshape(n * n, 3),
                                                  accumulate=True)
    torch.testing.assert_close(table.grad, expected, rtol=1e-12, atol=1e-12)
    assert not table.grad[-UNUSED_ROWS:].any()
    if n <= 6:  # small enough for a numerical gradient check of the custom backward
        from mdtzoo.posenc.relbias import _FullBias

        leaf = table.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: _FullBias.apply(t, index, grid), (leaf,))


OFFSETS_CHECK = r'''
import torch
from mdtzoo.posenc.relbias import UNUSED_ROWS, relative_position_index
from mdtzoo.posenc.triton_offsets import offset_sums_kernel

worst = 0.0
for rows, cols, heads in ((4, 4, 3), (3, 5, 2), (16, 16, 6), (1, 7, 1), (9, 2, 5)):
    n = rows * cols
    index = relative_position_index(rows, cols)
    num_rows = (2 * rows - 1) * (2 * cols - 1) + UNUSED_ROWS
    upstream = torch.randn(n, n, heads, dtype=torch.float64).permute(2, 0, 1)  # a strided (H, N, N) view
    expected = torch.zeros(num_rows, heads, dtype=torch.float64).index_put_(
        (index.reshape(-1),), upstream.permute(1, 2, 0).reshape(-1, heads), accumulate=True)
    got = offset_sums_kernel(upstream.float(), rows, cols, num_rows)
    assert got.shape == (num_rows, heads) and got.dtype == torch.float32
    assert not got[-UNUSED_ROWS:].any()
    worst = max(worst, float((got.double() - expected).abs().max() / expected.abs().max()))
print("WORST", worst)
'''


def test_triton_table_gradient_kernel_equals_the_scatter_add_in_the_interpreter(triton_interpreter):
    """The CUDA path of full()'s backward (posenc.triton_offsets, one program per table row), run by
    Triton's CPU interpreter on strided gradients: equal to the float64 scatter-add, float32 < 1e-6."""
    assert float(triton_interpreter(OFFSETS_CHECK).split("WORST")[-1]) < 1e-6


def test_compiled_block_gradients_equal_eager_including_the_bias_table():
    """torch.compile of a block (full and masked pass, forward + backward) gives eager's gradients,
    the relative-position table's (offset_sums inside AOTAutograd) included."""
    import copy

    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, num_classes=4)
    block = model.blocks[0]
    with torch.no_grad():  # away from adaLN-Zero's init, so every parameter gets a gradient
        for p in block.parameters():
            p.normal_(0, 0.05)
    x, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    ids = model.sample_mask(2).ids_keep
    grads = []
    for compiled in (False, True):
        b = copy.deepcopy(block)
        f = torch.compile(b._forward, dynamic=False) if compiled else b._forward
        (f(x, c).square().sum() + f(x[:, : ids.shape[1]], c, None, ids).square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in b.named_parameters()})
    table = "attn.rel_pos_bias.relative_position_bias_table"
    assert grads[0][table].abs().max() > 0.1
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_pieces_around_the_blocks_trace_without_graph_breaks():
    """``compile_blocks`` also compiles the timestep embedder and the final layer: one graph each."""
    import torch._dynamo

    model = build_model("mdt_xs2", input_size=8, num_classes=4)
    h, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    for fn, args in ((model.t_embedder.forward, (torch.tensor([3, 999]),)), (model.final_layer.forward, (h, c))):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("overrides", [{}, {"dense_skips": True}, {"symmetric": True}], ids=["plain", "dense", "symmetric"])
def test_compiled_input_embedding_and_interpolator_pieces_match_eager(overrides):
    """``compile_blocks`` compiles the input embedding (patches, positions, the kept tokens' gather)
    and the interpolator's scatter-back and masked shortcut with inductor. Only their regions are
    compiled here (the blocks' own compiled kernels are covered above): full and masked pass give
    eager's outputs bit for bit (exact elementwise maths), and every gradient to float32 rounding (the
    batch sums of the positions' and mask tokens' gradients may add in another order). Each piece
    traces in one graph."""
    import copy

    import torch._dynamo

    from mdtzoo.interp.side import _GLUE as INTERP_GLUE
    from mdtzoo.models.transformer import _GLUE

    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, num_classes=4, **overrides)
    with torch.no_grad():  # away from adaLN-Zero's init, so every parameter gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 700, 20]), torch.tensor([1, 3, 0])
    mask = model.sample_mask(3, generator=torch.Generator().manual_seed(1))
    runs = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        if compiled:
            m._regions.update({name: torch.compile(fn, dynamic=False) for name, fn in _GLUE.items()})
            m.interp.compile_glue()
            assert m.interp._glue["fill"] is not INTERP_GLUE["fill"]
        outs = [m(x, t, y, drop_labels=False), m(x, t, y, mask, drop_labels=False)]
        (outs[0].square().sum() + outs[1].square().sum()).backward()
        runs.append((outs, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (eager_outs, eager_grads), (outs, grads) = runs
    for a, b in zip(outs, eager_outs):
        assert torch.equal(a, b)
    assert grads.keys() == eager_grads.keys() and "pos_embed.weight" in grads
    for name, g in eager_grads.items():
        assert (grads[name] - g).norm() <= 1e-5 * g.norm(), name
    out = mask.in_grid_order()
    removed = out.mask if model.symmetric else None
    keep = None if model.symmetric else out.ids_keep
    h = torch.randn(3, 16 if model.symmetric else out.num_keep, 128)
    for fn, args in ((_GLUE["embed"], (model, x, None, None)), (_GLUE["embed"], (model, x, removed, keep)),
                     (INTERP_GLUE["fill"], (model.interp, h, None if model.symmetric else out.ids_restore)),
                     (INTERP_GLUE["shortcut"], (torch.randn(3, 16, 128), torch.randn(3, 16, 128), out.mask))):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("overrides", [{}, {"long_skips": True, "dense_skips": True}], ids=["plain", "skips"])
def test_compile_scopes_give_eager_outputs_and_gradients_and_copies_run_their_own_weights(overrides, monkeypatch):
    """``compile_blocks(scope=...)``: each block a region, or the encoder's and decoder's stacks as
    regions (skips included); full and masked pass, forward and every gradient equal eager's. The
    stacks trace without graph breaks, and a copy (as EMA makes) runs its own weights. The regions
    run through dynamo and AOTAutograd without inductor's code generation (``aot_eager``), which
    would take minutes on a CPU; the compiled block's kernels are covered above."""
    import copy
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    from mdtzoo.interp.side import _GLUE as INTERP_GLUE
    from mdtzoo.models.transformer import _GLUE, COMPILE_SCOPES, _STACKS

    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, num_classes=4, **overrides)
    with torch.no_grad():  # away from adaLN-Zero's init, so every parameter gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 3])
    mask = model.sample_mask(2, generator=torch.Generator().manual_seed(1))
    runs = {}
    for scope in (None, *COMPILE_SCOPES):
        m = copy.deepcopy(model)
        if scope is not None:
            m.compile_blocks(scope=scope)
        outs = [m(x, t, y, drop_labels=False), m(x, t, y, mask, drop_labels=False)]
        (outs[0].square().sum() + outs[1].square().sum()).backward()
        runs[scope] = (outs, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, m)
    (eager_outs, eager_grads, _) = runs[None]
    for scope in COMPILE_SCOPES:
        outs, grads, _ = runs[scope]
        for a, b in zip(outs, eager_outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert grads.keys() == eager_grads.keys()
        for name, g in eager_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"{scope}: {name}")
    stacked = runs["stacks"][2]
    assert stacked._regions["encode"] is not _STACKS["encode"]  # compiled, not the eager loop
    for scope in COMPILE_SCOPES:  # the input embedding and the interpolator's pieces compiled at either scope
        compiled = runs[scope][2]
        assert compiled._regions["embed"] is not _GLUE["embed"]
        assert all(compiled.interp._glue[name] is not fn for name, fn in INTERP_GLUE.items())
    copy_ = copy.deepcopy(stacked)
    with torch.no_grad():
        copy_.blocks[0].mlp.fc1.weight.zero_()
    assert not torch.allclose(copy_(x, t, y, drop_labels=False), stacked(x, t, y, drop_labels=False))
    h, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    for name, args in (("encode", (h, c, None)), ("encode", (h[:, :11], c, mask.in_grid_order().ids_keep)),
                       ("decode", (h, c, h if overrides else None))):
        explanation = torch._dynamo.explain(_STACKS[name])(model, *args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    with pytest.raises(ValueError, match="unknown compile scope 'model'; valid: blocks, stacks"):
        model.compile_blocks(scope="model")
