"""bfloat16 Linear weights with float32 masters in the fused update (training/bf16_weights.py)
against the autocast step with float32 weights."""

from __future__ import annotations

import os

import pytest
import torch

from mdtzoo.models import build_model
from mdtzoo.training.bf16_weights import Bf16Weights, check_bf16_weights
from mdtzoo.training.ema import EMA

# Run under Triton's CPU interpreter: one MDT step (both passes, held gradients, bf16 autocast on
# the CPU) with float32 weights, and the same step with bf16 Linear weights and their masters.
STEP_CHECK = r'''
import copy, sys
import torch
from mdtzoo.diffusion import build_diffusion
from mdtzoo.models import build_model
from mdtzoo.training.bf16_weights import Bf16Weights
from mdtzoo.training.ema import EMA
from mdtzoo.training.fused_update import FusedAdamWEMA, make_update
from mdtzoo.training.objective import DiffusionObjective, backward_parts, prepare_step

name = sys.argv[1]
torch.manual_seed(0)
# (torch's norm maths: the interpreter would run our Triton norm kernels too, slowly)
base = build_model(name, input_size=8, in_channels=3, num_classes=3, norm_impl="torch")
with torch.no_grad():
    for p in base.parameters():
        p.normal_(0, 0.05)
x0, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 2, 1, 0])
autocast = torch.autocast("cpu", dtype=torch.bfloat16)

def setup(bf16):
    model = copy.deepcopy(base).train()
    ema = EMA(model, 0.9, warmup=True)
    weights = Bf16Weights(model, ema) if bf16 else None
    trained = weights.parameters() if bf16 else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1, foreach=False)
    up = make_update(opt, ema, "fused", shadows=weights.shadows if bf16 else None)
    assert isinstance(up, FusedAdamWEMA)
    passes = "both" if model.interp is not None else "full"
    step_fn, parts = prepare_step(DiffusionObjective(model, build_diffusion(), passes, seed=1), torch.device("cpu"))
    return model, ema, weights, opt, up, step_fn, parts

runs = {}
for bf16 in (False, True):
    model, ema, weights, opt, up, step_fn, parts = setup(bf16)
    losses, norms = [], []
    names = [n for n, _ in model.named_parameters()]
    masters = {weights.names[id(m)]: m for m in weights.parameters() if id(m) in weights.names} if bf16 else {}
    for step in range(2):
        out = backward_parts(step_fn, parts, (x0, y, step), autocast, hold=up.hold_grads)
        norms.append(up.step(step + 1, max_norm=1.0))
        up.zero_grad()
        losses.append(out["loss"])
        if step == 0:  # the state after the first step
            values = {n: masters.get(n, p).detach().clone() for n, p in zip(names, model.parameters())}
            moments = [opt.state[p][k].clone() for g in opt.param_groups for p in g["params"]
                       for k in ("exp_avg", "exp_avg_sq")]
            ema_values = [e.clone() for e in ema.model.parameters()]
    runs[bf16] = dict(losses=losses, norms=norms, values=values, ema=ema_values, moments=moments, weights=weights)

ref, b16 = runs[False], runs[True]
# the copies are torch's cast of the masters (the kernel rounds in integers, as torch does), so the
# second step reads the weights autocast reads: both steps agree bit for bit
assert [torch.equal(a, b) for a, b in zip(ref["losses"], b16["losses"])] == [True, True], (ref["losses"], b16["losses"])
assert [torch.equal(a, b) for a, b in zip(ref["norms"], b16["norms"])] == [True, True], (ref["norms"], b16["norms"])
for n, v in ref["values"].items():  # the float32 weights after step 1 (the masters where converted)
    assert torch.equal(b16["values"][n], v), n
for a, b in zip(ref["ema"] + ref["moments"], b16["ema"] + b16["moments"]):
    assert torch.equal(a, b)
converted = b16["weights"].shadows
assert len(converted) > 0
for m_id, copy16 in converted.items():  # the model's bf16 weights: the masters, rounded as torch rounds
    master = next(m for m in b16["weights"].parameters() if id(m) == m_id)
    assert copy16.dtype == torch.bfloat16 and torch.equal(copy16, master.detach().bfloat16())
print("ok", len(converted), float(ref["losses"][0]), float(ref["losses"][1]), float(b16["losses"][1]))
'''

@pytest.mark.parametrize("name", ["mdt_xs2", "dit_xs2"])
def test_a_step_with_bf16_weights_is_the_autocast_step_bit_for_bit(triton_interpreter, name):
    """Two steps (forward, both backwards with held gradients, clipped fused update) with bf16 Linear
    weights give the autocast steps' losses and gradient norms bit for bit, and after the first its
    float32 weights (the masters), EMA and AdamW moments; the model's bf16 weights are torch's cast
    of the masters, bit for bit."""
    out = triton_interpreter(STEP_CHECK, name)
    assert out.startswith("ok"), out


ROUNDING = r'''
import sys
import torch, triton, triton.language as tl
from mdtzoo.training.fused_update import _bf16_rne

@triton.jit
def cast(X, Y, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(Y + o, _bf16_rne(tl.load(X + o, mask=m)), mask=m)

g = torch.Generator().manual_seed(0)
spread = torch.randn(50_000, generator=g) * torch.logspace(-40, 38, 50_000).clamp(max=3e38)
ties = ((torch.randint(0, 2**15, (10_000,), generator=g, dtype=torch.int32) << 16) | 0x8000).view(torch.float32)
special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4028235e38, -3.4028235e38, 1e-45,
                        -1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])  # (the last two: ties down and up to even)
x = torch.cat([spread, ties, -ties, special]).to(sys.argv[1])
y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
cast[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
ref = x.bfloat16()
same = (y.view(torch.int16) == ref.view(torch.int16)) | (y.isnan() & ref.isnan())
assert bool(same.all()), (int((~same).sum()), x[~same][:5].tolist(), y[~same][:5].tolist(), ref[~same][:5].tolist())
print("ok")
'''


def test_the_update_kernel_rounds_the_copies_as_torch_casts(triton_interpreter):
    """``_bf16_rne`` (the update kernel's float32 -> bf16 rounding) is torch's cast bit for bit --
    values from subnormal to the largest float, exact ties both ways, signed zeros, infinities and
    NaN -- in Triton's CPU interpreter, whose own cast does not round as torch does."""
    assert triton_interpreter(ROUNDING, "cpu").startswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's rounding is checked on a GPU")
def test_the_update_kernel_rounds_the_copies_as_torch_casts_on_cuda(tmp_path):
    import subprocess
    import sys

    (tmp_path / "rounding.py").write_text(ROUNDING)
    proc = subprocess.run([sys.executable, str(tmp_path / "rounding.py"), "cuda"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_conversion_keeps_the_parameters_and_points_the_ema_at_the_masters():
    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [id(p) for p in model.parameters()]
    ema = EMA(model, 0.9)
    weights = Bf16Weights(model, ema)
    assert [id(p) for p in model.parameters()] == ids  # the same Parameter objects, converted in place
    linear = {f"{m}.{k}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
              for k in ("weight", "bias") if getattr(mod, k) is not None}
    assert set(weights.names.values()) == linear
    for n, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if n in linear else torch.float32), n
        assert torch.equal(p.float(), before[n].bfloat16().float() if n in linear else before[n]), n
    params = weights.parameters()  # the model's order, each converted one replaced by its float32 master
    assert len(params) == len(ids) and all(p.dtype == torch.float32 for p in params)
    by_name = dict(zip([n for n, _ in model.named_parameters()], params))
    for n in linear:
        assert torch.equal(by_name[n], before[n]) and by_name[n] is not dict(model.named_parameters())[n]
    # the EMA follows the masters: its pairs' sources are exactly the optimiser's parameters
    assert [id(p) for _, p in ema._pairs] == [id(p) for p in params]


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp32"), "need bf16 autocast, and the precision is 'fp32'"),
    (dict(update="op_by_op"), "need the fused update"),
    (dict(world=2), "run on one process .*this run has 2"),
    (dict(hold_grads=False), "need held gradients"),
    (dict(mlp_impl="triton"), "cannot use mlp_impl 'triton', which reads the Linear weights"),
    (dict(separate_passes=False), "need separate passes \\(one backward of both passes would sum"),
    (dict(accumulation=4), "need one micro-batch per step \\(the 4 micro-batches' gradients"),
])
def test_settings_bf16_weights_cannot_run_with_are_named(kwargs, message):
    settings = dict(precision="bf16", update="auto", world=1, hold_grads=True, mlp_impl="torch") | kwargs
    with pytest.raises(ValueError, match="bf16_weights: they " + message):
        check_bf16_weights(**settings)
    check_bf16_weights(precision="bf16", update="fused", world=1, hold_grads=True, mlp_impl="torch")


def test_bench_refuses_bf16_weights_it_cannot_run_before_building_anything():
    from mdtzoo.bench import bench_train_step

    with pytest.raises(ValueError, match="bf16_weights: they need bf16 autocast, and the precision is 'fp32'"):
        bench_train_step("dit_s2", 2, device="cpu", precision="fp32", bf16_weights=True)
    with pytest.raises(ValueError, match="need the fused update .*op_by_op.*need held gradients.*separate passes"):
        bench_train_step("dit_s2", 2, device="cpu", precision="bf16", update="op_by_op", hold_grads=False,
                         separate_passes=False, bf16_weights=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="FusedAdamWEMA runs on CUDA .*the parameters are on cpu"):
            bench_train_step("dit_s2", 2, device="cpu", precision="bf16", bf16_weights=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 copies' rounding is checked on a GPU")
@pytest.mark.parametrize("name", ["mdt_xs2", "dit_s2"])
def test_bf16_weights_train_as_the_autocast_step_bit_for_bit_on_cuda(name):
    """On a GPU the kernel rounds the copies as torch's cast does, so several steps with bf16 weights
    are the autocast steps bit for bit: losses, gradient norms, float32 weights, EMA; and their
    captured step (``StepGraph``) passes ``graph_check`` against them."""
    import copy

    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.training.fused_update import make_update
    from mdtzoo.training.graph_step import GRAPH_WARMUP, StepGraph, graph_check
    from mdtzoo.training.objective import DiffusionObjective, backward_parts, prepare_step

    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model(name, input_size=8, in_channels=3, num_classes=3).to(dev)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    x0, y = torch.randn(8, 3, 8, 8, device=dev), torch.randint(0, 3, (8,), device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    runs = {}
    for bf16 in (False, True):
        model = copy.deepcopy(base).train()
        ema = EMA(model, 0.999, warmup=True)
        weights = Bf16Weights(model, ema) if bf16 else None
        trained = weights.parameters() if bf16 else [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-3, fused=True)
        updater = make_update(opt, ema, "fused", shadows=weights.shadows if bf16 else None)
        passes = "both" if model.interp is not None else "full"
        objective = DiffusionObjective(model, build_diffusion(), passes, seed=1)
        step_fn, parts = prepare_step(objective, dev)
        graph = StepGraph(objective, step_fn, parts, updater, autocast, hold=updater.hold_grads) if bf16 else None

        def one(step, eager=False):
            if graph is not None and step >= GRAPH_WARMUP and not eager:
                return graph(x0, y, step)
            out = backward_parts(step_fn, parts, (x0, y, step), autocast, hold=updater.hold_grads)
            norm = updater.step(step + 1)
            updater.zero_grad()
            return out, norm

        values = [(float(out["loss"]), float(norm)) for out, norm in (one(s, eager=True) for s in range(4))]
        runs[bf16] = dict(values=values, params=[p.detach().clone() for p in trained],
                          ema=[e.detach().clone() for e in ema.model.parameters()])
        if bf16:
            for s in range(4, 4 + GRAPH_WARMUP):
                one(s)
            result = graph_check(lambda eager: [one(s, eager) for s in (6, 7)], model, opt, ema, updater)
            assert all(c["bitwise"] for c in result["graphed"].values()), result["graphed"]
    assert runs[True]["values"] == runs[False]["values"]
    assert all(torch.equal(a, b) for a, b in zip(runs[True]["params"], runs[False]["params"]))
    assert all(torch.equal(a, b) for a, b in zip(runs[True]["ema"], runs[False]["ema"]))


def test_a_model_bf16_weights_cannot_convert_is_named_before_anything_changes():
    from mdtzoo.training.bf16_weights import check_bf16_model

    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1))
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    for model in (convs, frozen):
        before = [p.dtype for p in model.parameters()]
        with pytest.raises(ValueError, match="bf16_weights: .* has no trainable float32 Linear layer"):
            Bf16Weights(model)
        assert [p.dtype for p in model.parameters()] == before
    with pytest.raises(ValueError, match="bf16_weights: they cannot use mlp_impl 'triton'"):
        check_bf16_model(build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=3, mlp_impl="triton"))
    check_bf16_model(build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=3))
