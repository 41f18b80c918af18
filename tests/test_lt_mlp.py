"""The MLP's GELU inside cuBLASLt's matmul epilogues (mlp_impl='cublaslt': models/lt_mlp.py,
models/cublaslt.py). On the CPU the ops are torch's maths, so the block's wiring, gradients, compiled
graph and dtype handling are checked here; the cuBLASLt calls themselves are checked on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from mdtzoo.models import cublaslt, lt_mlp
from mdtzoo.models.blocks import Block
from mdtzoo.models.triton_mlp import gelu_mlp, gelu_tanh_grad

CUDA = torch.cuda.is_available()


def _block_pair(dtype=torch.float32, dim=32):
    torch.manual_seed(0)
    ref, blk = Block(dim, 2, norm_impl="torch"), Block(dim, 2, norm_impl="torch", mlp_impl="cublaslt")
    with torch.no_grad():  # adaLN-Zero starts at zero: give the MLP branch a gate so that its gradients flow
        ref.adaLN_modulation[1].weight.normal_(0, 0.2)
    blk.load_state_dict(ref.state_dict())  # the option changes no parameters
    return ref.to(dtype), blk.to(dtype)


def _run(block, x0, c):
    x = x0.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    y = block(x, c)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_block_with_cublaslt_mlp_matches_the_torch_mlp_off_cuda(dtype, tol):
    ref, blk = _block_pair(dtype)
    x, c = torch.randn(2, 7, 32, dtype=dtype), torch.randn(2, 32, dtype=dtype)
    got, want = _run(blk, x, c), _run(ref, x, c)
    assert len(got) == len(want) == 2 + len(list(ref.parameters()))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert ((g - w).norm() / w.norm().clamp_min(1e-30)).item() < tol
    assert want[2 + [n for n, _ in ref.named_parameters()].index("mlp.fc1.bias")].abs().sum() > 0


def test_block_with_cublaslt_mlp_compiles_in_one_graph():
    ref, blk = _block_pair()
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    want = _run(ref, x, c)
    torch._dynamo.reset()
    compiled = torch.compile(blk, fullgraph=True, dynamic=False)  # fullgraph: a graph break fails here
    got = _run(compiled, x, c)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < 1e-5


def test_block_with_cublaslt_mlp_under_activation_checkpointing_and_no_grad():
    ref, blk = _block_pair()
    x, c = torch.randn(2, 6, 32), torch.randn(2, 32)
    want = _run(ref, x, c)
    blk.checkpoint_activations = True  # the forward runs again in the backward: the same gradients
    for g, w in zip(_run(blk, x, c), want):
        assert ((g - w).norm() / w.norm()).item() < 1e-5
    with torch.no_grad():  # (sampling)
        torch.testing.assert_close(blk(x, c), want[0])


def test_the_ops_are_the_closed_form_and_their_fake_kernels_match():
    g = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(9, 8, generator=g), torch.randn(24, 8, generator=g), torch.randn(24, generator=g)
    gl, u = lt_mlp.linear_gelu(x, w1, b1)
    torch.testing.assert_close(u, x @ w1.t() + b1)
    torch.testing.assert_close(gl, F.gelu(x @ w1.t() + b1, approximate="tanh"))
    dy, w2 = torch.randn(9, 8, generator=g), torch.randn(8, 24, generator=g)
    du = lt_mlp.dgelu_linear(dy, w2, u)
    ud = u.double().requires_grad_(True)
    (gd,) = torch.autograd.grad(F.gelu(ud, approximate="tanh"), ud, (dy.double() @ w2.double()))
    torch.testing.assert_close(du.double(), gd, rtol=1e-5, atol=1e-5)
    dw, db = lt_mlp.weight_grad(du, x)  # fc1's weight and bias gradients
    torch.testing.assert_close(dw, du.t() @ x)
    torch.testing.assert_close(db, du.sum(0))
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.mdtzoo.lt_linear_gelu.default, (x.to(dt), w1.to(dt), b1.to(dt)))
        torch.library.opcheck(torch.ops.mdtzoo.lt_dgelu_linear.default, (dy.to(dt), w2.to(dt), u.to(dt)))
        torch.library.opcheck(torch.ops.mdtzoo.lt_weight_grad.default, (du.to(dt), x.to(dt)))


def test_bf16_weights_give_the_same_mlp_as_float32_weights_under_autocast():
    """What train.bf16_weights relies on: the Function casts float32 weights to bf16 as autocast does,
    and its bias gradients are rounded to bf16 either way, so both runs agree bit for bit."""
    torch.manual_seed(0)
    assert_bf16_weights_bitwise(Mlp(16, 64, act_layer=lambda: torch.nn.GELU(approximate="tanh")),
                                torch.randn(3, 5, 16))


def assert_bf16_weights_bitwise(mlp, h0):
    """``gelu_mlp(..., 'cublaslt')`` under bf16 autocast with ``mlp``'s float32 weights and with a bf16
    copy of them: the output and every gradient bit for bit (the bf16 copy's upcast)."""
    mlp16 = Mlp(mlp.fc1.in_features, mlp.fc1.out_features, act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    mlp16.load_state_dict(mlp.state_dict())
    mlp16.to(h0.device, torch.bfloat16)
    results = []
    for m in (mlp, mlp16):
        h = h0.clone().requires_grad_(True)
        with torch.autocast(h0.device.type, dtype=torch.bfloat16):
            y = gelu_mlp(h, m, "cublaslt")
        y.float().pow(2).sum().backward()
        results.append([y.float(), h.grad] + [p.grad.float() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_check_mlp_passes_the_cublaslt_path_and_refuses_a_wrong_one(monkeypatch):
    from mdtzoo.bench import check_mlp

    worst = check_mlp(24, batch=2, tokens=5, device="cpu", impl="cublaslt")
    assert worst["float32"] < 1e-5 and worst["bfloat16"] < 2e-2
    right = lt_mlp.dgelu_linear
    monkeypatch.setattr(lt_mlp, "dgelu_linear", lambda dy, w, u: right(dy, w, u) * 1.001)
    with pytest.raises(AssertionError, match="fused MLP float32 dh: relative error"):
        check_mlp(24, batch=2, tokens=5, device="cpu", impl="cublaslt")


def test_cublaslt_names_a_missing_library(monkeypatch):
    monkeypatch.setattr(cublaslt, "_lib", None)
    monkeypatch.setenv("MDTZOO_CUBLASLT", "/nonexistent/libcublasLt.so.13")
    with pytest.raises(RuntimeError, match="cannot load libcublasLt from '/nonexistent/libcublasLt.so.13'"):
        cublaslt.library()
    with pytest.raises(ValueError, match="CUDA tensors of one 16-bit dtype"):
        cublaslt.linear_gelu(torch.zeros(2, 8), torch.zeros(8, 8), torch.zeros(8))


def test_bf16_weights_accept_the_cublaslt_mlp():
    from mdtzoo.models import build_model
    from mdtzoo.training.bf16_weights import check_bf16_model, check_bf16_weights

    check_bf16_weights(precision="bf16", update="auto", world=1, hold_grads=True, mlp_impl="cublaslt")
    check_bf16_model(build_model("dit_xs2", mlp_impl="cublaslt"))
    with pytest.raises(ValueError, match="mlp_impl 'triton'.*use 'torch' or 'cublaslt'"):
        check_bf16_weights(precision="bf16", update="auto", world=1, hold_grads=True, mlp_impl="triton")


# ---- on a GPU: the cuBLASLt calls themselves ----

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.skipif(not CUDA, reason="cuBLASLt runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t, d", [(1, 64), (300, 64), (64 * 179, 384), (4096, 1152)])
def test_cublaslt_epilogues_match_the_closed_form_on_cuda(t, d, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    f = 4 * d
    x = torch.randn(t, d, generator=g)
    w1, b1 = torch.randn(f, d, generator=g) / d ** 0.5, torch.randn(f, generator=g)
    dy, w2 = torch.randn(t, d, generator=g), torch.randn(d, f, generator=g) / f ** 0.5
    dev = torch.device("cuda")
    cast = [v.to(dev, dtype) for v in (x, w1, b1, dy, w2)]
    xc, w1c, b1c, dyc, w2c = cast
    gl, u = torch.ops.mdtzoo.lt_linear_gelu(xc, w1c, b1c)
    ref_u = xc.double() @ w1c.double().t() + b1c.double()
    assert _rel(u, ref_u) < 1e-2 and _rel(gl, F.gelu(ref_u, approximate="tanh")) < 1e-2
    du = torch.ops.mdtzoo.lt_dgelu_linear(dyc, w2c, u)
    ref_du = (dyc.double() @ w2c.double()) * gelu_tanh_grad(u.double())
    assert _rel(du, ref_du) < 1e-2
    du_b, db_b = cublaslt.dgelu_linear_bgrad(dyc, w2c, u)  # du's sums in the epilogue (DGELU_BGRAD)
    assert _rel(du_b, ref_du) < 1e-2 and _rel(db_b, ref_du.sum(0)) < 1e-2
    for grad, inp in ((du, xc), (dyc, gl)):  # fc1's and fc2's weight and bias gradients (BGRADB)
        dw, db = torch.ops.mdtzoo.lt_weight_grad(grad, inp)
        assert dw.shape == (grad.shape[1], inp.shape[1]) and db.shape == (grad.shape[1],)
        if t > 1:
            assert _rel(dw, grad.double().t() @ inp.double()) < 1e-2
        assert _rel(db, grad.double().sum(0)) < 1e-2  # the sums of the gradient (B), not of the input
    # the same calls on inputs that start 2 bytes past an allocation (what cuBLASLt may assume of them)
    xs = torch.empty(t * d + 1, device=dev, dtype=dtype)[1:].view(t, d).copy_(xc)
    gl2, u2 = torch.ops.mdtzoo.lt_linear_gelu(xs, w1c, b1c)
    assert _rel(u2, ref_u) < 1e-2  # (another algorithm may be chosen: the same up to bf16 rounding)


@pytest.mark.skipif(not CUDA, reason="cuBLASLt runs on a GPU")
def test_cublaslt_calls_replay_in_a_cuda_graph_on_cuda():
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    x, w1, b1 = (torch.randn(256, 128, generator=g).to(dev, torch.bfloat16),
                 torch.randn(512, 128, generator=g).to(dev, torch.bfloat16) / 11, torch.randn(512, generator=g).to(dev))
    b1 = b1.bfloat16()
    dy, w2 = torch.randn(256, 128, generator=g).to(dev, torch.bfloat16), torch.randn(128, 512).to(dev, torch.bfloat16)
    want = [*torch.ops.mdtzoo.lt_linear_gelu(x, w1, b1)]
    want += [torch.ops.mdtzoo.lt_dgelu_linear(dy, w2, want[1])]
    want += [*torch.ops.mdtzoo.lt_weight_grad(want[2], x)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [*torch.ops.mdtzoo.lt_linear_gelu(x, w1, b1)]
        got += [torch.ops.mdtzoo.lt_dgelu_linear(dy, w2, got[1])]
        got += [*torch.ops.mdtzoo.lt_weight_grad(got[2], x)]
    for t in got:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="cuBLASLt runs on a GPU")
def test_block_with_cublaslt_mlp_on_cuda():
    """The compiled block under bf16 autocast against the torch MLP's (bf16 rounding apart), and
    bf16 weights bit for bit the float32 weights' under autocast."""
    from mdtzoo.bench import check_mlp

    assert check_mlp(256, device="cuda", impl="cublaslt")["bfloat16"] < 2e-2
    ref, blk = (m.cuda() for m in _block_pair(dim=256))
    x, c = torch.randn(4, 64, 256, device="cuda"), torch.randn(4, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _run(torch.compile(ref, dynamic=False), x, c)
        got = _run(torch.compile(blk, dynamic=False), x, c)
    for a, b in zip(got, want):
        assert _rel(a, b) < 2e-2
    blk.mlp.zero_grad(set_to_none=True)  # (the block's runs above left gradients)
    h0 = torch.randn(4, 64, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert_bf16_weights_bitwise(blk.mlp, h0)


def test_the_trainer_checks_the_library_before_any_work(monkeypatch):
    from mdtzoo.models import build_model

    model = build_model("dit_xs2", mlp_impl="cublaslt")

    def missing():
        raise RuntimeError("mlp_impl='cublaslt' needs CUDA's libcublasLt (stand-in)")

    monkeypatch.setattr(cublaslt, "library", missing)
    lt_mlp.check_library(model, torch.device("cpu"))  # off CUDA the ops are torch's: nothing to load
    lt_mlp.check_library(build_model("dit_xs2"), torch.device("cuda"))  # no cuBLASLt block: nothing to load
    with pytest.raises(ValueError, match="needs CUDA's libcublasLt"):
        lt_mlp.check_library(model, torch.device("cuda"))


@pytest.mark.skipif(not CUDA, reason="cuBLASLt runs on a GPU")
def test_the_trainer_check_runs_each_width_once_on_cuda():
    from mdtzoo.models import build_model

    lt_mlp.check_library(build_model("dit_xs2", mlp_impl="cublaslt"), torch.device("cuda"))  # passes
    assert any(key[2] == "gelu_aux_bias" and key[6] == 8 for key in cublaslt._plans)  # its 8-row probe ran


# ---- the tuned algorithm table (cublaslt_algos.json, experiments/bench/lt_tune.py) ----

KEY = (0, torch.bfloat16, "dgelu", 0, 0, 1536, 65536, 384, 1536, 384, 1536, (256, 256, 256))


def test_a_problem_runs_the_tuned_table_s_algorithm_else_the_first(monkeypatch):
    """The index comes from ALGO_PICK (benchmarks) first, then the table entry for the problem, else 0;
    an index past what the heuristic offered falls back to 0; the choice is kept per problem."""
    name = cublaslt.problem_name(KEY)
    assert name == "dgelu bfloat16 0 0 1536 65536 384 1536 384 1536 256/256/256"
    monkeypatch.setattr(cublaslt, "_tuned", {0: {name: 3}})
    monkeypatch.setattr(cublaslt, "_picks", {})
    assert cublaslt._pick(KEY, 8) == 3 and cublaslt.tuned_plans() == 1
    other = KEY[:5] + (3072,) + KEY[6:]
    assert cublaslt._pick(other, 8) == 0 and cublaslt.tuned_plans() == 1
    monkeypatch.setitem(cublaslt.ALGO_PICK, "dgelu", 5)  # (a benchmark's override, capped at what was offered)
    assert cublaslt._pick(KEY, 8) == 5 and cublaslt._pick(KEY, 4) == 3
    monkeypatch.setattr(cublaslt, "_picks", {})
    monkeypatch.delitem(cublaslt.ALGO_PICK, "dgelu")
    assert cublaslt._pick(KEY, 3) == 0  # the table's 3 is not among the 3 the heuristic offered


def test_the_shipped_table_names_valid_problems(monkeypatch):
    """Every entry of cublaslt_algos.json: a card|version key, problems named as ``problem_name`` names
    them (an epilogue cuBLASLt runs here, a dtype, 9 integers, 3 alignments), and an index the heuristic
    can offer (1 .. CANDIDATES-1; the first is the default and not stored). MDTZOO_LT_TUNED=0: not read."""
    import json

    with open(cublaslt.TUNED_FILE) as f:
        table = json.load(f)
    for card, entries in table.items():
        assert "|" in card and card.split("|")[1].isdigit()
        for problem, index in entries.items():
            epilogue, dtype, *numbers, aligns = problem.split()
            assert epilogue in cublaslt.EPILOGUES and dtype in ("bfloat16", "float16")
            assert len(numbers) == 8 and all(n.isdigit() for n in numbers)
            assert all(a.isdigit() for a in aligns.split("/")) and len(aligns.split("/")) == 3
            assert isinstance(index, int) and 1 <= index < cublaslt.CANDIDATES
    monkeypatch.setenv("MDTZOO_LT_TUNED", "0")
    monkeypatch.setattr(cublaslt, "_tuned", {})
    assert cublaslt.tuned(0) == {}  # (without touching the library)


@pytest.mark.skipif(not CUDA, reason="cuBLASLt runs on a GPU")
def test_a_tuned_algorithm_runs_and_repeats_on_cuda(monkeypatch):
    """A table entry moves one problem to the heuristic's second algorithm: the result agrees with the
    first's to bf16 rounding and two calls give the same bits."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dy, w, u = (torch.randn(*shape, generator=g).cuda().to(torch.bfloat16)
                for shape in ((4096, 384), (384, 1536), (4096, 1536)))
    first = cublaslt.dgelu_linear(dy, w, u)
    key = next(k for k in cublaslt._plans if k[2] == "dgelu" and k[6] == 4096)
    if len(cublaslt._plans[key][4]) < 2:
        pytest.skip("the heuristic offered one algorithm")
    monkeypatch.setattr(cublaslt, "_tuned", {0: {cublaslt.problem_name(key): 1}})
    monkeypatch.setattr(cublaslt, "_picks", {})
    a, b = cublaslt.dgelu_linear(dy, w, u), cublaslt.dgelu_linear(dy, w, u)
    assert cublaslt.tuned_plans() == 1 and torch.equal(a, b)
    assert _rel(a, first) < 1e-2


def test_a_corrupt_table_is_named(monkeypatch, tmp_path):
    bad = tmp_path / "cublaslt_algos.json"
    bad.write_text("{not json")
    monkeypatch.setattr(cublaslt, "TUNED_FILE", str(bad))
    monkeypatch.setattr(cublaslt, "_tuned", {})
    monkeypatch.setattr(cublaslt, "table_name", lambda device: "card|1")
    monkeypatch.delenv("MDTZOO_LT_TUNED", raising=False)
    with pytest.raises(RuntimeError, match="cannot read the tuned cuBLASLt algorithms in .*MDTZOO_LT_TUNED=0"):
        cublaslt.tuned(0)
    bad.write_text('{"card|1": {"dgelu bfloat16 0 0 8 8 8 8 8 8 256/256/256": "2"}}')
    with pytest.raises(RuntimeError, match="an algorithm index is not an integer"):
        cublaslt.tuned(0)
    bad.write_text('{"card|1": {"dgelu bfloat16 0 0 8 8 8 8 8 8 256/256/256": 2}}')
    assert cublaslt.tuned(0) == {"dgelu bfloat16 0 0 8 8 8 8 8 8 256/256/256": 2}
