"""The MLP with the tanh-GELU's backward inside fc2's input-gradient matmul (models/triton_mlp.py): the
kernel against the closed-form maths in Triton's CPU interpreter, the Function against timm's Mlp, the
block's switch, and what the kernel compiles to for an H100."""

import pytest
import torch
import torch.nn.functional as F
from conftest import block_switch_error

CHECK = """
import torch
from mdtzoo.bench import check_mlp
from mdtzoo.models import triton_mlp as tm

# Small tiles, so that the shapes below cut them at every edge: M = 2 x 13 = 26 rows against BM 16,
# hidden 4D = 160 against BN 32 (and 96 against 64), K = D = 40 against BK 16 (24 against 16).
worst = {"float32": 0.0, "bfloat16": 0.0}
for d, tiles in ((40, dict(BM=16, BN=32, BK=16, GROUP_M=2)), (24, dict(BM=32, BN=64, BK=16, GROUP_M=8))):
    tm.CONFIG.update(tiles, num_warps=4, num_stages=2)
    for key, err in check_mlp(d, batch=2, tokens=13, device="cpu").items():
        if key in worst:
            worst[key] = max(worst[key], err)
# the op against the closed form directly, and its fake kernel against the real outputs
g = torch.Generator().manual_seed(0)
dy, w, u = torch.randn(26, 40, generator=g), torch.randn(40, 160, generator=g), 2 * torch.randn(26, 160, generator=g)
ref_du, ref_db = tm.reference_dgelu(dy, w, u)
op_err = 0.0
for group_m in (1, 3, 8):  # tile groups: one row of tiles each; 4 rows of tiles as groups of 3 and 1; one group
    tm.CONFIG.update(BM=8, BN=32, BK=16, GROUP_M=group_m)
    du, db = tm.linear_dgelu(dy, w, u)
    op_err = max(op_err, ((du - ref_du).norm() / ref_du.norm()).item(), ((db - ref_db).norm() / ref_db.norm()).item())
torch.library.opcheck(torch.ops.mdtzoo.linear_dgelu.default, (dy.bfloat16(), w.bfloat16(), u.bfloat16()),
                      test_utils=("test_schema", "test_faketensor"))
print("WORST", worst["float32"], worst["bfloat16"], op_err)
"""


def test_fused_gelu_backward_matches_the_mlp_maths(triton_interpreter):
    out = triton_interpreter(CHECK).split("WORST")[-1].split()
    f32, bf16, op = map(float, out)
    assert f32 < 1e-5, f32  # output, dh, dW1, db1, dW2, db2 against timm's Mlp in float32
    assert bf16 < 2e-2, bf16  # under bf16 autocast against the float32 maths
    assert op < 1e-6, op


def test_check_mlp_refuses_a_wrong_kernel(triton_interpreter):
    """What `bench train-step --mlp-impl triton` runs on the GPU before timing, here in the interpreter."""
    script = """
from mdtzoo.bench import check_mlp
from mdtzoo.models import triton_mlp as tm
right = tm.linear_dgelu
tm.linear_dgelu = lambda dy, w, u: (right(dy, w, u)[0] * 1.001, right(dy, w, u)[1])  # du slightly off
try:
    check_mlp(24, batch=2, tokens=5, device="cpu")
except AssertionError as err:
    print("REFUSED", err)
"""
    out = triton_interpreter(script)
    assert "REFUSED fused MLP float32 dh: relative error" in out, out


def test_block_with_triton_mlp_matches_the_torch_mlp_in_the_interpreter(triton_interpreter):
    setup = "from mdtzoo.models import triton_mlp as tm\ntm.CONFIG.update(BM=16, BN=32, BK=16, num_warps=4, num_stages=2)"
    assert block_switch_error(triton_interpreter, "mlp_impl", "triton_mlp", setup) < 1e-5


def test_gelu_tanh_grad_is_the_derivative_of_torchs_tanh_gelu():
    from mdtzoo.models.triton_mlp import gelu_tanh_grad

    u = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(F.gelu(u, approximate="tanh").sum(), u)
    torch.testing.assert_close(gelu_tanh_grad(u.detach()), grad, rtol=1e-12, atol=1e-12)


def test_mlp_impl_off_cuda_is_the_module_and_unknown_names_are_refused():
    from mdtzoo.launch.bench_cmd import MLP_IMPLS
    from mdtzoo.models import build_model
    from mdtzoo.models.blocks import MLP_IMPLS as impls, Block
    from mdtzoo.models.triton_mlp import gelu_mlp, usable

    assert MLP_IMPLS == impls == ("torch", "triton", "cublaslt")
    torch.manual_seed(0)
    ref, block = Block(16, 2), Block(16, 2, mlp_impl="triton")
    block.load_state_dict(ref.state_dict())  # the option changes no parameters
    x, c = torch.randn(2, 4, 16), torch.randn(2, 16)
    assert not usable(x)  # no GPU, no interpreter: the module's own maths
    torch.testing.assert_close(block(x, c), ref(x, c))
    torch.testing.assert_close(gelu_mlp(x, ref.mlp), ref.mlp(x), rtol=0, atol=0)  # the module itself
    assert all(b.mlp_impl == "triton" for b in build_model("mdt_xs2", mlp_impl="triton").all_blocks())
    with pytest.raises(ValueError, match="unknown mlp_impl 'fused'; valid: 'torch', 'triton', 'cublaslt'"):
        Block(16, 2, mlp_impl="fused")
    with pytest.raises(ValueError, match="unknown mlp_impl 'cutlass'; valid: 'torch', 'triton', 'cublaslt'"):
        build_model("dit_xs2", mlp_impl="cutlass")


def test_fused_gelu_backward_compiles_to_tensor_core_products_for_sm90():
    """The kernel as launched at MDT-XL/2's shapes (bf16, D 1152, hidden 4608), compiled for an H100 on
    the CPU: wgmma products, no 2-byte global accesses, and the default CONFIG fits without spills."""
    pytest.importorskip("triton")
    from mdtzoo.models import kernel_codegen
    from mdtzoo.models import triton_mlp as tm

    with kernel_codegen.recording(tm, ("_dgelu_kernel",)) as launches:
        g = torch.Generator().manual_seed(0)
        tm.linear_dgelu(torch.randn(179, 1152, generator=g).bfloat16(), torch.randn(1152, 4608, generator=g).bfloat16(),
                        torch.randn(179, 4608, generator=g).bfloat16())
    ((name, fn, args, kwargs),) = launches
    assert kwargs["UPCAST"] is False and kwargs["IEEE"] is False  # bf16 operands straight to the tensor cores
    ptx = kernel_codegen.sm90_ptx(fn, args, kwargs)
    assert "wgmma.mma_async" in ptx
    narrow = [line.strip() for line in ptx.splitlines() if "ld.global.b16" in line or "st.global.b16" in line]
    assert not narrow, narrow[:3]
    use = kernel_codegen.ptxas_usage(ptx)
    assert 0 < use["registers"] <= 255 and use["spill_bytes"] == 0, use
