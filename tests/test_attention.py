"""The fast attention paths with a relative-position bias equal the reference (explicit) path.

Full pass (shared (H, N, N) bias) and masked pass (bias at each sample's kept tokens),
forward and gradients wrt q, k, v and the bias table, in float64 and float32 (< 1e-5
relative). FlexAttention has no CPU backward, so its CPU check is forward only; the GPU
checks of every path (bf16 included) run in ``mdtzoo bench attention`` before it times.
"""

from __future__ import annotations

import pytest
import torch

from mdtzoo.models import build_model
from mdtzoo.models.attention import IMPLS, attention, kept_bias
from mdtzoo.posenc.relbias import RelativePositionBias

GPU_ONLY = ("flex", "triton")  # no CPU backward (flex) or no CPU kernel (triton)
FAST = [i for i in IMPLS if i != "explicit" and i not in GPU_ONLY]
FLEX = [i for i in IMPLS if i.startswith("flex")]


def _case(dtype, grid=(4, 5), heads=3, batch=3, keep=11, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    bias = RelativePositionBias(grid, heads).to(dtype)
    with torch.no_grad():
        bias.relative_position_bias_table.normal_(0, 1.0, generator=g)  # large, so errors would show
    ids = torch.stack([torch.randperm(n, generator=g)[:keep] for _ in range(batch)])
    qkv = [torch.randn(batch, heads, n, dim, generator=g, dtype=dtype) for _ in range(3)]
    return bias, ids, qkv


def _run(impl, bias, ids, qkv, masked):
    q, k, v = (t[:, :, : ids.shape[1]] if masked else t for t in qkv)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    bias.zero_grad(set_to_none=True)
    out = attention(q, k, v, bias, ids if masked else None, impl=impl)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad, bias.relative_position_bias_table.grad]


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_fast_path_matches_reference(impl, masked, dtype, tol):
    bias, ids, qkv = _case(dtype)
    ref = _run("explicit", bias, ids, qkv, masked)
    got = _run(impl, bias, ids, qkv, masked)
    names = ["output", "dq", "dk", "dv", "d table"]
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape
        assert _rel_err(a, b) < tol, f"{impl} {name}: relative error {_rel_err(a, b):.2e}"
    # The 3 BEiT rows of the table are never indexed: their gradient is exactly zero.
    assert torch.count_nonzero(got[-1][-3:]) == 0


@pytest.mark.parametrize("impl", FLEX)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_flex_forward_matches_reference_on_cpu(impl, masked):
    bias, ids, qkv = _case(torch.float32)
    q, k, v = (t[:, :, : ids.shape[1]] if masked else t for t in qkv)
    with torch.no_grad():
        ref = attention(q, k, v, bias, ids if masked else None, impl="explicit")
        got = attention(q, k, v, bias, ids if masked else None, impl=impl)
    assert _rel_err(got, ref) < 1e-5


def test_kept_bias_values_and_collision_free_gradient():
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 4, 8], [4, 0, 2]])
    kept = kept_bias(full, ids)
    assert kept.shape == (2, 2, 3, 3)
    for b in range(2):
        torch.testing.assert_close(kept[b], full[:, ids[b]][:, :, ids[b]], rtol=0, atol=0)
    kept.sum().backward()
    # d full[h, i, j] = number of samples that kept both i and j: pairs of {0, 4} are kept twice.
    counts = torch.zeros(9, 9, dtype=torch.float64)
    for row in ids:
        counts[row[:, None], row[None, :]] += 1
    torch.testing.assert_close(full.grad, counts.expand(2, 9, 9), rtol=0, atol=0)
    assert counts[0, 4] == 2 and counts[4, 4] == 2 and counts[8, 2] == 0


@pytest.mark.parametrize("impl", FAST)
def test_model_paths_agree_end_to_end(impl):
    """A whole MDT (full and masked pass) gives the same loss gradients with every attention path."""
    torch.manual_seed(0)
    ref_model = build_model("mdt_xs2", input_size=8, num_classes=4).double()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.normal_(0, 0.05)
    fast = build_model("mdt_xs2", input_size=8, num_classes=4, attn_impl=impl).double()
    fast.load_state_dict(ref_model.state_dict())
    for blk in ref_model.all_blocks():
        blk.attn.impl = "explicit"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    mask = ref_model.sample_mask(2, generator=g)
    grads = []
    for model in (ref_model, fast):
        model.zero_grad()
        loss = model(x, t, y, drop_labels=False).square().mean() + model(x, t, y, mask=mask, drop_labels=False).square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    table_keys = [n for n in grads[0] if "relative_position_bias_table" in n]
    assert table_keys
    for name in grads[0]:
        assert _rel_err(grads[1][name], grads[0][name]) < 1e-10, name


def test_unknown_impl_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown attention impl 'flash3'.*'explicit'"):
        build_model("mdt_xs2", input_size=8, attn_impl="flash3")
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown attention impl 'flash3'"):  # also without a bias
        attention(q, q, q, impl="flash3")


def test_triton_on_the_cpu_says_where_it_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bias, ids, qkv = _case(torch.float32)
    with pytest.raises(ValueError, match="'triton' runs on a CUDA GPU.*'auto', 'sdpa', 'explicit'"):
        attention(*qkv, bias, impl="triton")


def test_bench_cli_offers_every_attention_impl():
    from mdtzoo.launch.bench_cmd import ATTN_IMPLS

    assert ATTN_IMPLS == IMPLS


@pytest.mark.parametrize("impl", FAST)
def test_blocks_trace_without_graph_breaks(impl):
    """torch.compile sees one graph per block call: full pass, masked pass, interpolator."""
    model = build_model("mdt_xs2", input_size=8, num_classes=4, attn_impl=impl)
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    ids = model.sample_mask(2).ids_keep
    for args in ((x, c), (x[:, : ids.shape[1]], c, None, ids)):
        explanation = torch._dynamo.explain(block._forward)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


TRITON_CHECK = """
import torch
from mdtzoo.models.attention import attention
from mdtzoo.posenc.relbias import RelativePositionBias
torch.manual_seed(0)
worst = 0.0


def rel(a, b):  # relative error; NaN counts as the worst (max() would skip it)
    e = ((a - b).norm() / b.norm()).item()
    return e if e == e else float("inf")


# head dim 24: one tile padded to 32; head dim 40: two tiles, 32 + 16 (as MDT-XL's 72 = 64 + 16);
# head dim 12: strides only 4-aligned (the kernels' AL = 4 instead of 8). dS's rows are padded
# (13 -> 16, 20 -> 24 columns) in every case.
for masked, dim in ((False, 24), (True, 24), (False, 40), (True, 40), (True, 12)):
    bias = RelativePositionBias((4, 5), 2)
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    ids = torch.stack([torch.randperm(20)[:13] for _ in range(2)])
    base = torch.randn(2, 20, 3, 2, dim)  # (B, N, qkv, H, d)
    res = []
    for impl, packed in (("explicit", False), ("triton", False), ("triton", True)):
        leaf = base.clone().requires_grad_(True)
        qkv = leaf[:, :13] if masked else leaf
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided (B, H, N, d) views, as Attention passes them
        bias.zero_grad()
        # packed: the kernel reads qkv itself and returns its gradient in one (B, N, 3, H, d) tensor
        out = attention(q, k, v, bias, ids if masked else None, impl=impl, qkv=qkv if packed else None)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        res.append([out, leaf.grad, bias.relative_position_bias_table.grad])
    worst = max([worst] + [rel(a, b) for r in res[1:] for a, b in zip(r, res[0])])
# The fake (meta) kernels must describe the real outputs, strides included, or torch.compile
# breaks: check them on a contiguous qkv and on a non-contiguous one (the masked pass's first 13
# tokens of 20), with dO in any strides.
qkv = torch.randn(2, 20, 3, 2, 24)
full = torch.randn(2, 20, 20)
offsets = torch.randn(2, 7, 9)  # the masked pass's bias by grid offset, (H, 2R - 1, 2C - 1) of the 4 x 5 grid
torch.library.opcheck(torch.ops.mdtzoo.relbias_flash_fwd_offsets.default, (qkv, full, None),
                      test_utils=("test_schema", "test_faketensor"))
pos = ids[:, :13].to(torch.int32).contiguous()
torch.library.opcheck(torch.ops.mdtzoo.relbias_flash_fwd_offsets.default, (qkv[:, :13], offsets, pos),
                      test_utils=("test_schema", "test_faketensor"))
o, lse = torch.ops.mdtzoo.relbias_flash_fwd_offsets(qkv[:, :13], offsets, pos)
for do in (torch.randn_like(o), torch.randn(o.shape[:1] + o.shape[:0:-1]).permute(0, 3, 2, 1)):  # dO any strides
    torch.library.opcheck(torch.ops.mdtzoo.relbias_flash_bwd_offsets.default, (qkv[:, :13], offsets, pos, o, lse, do),
                          test_utils=("test_schema", "test_faketensor"))
# The bias-gradient kernel (CUDA's reduce_kept_grad): each grid pair summed over the samples that
# kept it, equal to scattering sample by sample; and its fake kernel.
from mdtzoo.models.triton_attention import kept_grad
ids = torch.stack([torch.randperm(30)[:17] for _ in range(3)])
ds = torch.randn(3, 2, 17, 17)
ref = torch.zeros(2, 30, 30)
for b in range(3):
    ref[:, ids[b][:, None], ids[b][None, :]] += ds[b]
worst = max(worst, rel(kept_grad(ds, ids, 30), ref))  # 3 chunks of one sample
from mdtzoo.models.triton_attention import CONFIG
CONFIG["grad_programs"], programs = 2, CONFIG["grad_programs"]
worst = max(worst, rel(kept_grad(ds, ids, 30), ref))  # one chunk of all three
CONFIG["grad_programs"] = programs
padded = torch.cat([ds, torch.full((3, 2, 17, 7), float("nan"))], -1)  # the backward's dS: rows padded to 24
worst = max(worst, rel(kept_grad(padded, ids, 30), ref))  # the padding never read
torch.library.opcheck(kept_grad, (ds, ids, 30), test_utils=("test_schema", "test_faketensor"))
# The full pass's bias gradient summed over the batch by our kernel (CONFIG["sum_kernel"]): padding
# never read; 11 samples against 8 a step (a short last step); a width of 20 against a tile of 32.
from mdtzoo.models.triton_attention import batch_sum
ds = torch.randn(11, 2, 20, 20)
padded = torch.cat([ds, torch.full((11, 2, 20, 4), float("nan"))], -1)
worst = max(worst, rel(batch_sum(padded, 20), ds.sum(0)))
torch.library.opcheck(batch_sum, (padded, 20), test_utils=("test_schema", "test_faketensor"))
print("WORST", worst)
"""


def test_triton_kernel_matches_reference_in_the_interpreter(triton_interpreter):
    """The Triton kernel (forward, dq/dk/dv and the bias-table gradient) run by Triton's CPU
    interpreter equals the explicit path in float32; the GPU run is checked by bench attention."""
    worst = float(triton_interpreter(TRITON_CHECK).split("WORST")[-1])
    assert worst < 1e-5


def test_auto_takes_triton_to_train_and_flex_to_sample_on_cuda_only():
    from mdtzoo.models.attention import auto_impl

    assert auto_impl(True, torch.bfloat16, training=True, triton=True) == "triton"
    assert auto_impl(True, torch.bfloat16, training=False, triton=True) == "flex"  # sampling
    assert auto_impl(True, torch.float32, training=True, triton=False) == "flex"  # no triton installed
    assert auto_impl(True, torch.float64, training=True, triton=True) == "auto"  # explicit maths
    assert auto_impl(False, torch.float32, training=True, triton=True) == "auto"  # CPU: explicit maths


def test_triton_head_tiles_pad_less_than_one_power_of_two_tile():
    pytest.importorskip("triton")
    from mdtzoo.models.triton_attention import head_blocks

    assert head_blocks(72) == (64, 16)  # MDT-XL: 80 columns of work, not 128
    assert head_blocks(72, split=False) == (128, 0)
    assert head_blocks(64) == (64, 0) and head_blocks(8) == (16, 0) and head_blocks(24) == (32, 0)
    assert head_blocks(40) == (32, 16) and head_blocks(96) == (64, 32) and head_blocks(100) == (128, 0)
    for d in range(1, 300):
        first, second = head_blocks(d)
        assert first + second >= d and first >= 16 and (second == 0 or second >= 16)
        assert first & (first - 1) == 0 and second & (second - 1) == 0  # powers of two (or 0)
        assert first + second <= max(16, 1 << (d - 1).bit_length())  # never more work than one tile


def test_a_relative_encoding_with_only_forward_uses_the_explicit_maths():
    """A user's relative encoding that only implements forward(ids_keep) still works (any impl)."""
    bias, ids, qkv = _case(torch.float64)

    class OnlyForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids_keep=None):
            return self.inner.table_gather(ids_keep)

    user = OnlyForward(bias)
    q, k, v = (t[:, :, : ids.shape[1]] for t in qkv)
    ref = attention(q, k, v, bias, ids, impl="explicit")
    for impl in FAST:
        torch.testing.assert_close(attention(q, k, v, user, ids, impl=impl), ref, rtol=1e-12, atol=1e-12)


def test_bench_cli_offers_every_compile_mode():
    from mdtzoo.launch.bench_cmd import COMPILE_MODES
    from mdtzoo.training import objective

    assert COMPILE_MODES == objective.COMPILE_MODES
    from mdtzoo.launch.bench_cmd import COMPILE_SCOPES
    from mdtzoo.models import transformer

    assert COMPILE_SCOPES == transformer.COMPILE_SCOPES


def test_unknown_compile_mode_names_the_valid_ones():
    from mdtzoo.training.objective import compile_mode, uses_cudagraphs

    assert compile_mode(True) == "default" and compile_mode(False) is None
    assert uses_cudagraphs("reduce-overhead") and not uses_cudagraphs(True)
    with pytest.raises(ValueError, match="reduce-overhead.*got 'fastest'"):
        compile_mode("fastest")


def test_flex_on_the_cpu_trains_through_the_explicit_maths():
    """FlexAttention has no CPU backward: a CPU run bound to attn_impl='flex' (as the small grid's
    mdt.gin is, for its GPU runs) still trains, with the reference's gradients."""
    bias, ids, qkv = _case(torch.float64)
    grads = []
    for impl in ("explicit", "flex"):
        q, k, v = (t[:, :, : ids.shape[1]].clone().requires_grad_(True) for t in qkv)
        bias.zero_grad()
        attention(q, k, v, bias, ids, impl=impl).square().sum().backward()
        grads.append([q.grad, k.grad, v.grad, bias.relative_position_bias_table.grad])
    for a, b in zip(*grads):
        assert _rel_err(a, b) < 1e-10


def test_materialized_is_an_opaque_contiguous_copy_with_a_pass_through_gradient():
    """The bias handed to FlexAttention is computed into its own contiguous buffer (torch.compile
    cannot fold the table gather into the kernel's score_mod); values and gradient unchanged."""
    from mdtzoo.models.attention import materialized

    table = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (4, 4))
    full = table[index].permute(2, 0, 1)  # (H, N, N) view with the head stride 1, as full() gives
    out = materialized(full)
    assert out.is_contiguous() and not full.is_contiguous() and torch.equal(out, full)
    weights = torch.randn(3, 4, 4, dtype=torch.float64)
    (out * weights).sum().backward()
    expected = torch.zeros(7, 3, dtype=torch.float64).index_put_((index.reshape(-1),),
                                                                 weights.permute(1, 2, 0).reshape(16, 3), accumulate=True)
    torch.testing.assert_close(table.grad, expected, rtol=0, atol=1e-12)
    torch.library.opcheck(materialized, (full.detach(),))
    with torch.no_grad():  # compiled (the sampler's path): still one graph, same numbers as the explicit maths
        model = build_model("mdt_xs2", input_size=8, num_classes=4, attn_impl="flex").eval()
        block = model.blocks[0]
        x, c = torch.randn(2, 16, 128), torch.randn(2, 128)
        explanation = torch._dynamo.explain(block._forward)(x, c)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        got = torch.compile(block, dynamic=False)(x, c)
        block.attn.impl = "explicit"
        torch.testing.assert_close(got, block(x, c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 1), (4, 5), (16, 16), (3, 1)])
def test_offsets_hold_the_full_bias_at_every_grid_offset(grid):
    """RelativePositionBias.offsets()[h, dr + R - 1, dc + C - 1] is full()[h, p, p'] for every pair at
    grid offset (dr, dc) = p - p' (what the Triton kernel's masked pass reads), and its gradient
    reaches the table's rows as full()'s does."""
    rows, cols = grid
    bias = RelativePositionBias(grid, 3)
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    off, full = bias.offsets(), bias.full()
    assert off.shape == (3, 2 * rows - 1, 2 * cols - 1)
    r, c = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
    dr = (r[:, None] - r[None, :] + rows - 1).flatten()
    dc = (c[:, None] - c[None, :] + cols - 1).flatten()
    assert torch.equal(off[:, dr, dc].reshape(full.shape), full)
    w = torch.randn(full.shape)
    g_full, = torch.autograd.grad((full * w).sum(), bias.relative_position_bias_table)
    g_off, = torch.autograd.grad((off[:, dr, dc].reshape(full.shape) * w).sum(), bias.relative_position_bias_table)
    torch.testing.assert_close(g_off, g_full)


def test_triton_masked_pass_needs_a_bias_by_grid_offset(monkeypatch):
    """A bias module with full() but no offsets(): 'auto' takes another path for its masked pass,
    'triton' refuses it naming what is missing and what to use."""
    import mdtzoo.models.attention as att

    class FullOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = RelativePositionBias((2, 2), 1)

        def full(self):
            return self.inner.full()

    monkeypatch.setattr(att, "_triton_available", lambda: True)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="FullOnly has no offsets\\(\\).*'flex' or 'explicit'"):
        attention(q, q, q, FullOnly(), torch.tensor([[0, 3]]), impl="triton")
    offered = []  # what 'auto' is told of the Triton kernel, for the full and the masked pass
    monkeypatch.setattr(att, "auto_impl", lambda cuda, dtype, training, triton: offered.append(triton) or "sdpa")
    for module in (FullOnly(), RelativePositionBias((2, 2), 1)):
        for x, ids in ((torch.randn(1, 1, 4, 8), None), (q, torch.tensor([[0, 3]]))):  # full pass, masked pass
            attention(x, x, x, module, ids, impl="auto")
    assert offered == [False] * 4  # on the CPU never
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    offered.clear()
    for module in (FullOnly(), RelativePositionBias((2, 2), 1)):
        for x, ids in ((torch.randn(1, 1, 4, 8), None), (q, torch.tensor([[0, 3]]))):  # full pass, masked pass
            attention(x, x, x, module, ids, impl="auto")
    assert offered == [True, False, True, True]  # FullOnly's masked pass: not our kernel


@pytest.mark.parametrize("shape", [None, (2, 7, 9, 1), (3, 7, 9), (2, 8, 9), (2, 7, 10)])
def test_triton_masked_pass_refuses_an_offset_table_of_the_wrong_shape(shape):
    """triton_attention_qkv's masked pass names the offset table's expected shape (H, 2R - 1, 2C - 1)
    before any kernel runs (wrong heads, even sides, wrong rank, none)."""
    pytest.importorskip("triton")
    from mdtzoo.models.triton_attention import triton_attention_qkv

    qkv = torch.randn(2, 13, 3, 2, 8)
    offsets = None if shape is None else torch.zeros(shape)
    with pytest.raises(ValueError, match=r"offsets must be \(H=2, 2R - 1, 2C - 1\)"):
        triton_attention_qkv(qkv, torch.zeros(2, 20, 20), torch.zeros(2, 13, dtype=torch.long), offsets)


@pytest.mark.parametrize("grid, ids", [((3, 3), (2, 13)), ((4, 5), (2, 12)), ((4, 5), (1, 13))])
def test_triton_masked_pass_refuses_kept_tokens_that_do_not_fit_the_grid(grid, ids):
    """More kept tokens than the offsets' grid has cells, or ids_keep not (B, N): a message, not a
    kernel reading outside the table."""
    pytest.importorskip("triton")
    from mdtzoo.models.triton_attention import triton_attention_qkv

    qkv = torch.randn(2, 13, 3, 2, 8)
    offsets = torch.zeros(2, 2 * grid[0] - 1, 2 * grid[1] - 1)
    with pytest.raises(ValueError, match=r"ids_keep \(\d+, \d+\) must be \(B, N\) = \(2, 13\), N at most"):
        triton_attention_qkv(qkv, torch.zeros(2, 20, 20), torch.zeros(ids, dtype=torch.long), offsets)
