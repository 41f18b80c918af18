"""The one-pass optimiser step (AdamW + EMA + grad norm, training/fused_update.py) against torch's ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdtzoo.training.ema import EMA
from mdtzoo.training.fused_update import OpByOpUpdate, check_update_mode, make_update, unsupported

# Run in a subprocess with TRITON_INTERPRET=1: the Triton kernel on CPU tensors.
INTERPRETER_CHECK = r'''
import copy
import torch
from torch import nn
from mdtzoo.training.ema import EMA
from mdtzoo.training.fused_update import FusedAdamWEMA, OpByOpUpdate, make_update

def make():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(37, 300), nn.GELU(), nn.Linear(300, 5))  # 11100 weights: 87 blocks of 128 and a rest
    m.register_buffer("count", torch.zeros(3))
    m.frozen = nn.Parameter(torch.randn(7), requires_grad=False)  # EMA-updated, not optimised
    return m

def optimiser(m):
    trained = [p for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": trained[:2]}, {"params": trained[2:], "weight_decay": 0.0}],
                             lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=False)

ref, fused = make(), make()
ref_opt, fused_opt = optimiser(ref), optimiser(fused)
ref_ema, fused_ema = EMA(ref, 0.9, warmup=True), EMA(fused, 0.9, warmup=True)
ref_up = OpByOpUpdate(ref_opt, ref_ema)
fused_up = make_update(fused_opt, fused_ema, "fused")
assert isinstance(fused_up, FusedAdamWEMA)
fused_up.block = 128  # several blocks per tensor, partial last blocks

def compare(tag):
    pairs = list(zip(ref.parameters(), fused.parameters())) + list(zip(ref_ema.model.parameters(), fused_ema.model.parameters()))
    pairs += list(zip(ref_ema.model.buffers(), fused_ema.model.buffers()))
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{tag}: {m}")
    ra, fa = ref_opt.state_dict()["state"], fused_opt.state_dict()["state"]
    assert ra.keys() == fa.keys(), tag
    for k in ra:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fa[k][key], ra[k][key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{tag} {key}: {m}")

moved = 0.0
for step in range(1, 7):
    x = torch.randn(8, 37)
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        if step in (2, 5):  # two backwards, the first into held gradients: held and .grad added in the kernel
            m[0](x).square().mean().backward()  # only the first layer's parameters: the rest .grad only
            if m is fused:
                fused_up.hold_grads()
                assert fused[0].weight.grad is None
                fused_up.hold_grads()  # a second call while holding: nothing moves
            m(x).square().mean().backward()
        elif step == 3:  # the second backward reaches only the first layer: the rest held only
            m(x).square().mean().backward()
            if m is fused:
                fused_up.hold_grads()
            m[0](x).sum().backward()
        else:
            m(x).square().mean().backward()
        m.count += 1
        m.frozen.data += 0.5
    if step == 4:  # a parameter without a gradient: AdamW skips it, the EMA still moves
        ref[2].bias.grad = None
        fused[2].bias.grad = None
    for group in ref_opt.param_groups + fused_opt.param_groups:
        group["lr"] = 1e-2 / step  # a schedule changing the learning rate
    clip = 0.05 if step in (2, 5) else None
    n_ref, n_fused = ref_up.step(step, clip), fused_up.step(step, clip)
    torch.testing.assert_close(n_fused, n_ref, rtol=2e-6, atol=0)
    moved += float((fused[0].weight - fused_ema.model[0].weight).abs().max().detach())
    compare(f"step {step}")
    if step == 3:  # a resumed run: the optimiser state replaced by load_state_dict
        fused_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (a copy: .to() would share tensors)
assert ref_opt.state_dict()["state"][3]["step"].item() == 5  # the bias skipped at step 4
assert moved > 0
print("FUSED_OK")
'''


def test_fused_update_equals_adamw_ema_and_clip_in_the_interpreter(triton_interpreter):
    """Six steps of FusedAdamWEMA (Triton's CPU interpreter) equal torch.optim.AdamW + EMA.update +
    clip_grad_norm_: parameters, EMA weights and buffers, optimiser state (step, exp_avg,
    exp_avg_sq), the returned norm -- with two param groups, learning-rate changes, clipping, a
    parameter without a gradient, a frozen parameter, a load_state_dict mid-run, and gradients of
    two backwards, the first held aside by ``hold_grads`` (held and fresh, held only, fresh only;
    with and without clipping)."""
    assert "FUSED_OK" in triton_interpreter(INTERPRETER_CHECK)


TRAINER_CHECK = r'''
import json, sys
import torch
from torch.utils.data import Dataset
from mdtzoo import config
from mdtzoo.registry import DATASETS
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training import train

class Squares(Dataset):
    num_classes, image_size, channels, name = 3, 8, 3, "squares"
    def __init__(self, split="train"):
        self.size = 24 if split == "train" else 8
    def set_epoch(self, epoch):
        pass
    def __len__(self):
        return self.size
    def __getitem__(self, i):
        x = 0.1 * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i))
        x[i % 3, 2:6, 2:6] += 0.8
        return x.clamp(-1, 1), torch.tensor(i % 3)

out = {}
micro = int(sys.argv[2])
with DATASETS.temporary("squares", Squares):
    for mode in ("op_by_op", "fused"):
        run = f"{sys.argv[1]}/{mode}"
        # the blocks on the torch maths: only the update kernel runs in the interpreter (the fused
        # norm kernels, the default on CUDA, would too, slowly; tests/test_triton_norm.py has them)
        config.parse([], ["build.model = @models.mdt_xs2", "models.mdt_xs2.norm_impl = 'torch'",
                          f"train.run_dir = '{run}'", "train.dataset = 'datasets.squares'",
                          "train.progress = False", "train.log_every = 1", "train.steps = 4", "train.global_batch = 8",
                          "train.lr = 1e-3", "train.ema_decay = 0.9", "train.ckpt_every = 4", "train.grad_clip = 0.5",
                          "train.weight_decay = 0.01", f"train.update = '{mode}'",
                          f"train.micro_batch = {micro}"])
        assert train()["status"] == "done"
        records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
        state = ckpt.load(ckpt.checkpoint_path(f"{run}/checkpoints", 4))
        out[mode] = ([(r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"], state)
(ref, ref_state), (fused, fused_state) = out["op_by_op"], out["fused"]
assert len(ref) == len(fused) == 4
for a, b in zip(ref, fused):
    assert abs(a[0] - b[0]) <= 1e-5 * abs(a[0]) and abs(a[1] - b[1]) <= 1e-5 * abs(a[1]), (a, b)
for part in ("model", "ema"):
    for k, v in ref_state[part].items():
        torch.testing.assert_close(fused_state[part][k], v, rtol=1e-5, atol=1e-6)
assert [s["step"] for s in fused_state["optimizer"]["state"].values()] == \
    [s["step"] for s in ref_state["optimizer"]["state"].values()]
print("TRAIN_OK")
'''


@pytest.mark.parametrize("micro_batch", [8, 4], ids=["one_micro_batch", "two_accumulated"])
def test_trainer_with_the_fused_update_equals_op_by_op_in_the_interpreter(triton_interpreter, tmp_path, micro_batch):
    """``train.update = 'fused'`` (the kernel in Triton's interpreter, the full pass's gradients
    held and added in the kernel) trains as 'op_by_op' does: the same losses and gradient norms
    per step and the same weights, EMA weights and optimiser step counts in the checkpoint (with
    clipping and weight decay on), also with two accumulated micro-batches (the first backward
    held, the other three accumulated by autograd)."""
    assert "TRAIN_OK" in triton_interpreter(TRAINER_CHECK, str(tmp_path), str(micro_batch))


def _model_opt_ema(optimizer=torch.optim.AdamW, **kwargs):
    model = nn.Linear(4, 3)
    return model, optimizer(model.parameters(), lr=1e-3, **kwargs), EMA(model, 0.99)


def test_make_update_picks_and_refuses_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, opt, ema = _model_opt_ema()
    assert isinstance(make_update(opt, ema, "auto"), OpByOpUpdate)  # CPU parameters: op by op
    assert isinstance(make_update(opt, ema, "op_by_op"), OpByOpUpdate)
    with pytest.raises(ValueError, match="unknown update mode 'fast'; valid: auto, fused, op_by_op"):
        make_update(opt, ema, "fast")
    if unsupported(opt, ema) is None:  # triton installed
        with pytest.raises(ValueError, match="runs on CUDA .* the parameters are on cpu"):
            make_update(opt, ema, "fused")
    _, sgd, ema2 = _model_opt_ema(torch.optim.SGD)
    assert unsupported(sgd, ema2) == "the optimiser is SGD, not torch.optim.AdamW"
    _, ams, ema3 = _model_opt_ema(amsgrad=True)
    assert unsupported(ams, ema3) == "AdamW option amsgrad=True"
    _, opt4, _ = _model_opt_ema()
    other = EMA(nn.Linear(4, 3), 0.99)  # the EMA of a different model
    assert unsupported(opt4, other) == "a parameter of shape (3, 4) has no EMA copy"
    storage = torch.zeros(13)  # a parameter starting 4 bytes into its storage: no 128-bit loads
    odd = nn.Parameter(storage[1:])
    assert unsupported(torch.optim.AdamW([odd]), EMA(nn.ParameterList([odd]), 0.99)).endswith("not 16-byte aligned")
    with pytest.raises(ValueError, match="update mode 'fused' runs AdamW only; train.optimizer is 'adan'"):
        check_update_mode("fused", torch.device("cpu"), "adan")


def test_op_by_op_update_returns_the_norm_before_clipping_and_clips():
    torch.manual_seed(0)
    model, opt, ema = _model_opt_ema()
    model(torch.randn(5, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.cat([g.flatten() for g in grads]).norm()
    before = [p.detach().clone() for p in model.parameters()]
    norm = OpByOpUpdate(opt, ema).step(1, max_norm=float(expected) / 4)
    torch.testing.assert_close(norm, expected)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g * (float(expected) / 4) / (float(expected) + 1e-6))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    torch.testing.assert_close(ema.model.weight, 0.99 * before[0] + 0.01 * model.weight.detach())


# The update as a captured step replays it: the host side once (``prepare_launches``), then per step
# only ``before_replay`` (scalars to device buffers) and ``launch`` (device work), the gradients
# rewritten in place between steps. Must equal ``step()`` with the same gradients and schedule.
REPLAY_CHECK = r'''
import torch
from torch import nn
from mdtzoo.training.ema import EMA
from mdtzoo.training.fused_update import make_update

def make():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(9, 40), nn.Tanh(), nn.Linear(40, 3))
    m.frozen = nn.Parameter(torch.randn(5), requires_grad=False)  # the EMA-only lerp reads the device weight
    return m

runs = []
for replay in (False, True):
    m = make()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=False)
    ema = EMA(m, 0.9, warmup=True)
    up = make_update(opt, ema, "fused")
    up.block = 64
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9)
    m(x).square().mean().backward()  # gradient tensors that stay in place, as a graph's do
    m[0].weight.grad = torch.zeros(9, 40).t()  # a transposed view: the kernel reads a copy of it
    trained = [p for p in m.parameters() if p.grad is not None]
    grads = [p.grad for p in trained]
    launches = None
    norms = []
    for step in range(1, 6):
        for g in grads:
            g.copy_(torch.randn(g.shape, generator=gen))
        for group in opt.param_groups:
            group["lr"] = 1e-2 / step  # a schedule: every step's scalars differ
        m.frozen.data += 0.5
        if not replay:
            norms.append(up.step(step))
            continue
        if launches is None:
            launches = up.prepare_launches()
        up.before_replay(step)
        norms.append(up.launch(launches))
    runs.append([t.detach().clone() for t in list(m.parameters()) + list(ema.model.parameters())]
                + [torch.stack(norms)] + [opt.state[p]["exp_avg_sq"].clone() for p in trained]
                + [opt.state[p]["step"].clone() for p in trained])
for a, b in zip(*runs):
    assert torch.equal(a, b), (a, b)
print("REPLAY_OK")
'''


def test_prepared_launches_replayed_equal_eager_steps_in_the_interpreter(triton_interpreter):
    """``prepare_launches`` once, then ``before_replay`` + ``launch`` per step (how a captured update
    runs) gives bitwise the same parameters, EMA (frozen parameter included), optimiser state and
    norms as ``step()`` over five steps with a changing learning rate and gradients rewritten in
    place, one of them a transposed view: the kernels read each step's scalars from the device
    buffers and each step's copy of that gradient, not the values of the step the launches were
    prepared at."""
    assert "REPLAY_OK" in triton_interpreter(REPLAY_CHECK)
