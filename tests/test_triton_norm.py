"""The fused gated-residual + LayerNorm + modulate kernels (models/triton_norm.py) against the block's
own maths, forward and every gradient, in Triton's CPU interpreter; the block's switch between them."""

import pytest
import torch
from conftest import block_switch_error

CHECK = """
import torch
from mdtzoo.bench import check_norm
from mdtzoo.models import triton_norm as tn
torch.manual_seed(0)

# bench.check_norm runs both ops as Block chains them (LayerNorm 1 with x forked into the residual,
# then the gated residual and LayerNorm 2) against the block's maths, float32 and bf16 inputs, and
# returns the worst relative errors of h1, x1, h and the gradients of x, a and the adaLN vector.
# D 40: a row tile of 64 with 24 columns masked; N 13 with chunks of 4 rows: a short last chunk, and
# rows odd against ROWS 2; D 64: no masking, one row per program; one sample with one chunk, 4 rows
# per program against 5 rows.
worst = {"float32": 0.0, "bfloat16": 0.0}
for (b, n, d, chunk, rows) in ((3, 13, 40, 4, 2), (2, 16, 64, 16, 1), (1, 5, 24, 16, 4)):
    tn.CONFIG.update(bwd_chunk=chunk, bwd_rows=rows, fwd_rows=rows)
    for key, err in check_norm(d, batch=b, tokens=n, device="cpu").items():
        worst[key] = max(worst[key], err)
# the ops' fake kernels describe the real outputs (strided adaLN chunks, bf16 with a float32 stream)
six = torch.randn(2, 6 * 40).bfloat16()
_, _, gate, shift, scale, _ = six.chunk(6, dim=1)
x, a = torch.randn(2, 7, 40), torch.randn(2, 7, 40).bfloat16()
torch.library.opcheck(torch.ops.mdtzoo.gated_residual_norm.default, (x, a, gate, shift, scale, 1e-6),
                      test_utils=("test_schema", "test_faketensor"))
x1, h, mean, rstd = tn._norm_fwd(x, a, gate, shift, scale, 1e-6)
torch.library.opcheck(torch.ops.mdtzoo.gated_residual_norm_bwd.default,
                      (x, a, gate, scale, mean, rstd, torch.randn_like(h), torch.randn_like(x1)),
                      test_utils=("test_schema", "test_faketensor"))
h, mean, rstd = tn._ln_fwd(x, shift, scale, 1e-6)
torch.library.opcheck(torch.ops.mdtzoo.norm_modulate.default, (x, shift, scale, 1e-6),
                      test_utils=("test_schema", "test_faketensor"))
torch.library.opcheck(torch.ops.mdtzoo.norm_modulate_bwd.default,
                      (x, scale, mean, rstd, torch.randn_like(h), torch.randn_like(x)),
                      test_utils=("test_schema", "test_faketensor"))
print("WORST", worst["float32"], worst["bfloat16"])
"""


def test_fused_norm_kernels_match_the_block_maths_forward_and_gradients(triton_interpreter):
    out = triton_interpreter(CHECK).split("WORST")[-1].split()
    f32, bf16 = float(out[0]), float(out[1])
    assert f32 < 1e-5, f32  # same maths, another summation order
    assert bf16 < 1e-2, bf16  # a, gate, shift, scale and h in bf16 (the float32 stream kept)


def test_gated_residual_norm_is_the_reference_off_cuda(monkeypatch):
    from mdtzoo.models import triton_norm as tn

    x, a = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    gate, shift, scale = torch.randn(3, 2, 8).unbind(0)
    x1, h = tn.gated_residual_norm(x, a, gate, shift, scale)
    assert not tn.usable(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter would run them, but never for float64
    assert tn.usable(x, a) and not tn.usable(x.double(), a.double()) and not tn.usable(torch.zeros(1, 1, 9000))
    torch.testing.assert_close(x1, x + gate[:, None] * a)
    xn = (x1 - x1.mean(-1, keepdim=True)) / (x1.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(h, xn * (1 + scale[:, None]) + shift[:, None], rtol=1e-5, atol=1e-5)


def test_block_norm_impl_on_the_cpu_is_the_torch_maths_and_unknown_names_are_refused():
    from mdtzoo.models.blocks import Block

    torch.manual_seed(0)
    ref = Block(16, 2)
    block = Block(16, 2, norm_impl="triton")
    block.load_state_dict(ref.state_dict())  # the option changes no parameters
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.load_state_dict(ref.state_dict())
    x, c = torch.randn(2, 4, 16), torch.randn(2, 16)
    torch.testing.assert_close(block(x, c), ref(x, c))  # no GPU, no interpreter: the torch maths
    with pytest.raises(ValueError, match="unknown norm_impl 'fast'; valid: 'torch', 'triton'"):
        Block(16, 2, norm_impl="fast")


def test_block_with_triton_norm_matches_torch_norm_in_the_interpreter(triton_interpreter):
    assert block_switch_error(triton_interpreter, "norm_impl", "triton_norm") < 1e-5


def test_bench_cli_offers_every_norm_impl_and_the_model_refuses_unknown_ones():
    from mdtzoo.launch.bench_cmd import NORM_IMPLS
    from mdtzoo.models import build_model
    from mdtzoo.models.blocks import NORM_IMPLS as impls

    assert NORM_IMPLS == impls
    assert all(b.norm_impl == "triton" for b in build_model("mdt_xs2", norm_impl="triton").all_blocks())
    with pytest.raises(ValueError, match="unknown norm_impl 'fused'; valid: 'torch', 'triton'"):
        build_model("dit_xs2", norm_impl="fused")


def test_bench_check_norm_passes_the_kernels_and_fails_a_wrong_one(triton_interpreter):
    """What `bench train-step --norm-impl triton` runs on the GPU before timing, here in the interpreter."""
    script = """
from mdtzoo.bench import check_norm
from mdtzoo.models import triton_norm as tn
worst = check_norm(40, batch=2, tokens=13, device="cpu")
assert worst["float32"] < 1e-5 and worst["bfloat16"] < 2e-2, worst
right = tn._norm_fwd
tn._norm_fwd = lambda x, a, g, sh, sc, eps: right(x, a, g, sh, sc * 1.001, eps)  # scale slightly off
try:
    check_norm(40, batch=2, tokens=13, device="cpu")
except AssertionError as err:
    print("REFUSED", err)
"""
    out = triton_interpreter(script)
    assert "REFUSED fused norm float32 h: relative error" in out, out


def test_launch_settings_left_none_follow_the_row_tile_and_set_ones_win():
    pytest.importorskip("triton")
    from mdtzoo.models import triton_norm as tn
    from mdtzoo.models.kernel_ops import overridden

    assert tn.CONFIG["bwd_rows"] is None and tn.CONFIG["bwd_warps"] is None  # chosen by width unless set
    # norm_sweep.py (session 11): per step 1 row of 4 warps at S/2's 512-wide tile (and narrower), 4 of 4
    # at B/2's 1024, 4 of 8 at XL's 2048; 1 of 16 past that
    widths = (40, 384, 768, 1024, 1152, 4096, 8192)
    assert [tn._setting("bwd_rows", tn._tile(d)) for d in widths] == [1, 1, 4, 4, 4, 1, 1]
    assert [tn._setting("bwd_warps", tn._tile(d)) for d in widths] == [4, 4, 4, 4, 8, 16, 16]
    assert tn._setting("bwd_chunk", 2048) == tn.CONFIG["bwd_chunk"]
    with overridden(tn.CONFIG, {"bwd_rows": 4}):
        assert tn._setting("bwd_rows", 512) == tn._setting("bwd_rows", 2048) == 4
    with overridden(tn.CONFIG, {"fwd_rows": None}), pytest.raises(ValueError, match="only bwd_rows, bwd_warps"):
        tn.launch_settings(384)
