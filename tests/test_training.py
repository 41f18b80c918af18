"""Trainer: two-pass loss, exact resume, run directory, preemption, NaN stop, DDP equivalence."""

import json
import os
import signal

import gin
import pytest
import torch
from torch.utils.data import Dataset

from mdtzoo import config
from mdtzoo.models import build_model
from mdtzoo.registry import DATASETS
from mdtzoo.training import NonFiniteLossError, RunFinishedError, train
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training.objective import DiffusionObjective, token_weight_map


class Toy(Dataset):
    """8x8 RGB: a class-coloured square on noise; deterministic per (seed, epoch, index)."""

    def __init__(self, split="train", size=96, seed=0):
        self.split, self.size, self.seed, self.epoch = split, size if split == "train" else 16, seed, 0
        self.num_classes, self.image_size, self.channels, self.name = 3, 8, 3, "toy"

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        offset = 0 if self.split == "train" else 10_000
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (i + offset) * 31 + self.epoch)
        y = (i + offset) % 3
        x = 0.1 * torch.randn(3, 8, 8, generator=g)
        x[y, 2:6, 2:6] += 0.8
        return x.clamp(-1, 1), torch.tensor(y)


@pytest.fixture
def toy():
    with DATASETS.temporary("toy", Toy):
        yield


def setup_gin(run_dir, model="mdt_xs2", **train_kwargs):
    bindings = [f"build.model = @models.{model}", f"train.run_dir = '{run_dir}'", "train.dataset = 'datasets.toy'",
                "train.progress = False", "train.log_every = 1"]
    defaults = dict(steps=6, global_batch=8, lr=1e-3, ema_decay=0.9, ckpt_every=3)
    for k, v in {**defaults, **train_kwargs}.items():
        bindings.append(f"train.{k} = {v!r}")
    config.parse([], bindings)


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == "train"]


def test_run_directory_contents(toy, tmp_path):
    run = tmp_path / "run"
    setup_gin(run, heldout_every=3, sample_every=6, sample_count=3, sample_respacing="5")
    result = train()
    assert result == {"status": "done", "step": 6, "run_dir": str(run)}
    assert (run / "DONE").read_text().strip() == "step 6"
    assert "train.dataset = 'datasets.toy'" in (run / "config.gin").read_text()
    assert "models.mdt_xs2" in (run / "operative_config.gin").read_text()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    assert (run / "samples" / "step_00000006.png").is_file()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "full_mse", "full_vb", "masked_mse", "masked_vb", "lr", "grad_norm", "img_per_sec"):
        assert all(key in r for r in train_records), key
    for r in train_records:  # the two-pass loss is the sum of the passes
        assert r["loss"] == pytest.approx(r["full_loss"] + r["masked_loss"], rel=1e-5)
    heldout = [r for r in records if r["kind"] == "heldout"]
    assert [r["step"] for r in heldout] == [3, 6] and all(r["heldout_vb"] > 0 for r in heldout)
    state = ckpt.load(run / "checkpoints" / "ckpt_00000006.pt")
    assert state["step"] == 6 and set(state) >= {"model", "ema", "optimizer", "config"}
    with pytest.raises(RunFinishedError, match="never overwritten"):
        train()


def test_resume_is_bit_exact_after_a_crash(toy, tmp_path, monkeypatch):
    setup_gin(tmp_path / "full")
    train()
    reference = train_losses(tmp_path / "full")

    # Crash during step 5 (after the step-3 checkpoint): the run dies without saving.
    original = DiffusionObjective.forward

    def crash(self, x0, y, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(self, x0, y, step, *args, **kwargs)

    setup_gin(tmp_path / "crashed")
    monkeypatch.setattr(DiffusionObjective, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(DiffusionObjective, "forward", original)
    # A checkpoint write killed half-way leaves only a temporary file, which resume ignores.
    (tmp_path / "crashed" / "checkpoints" / ".ckpt_00000005.pt.junk.tmp").write_bytes(b"partial")
    assert len(train_losses(tmp_path / "crashed")) == 4
    setup_gin(tmp_path / "crashed")
    assert train()["status"] == "done"
    assert train_losses(tmp_path / "crashed") == reference  # bit for bit


def test_preemption_signal_checkpoints_and_resumes(toy, tmp_path, monkeypatch):
    setup_gin(tmp_path / "full", ckpt_every=100)
    train()
    setup_gin(tmp_path / "pre", ckpt_every=100)
    original = DiffusionObjective.forward

    def preempt(self, x0, y, step, *args, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, x0, y, step, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "forward", preempt)
    result = train()
    monkeypatch.setattr(DiffusionObjective, "forward", original)
    assert result["status"] == "preempted" and result["step"] == 3
    assert (tmp_path / "pre" / "checkpoints" / "ckpt_00000003.pt").is_file()
    assert not (tmp_path / "pre" / "DONE").exists()
    setup_gin(tmp_path / "pre", ckpt_every=100)
    assert train() == {"status": "done", "step": 6, "run_dir": str(tmp_path / "pre")}
    assert train_losses(tmp_path / "pre") == train_losses(tmp_path / "full")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(toy, tmp_path, monkeypatch):
    setup_gin(tmp_path / "nan")
    original = DiffusionObjective.forward

    def poison(self, x0, y, step, *args, **kwargs):
        out = original(self, x0, y, step, *args, **kwargs)
        if step == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DiffusionObjective, "forward", poison)
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        train()
    assert "at step 5" in (tmp_path / "nan" / "FAILED").read_text()
    assert ckpt.latest_checkpoint(tmp_path / "nan" / "checkpoints").name == "ckpt_00000003.pt"


@pytest.mark.parametrize("bad_step, last_run, last_ckpt", [(7, 8, 6), (6, 6, 3)])
def test_a_nan_loss_read_a_step_late_still_stops_before_the_next_checkpoint(toy, tmp_path, monkeypatch, bad_step,
                                                                           last_run, last_ckpt):
    """The trainer reads each step's loss one step later (no wait on the GPU per step); with no log line
    between, a non-finite loss at step 7 stops the run in step 8, before its update, and one at step 6 -- a
    checkpoint step -- before that checkpoint is written. Either way the message names the bad step."""
    setup_gin(tmp_path / "late", steps=12, log_every=100)
    original = DiffusionObjective.forward
    ran = []

    def poison(self, x0, y, step, *args, **kwargs):
        ran.append(step + 1)
        out = original(self, x0, y, step, *args, **kwargs)
        if step == bad_step - 1:  # 0-based inside the step
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(DiffusionObjective, "forward", poison)
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step};"):
        train()
    assert max(ran) == last_run
    assert ckpt.latest_checkpoint(tmp_path / "late" / "checkpoints").name == f"ckpt_{last_ckpt:08d}.pt"


def test_deferred_checks_hand_back_every_step_in_order_through_the_ring():
    from mdtzoo.training.loop import _DeferredCheck

    checks = _DeferredCheck(torch.device("cpu"))
    seen = []
    for step in range(1, 8):  # more steps than the ring's slots between two reads of everything
        checks.push(step, torch.tensor([float(step), step % 2]))
    seen += checks.previous()
    assert [at for at, _ in seen] == [1, 2, 3, 4, 5, 6]
    seen += checks.current()
    assert [(at, v.tolist()) for at, v in seen] == [(k, [float(k), float(k % 2)]) for k in range(1, 8)]
    assert checks.previous() == [] and checks.current() == []


def test_a_different_config_cannot_resume_a_run(toy, tmp_path):
    setup_gin(tmp_path / "r", steps=3)
    train()
    (tmp_path / "r" / "DONE").unlink()
    setup_gin(tmp_path / "r", steps=3, lr=5e-4)
    with pytest.raises(ValueError, match="different config"):
        train()


def test_dit_trains_with_the_full_pass_only(toy, tmp_path):
    setup_gin(tmp_path / "dit", model="dit_xs2", steps=2)
    train()
    record = [json.loads(line) for line in open(tmp_path / "dit" / "metrics.jsonl")][0]
    assert "full_loss" in record and "masked_loss" not in record
    setup_gin(tmp_path / "dit2", model="dit_xs2", steps=2, passes="both")
    with pytest.raises(ValueError, match="no side-interpolator"):
        train()


def final_weights(run_dir, step):
    return ckpt.load(os.path.join(run_dir, "checkpoints", f"ckpt_{step:08d}.pt"))["model"]


def assert_same_weights(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_gradient_accumulation_gives_the_same_update(toy, tmp_path):
    # The same global batch in 1 or 4 micro-batches: the same update, up to float summation order.
    setup_gin(tmp_path / "one", steps=3)
    train()
    setup_gin(tmp_path / "four", steps=3, micro_batch=2)
    train()
    assert_same_weights(final_weights(tmp_path / "one", 3), final_weights(tmp_path / "four", 3), atol=1e-5)
    setup_gin(tmp_path / "other_seed", steps=3, seed=1)
    train()
    with pytest.raises(AssertionError):  # the comparison can fail: another seed trains differently
        assert_same_weights(final_weights(tmp_path / "one", 3), final_weights(tmp_path / "other_seed", 3), 1e-5)


def test_separate_pass_backward_gives_the_joint_update(toy, tmp_path):
    # Backpropagating MDT's full and masked pass in turn (default) = one backward of their sum;
    # activation checkpointing recomputes the same activations.
    setup_gin(tmp_path / "joint", steps=3, separate_passes=False)
    train()
    setup_gin(tmp_path / "separate", steps=3, activation_checkpointing=True)
    train()
    assert_same_weights(final_weights(tmp_path / "joint", 3), final_weights(tmp_path / "separate", 3), atol=1e-6)
    assert train_losses(tmp_path / "separate") == pytest.approx(train_losses(tmp_path / "joint"), rel=1e-6)


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_training import Toy, setup_gin
from mdtzoo.registry import DATASETS
from mdtzoo.training import train
DATASETS.add("toy", Toy)
setup_gin({run!r}, steps=3)
print(train())
"""


def test_ddp_on_two_cpu_processes_matches_one_process(toy, tmp_path):
    import subprocess
    import sys

    setup_gin(tmp_path / "single", steps=3)
    train()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), run=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "single", 3), final_weights(tmp_path / "ddp", 3), atol=1e-5)
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-5)


DDP_PREEMPT_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_training import Toy, setup_gin
from mdtzoo.registry import DATASETS
from mdtzoo.training import train
from mdtzoo.training.objective import DiffusionObjective
DATASETS.add("toy", Toy)
original = DiffusionObjective.forward
def forward(self, x0, y, step, *args, **kwargs):
    if step == 2 and os.environ["RANK"] == "1" and kwargs.get("part") == "full":
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's signal, to one rank only
    return original(self, x0, y, step, *args, **kwargs)
DiffusionObjective.forward = forward
setup_gin({run!r}, steps=8, ckpt_every=100, log_every=100)
status = train()["status"]
with open(os.path.join({out!r}, "status_" + os.environ["RANK"]), "w") as f:  # (the ranks' stdout interleaves)
    f.write(status)
"""


def test_ddp_ranks_stop_together_when_one_is_preempted(toy, tmp_path):
    """One rank gets the preemption signal in step 3. The all-reduced flag is read one step later on
    every rank (the trainer does not wait for each step), so both stop after step 4, checkpoint it
    together, and neither waits in a collective the other never enters."""
    import subprocess
    import sys

    script = tmp_path / "ddp_preempt.py"
    script.write_text(DDP_PREEMPT_SCRIPT.format(tests=os.path.dirname(__file__), run=str(tmp_path / "ddp"),
                                                out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29733", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"status_{rank}").read_text() for rank in (0, 1)] == ["preempted", "preempted"]
    records = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "preempted"] == [4]
    assert ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints").name == "ckpt_00000004.pt"


def test_two_pass_loss_is_the_sum_of_the_passes():
    from mdtzoo.diffusion import build_diffusion

    model = build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    diffusion = build_diffusion()
    x0, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    both = DiffusionObjective(model, diffusion, "both", seed=1)(x0, y, step=7)
    halves = [DiffusionObjective(model, diffusion, "both", seed=1)(x0[i:i + 2], y[i:i + 2], 7, i, 4) for i in (0, 2)]
    torch.testing.assert_close((halves[0]["loss"] + halves[1]["loss"]) / 2, both["loss"], rtol=1e-5, atol=0)
    full = DiffusionObjective(model, diffusion, "full", seed=1)(x0, y, step=7)
    masked = DiffusionObjective(model, diffusion, "masked", seed=1)(x0, y, step=7)
    torch.testing.assert_close(both["loss"], full["loss"] + masked["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(both["full_loss"], full["loss"], rtol=0, atol=0)
    removed = DiffusionObjective(model, diffusion, "masked", "removed", seed=1)(x0, y, step=7)
    assert not torch.allclose(removed["loss"], masked["loss"])


def test_token_weight_map():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    w = token_weight_map(mask, (2, 2), 2)
    assert w.shape == (1, 1, 4, 4)
    assert w[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_conflicting_model_shape_binding_is_an_error(toy, tmp_path):
    setup_gin(tmp_path / "c")
    gin.parse_config("build.input_size = 32")
    with pytest.raises(config.ConfigError, match="dataset 'toy' has input_size 8"):
        train()


def test_ema_update_and_warmup():
    from mdtzoo.training.ema import EMA

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(1)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.1))  # 0.9 * 0 + 0.1 * 1
    warm = EMA(torch.nn.Linear(2, 1), decay=0.9999, warmup=True)
    assert warm.decay_at(1) == pytest.approx(2 / 11) and warm.decay_at(10**7) == 0.9999


def test_prune_keeps_the_newest_and_the_keep_every_steps(tmp_path):
    for step in (100, 200, 300, 400, 500):
        ckpt.atomic_save({"model": {}, "step": step}, ckpt.checkpoint_path(tmp_path, step))
    ckpt.prune(tmp_path, keep=1, keep_every=200)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [200, 400, 500]


def test_cuda_graph_compile_mode_marks_every_step(toy, tmp_path, monkeypatch):
    """train.compile = 'reduce-overhead': the blocks are compiled with that mode and every step
    begins with cudagraph_mark_step_begin (else CUDA-graph replays overwrite live outputs); the
    compilation itself is stubbed here (it is timed on a GPU: docs/performance.md); the loss maths
    is compiled once."""
    from mdtzoo.diffusion import GaussianDiffusion

    modes, marks, losses = [], [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: modes.append((type(self), options)))
    monkeypatch.setattr(GaussianDiffusion, "compile_losses", lambda self, device: losses.append(str(device)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    setup_gin(tmp_path / "run", steps=4, compile="reduce-overhead")
    assert train()["status"] == "done"
    # every block (encoder, decoder, side-interpolator), the timestep embedder and the final layer
    # compiled once, in the asked mode, static shapes
    assert all(m == {"dynamic": False, "mode": "reduce-overhead"} for _, m in modes)
    kinds = [kind.__name__ for kind, _ in modes]
    assert kinds.count("Block") >= 3 and kinds.count("TimestepEmbedder") == kinds.count("FinalLayer") == 1
    assert len(marks) == 4
    assert losses == ["cpu"]  # the loss maths compiled too (in the default mode)


def test_unknown_compile_mode_fails_before_the_run_dir_exists(toy, tmp_path):
    run = tmp_path / "run"
    setup_gin(run, compile="fast")
    with pytest.raises(ValueError, match="torch.compile mode .*reduce-overhead.*got 'fast'"):
        train()
    assert not run.exists()


def test_stacks_compile_scope_compiles_each_stack_as_one_region(toy, tmp_path, monkeypatch):
    """train.compile_scope = 'stacks': the encoder's blocks and the decoder's as one compiled region
    each (the model an argument), the side-interpolator's blocks one by one, the input embedding and the
    interpolator's pieces around its blocks as regions of their own; compilation stubbed
    (its equivalence with eager: tests/test_models.py). An unknown scope fails before the run dir."""
    from mdtzoo.diffusion import GaussianDiffusion
    from mdtzoo.interp.side import _GLUE as INTERP_GLUE
    from mdtzoo.models.transformer import _GLUE, _STACKS

    modules, functions = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: modules.append(type(self).__name__))
    monkeypatch.setattr(torch, "compile", lambda fn, **options: functions.append((fn, options)) or fn)
    monkeypatch.setattr(GaussianDiffusion, "compile_losses", lambda self, device: None)
    setup_gin(tmp_path / "run", steps=2, compile=True, compile_scope="stacks")
    assert train()["status"] == "done"
    stacks = [_GLUE["embed"], _STACKS["encode"], _STACKS["decode"], INTERP_GLUE["fill"], INTERP_GLUE["shortcut"]]
    assert functions == [(fn, {"dynamic": False}) for fn in stacks]
    interp_blocks = len(build_model("mdt_xs2").interp.blocks)
    assert sorted(modules) == sorted(["Block"] * interp_blocks + ["TimestepEmbedder", "FinalLayer"])
    run = tmp_path / "bad"
    setup_gin(run, compile=True, compile_scope="model")
    with pytest.raises(ValueError, match="unknown compile scope 'model'; valid: blocks, stacks"):
        train()
    assert not run.exists()


@pytest.mark.parametrize("update, optimizer, message", [
    ("fast", "adamw", "unknown update mode 'fast'; valid: auto, fused, op_by_op"),
    ("fused", "adamw", "runs on CUDA .*the parameters are on cpu"),
    ("fused", "adan", "update mode 'fused' runs AdamW only; train.optimizer is 'adan'")])
def test_a_bad_update_mode_fails_before_the_run_dir_exists(toy, tmp_path, monkeypatch, update, optimizer, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")  # without triton 'fused' fails earlier, saying so
    run = tmp_path / "run"
    setup_gin(run, update=update, optimizer=optimizer)
    with pytest.raises(ValueError, match=message):
        train()
    assert not run.exists()


def test_grad_norm_without_a_clip_leaves_gradients_untouched_and_equals_clip_grad_norm():
    from mdtzoo.training.loop import grad_norm_

    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False)]
    for layer in layers:
        layer(torch.randn(4, layer.in_features)).square().sum().backward()
    params = [p for layer in layers for p in layer.parameters()]
    before = [p.grad.clone() for p in params]
    expected = torch.cat([g.flatten() for g in before]).norm()
    norm = grad_norm_(params)
    assert torch.allclose(norm, expected, rtol=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))  # no rescaling pass
    clipped = grad_norm_(params, max_norm=0.5 * expected.item())  # with a bound: clip_grad_norm_
    assert torch.allclose(clipped, expected, rtol=1e-6)
    after = torch.cat([p.grad.flatten() for p in params]).norm()
    assert torch.allclose(after, 0.5 * expected, rtol=1e-4)
    assert float(grad_norm_([torch.nn.Parameter(torch.ones(2))])) == 0.0  # no gradients yet


def test_backward_parts_holds_gradients_after_every_backward_but_the_steps_last():
    """``hold`` (the fused update's ``hold_grads``) runs after each backward of a step except its last
    (``sync`` marks the last micro-batch), and never under DDP, whose all-reduce reads .grad."""
    import contextlib as ctx

    from mdtzoo.training.objective import backward_parts

    w = torch.nn.Parameter(torch.ones(3))

    class StepFn:
        def __call__(self, part):
            return {"loss": (w * (2.0 if part == "full" else 3.0)).sum()}

        def no_sync(self):
            return ctx.nullcontext()

    for parts, sync, world, expected in ((["full", "masked"], True, 1, 1), (["full", "masked"], False, 1, 2),
                                         (["all"], True, 1, 0), (["all"], False, 1, 1),
                                         (["full", "masked"], True, 2, 0)):
        calls = []
        w.grad = None
        out = backward_parts(StepFn(), parts, (), ctx.nullcontext(), sync=sync, world=world,
                             hold=lambda: calls.append(1))
        assert len(calls) == expected, (parts, sync, world)
        assert out["loss"].item() == pytest.approx(3.0 * sum(2.0 if p == "full" else 3.0 for p in parts))
    assert torch.equal(w.grad, torch.full((3,), 5.0))  # nothing held by the stub: autograd summed both parts


@pytest.mark.parametrize("bindings, message", [
    ({}, "graph_step: it needs CUDA, and the device is cpu"),
    ({"micro_batch": 4, "compile": "reduce-overhead"},
     "it needs CUDA.*accumulates 2 .*compile mode 'reduce-overhead' replays its own CUDA graphs"),
    ({"update": "op_by_op", "_device_ok": True}, "graph_step needs the fused update .*update 'op_by_op'"),
    ({"optimizer": "adan", "_device_ok": True}, "graph_step needs the fused update .*optimizer 'adan'"),
    ({"_jitter": True, "_device_ok": True}, "RandomJitterMasking.*keeps a different number of tokens"),
])
def test_a_graph_step_it_cannot_run_fails_before_the_run_dir_exists(toy, tmp_path, monkeypatch, bindings, message):
    """train.graph_step's needs (training.graph_step), each named before the run directory is made;
    '_device_ok' lets the later checks be reached on this CPU."""
    from mdtzoo.training import loop

    bindings = dict(bindings)
    if bindings.pop("_device_ok", False):
        monkeypatch.setattr(loop, "check_graph_step", lambda *args: None)
    jitter = bindings.pop("_jitter", False)
    run = tmp_path / "run"
    setup_gin(run, graph_step=True, **bindings)
    if jitter:
        gin.bind_parameter("models.mdt_xs2.masking", gin.config.ConfigurableReference("masking.random_jitter", True))
    with pytest.raises(ValueError, match=message):
        train()
    assert not run.exists()


def test_the_cublaslt_mlp_trains_as_the_torch_mlp(toy, tmp_path, monkeypatch):
    """models.X.mlp_impl = 'cublaslt' reaches every block through gin; off CUDA its ops are torch's
    maths, so the losses are the default MLP's up to float32 rounding."""
    from mdtzoo.models import lt_mlp

    calls = []
    real = lt_mlp.linear_gelu
    monkeypatch.setattr(lt_mlp, "linear_gelu", lambda *a: calls.append(1) or real(*a))
    losses = {}
    for impl in ("torch", "cublaslt"):
        setup_gin(tmp_path / impl, steps=3)
        gin.bind_parameter("models.mdt_xs2.mlp_impl", impl)
        train()
        losses[impl] = train_losses(tmp_path / impl)
        if impl == "torch":
            assert not calls
    assert len(calls) >= 3 * len(list(build_model("mdt_xs2").all_blocks()))  # every block, every step
    assert len(losses["torch"]) == 3
    torch.testing.assert_close(losses["cublaslt"], losses["torch"], rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bf16_weights, mlp_impl", [(False, "torch"), (True, "torch"), (True, "cublaslt")])
@pytest.mark.parametrize("model", ["mdt_xs2", "dit_s2"])
def test_a_captured_step_trains_and_resumes_bit_exactly_as_the_eager_one_on_cuda(toy, tmp_path, monkeypatch, model,
                                                                                  bf16_weights, mlp_impl):
    """On a GPU, train.graph_step (with and without train.bf16_weights; with the cuBLASLt MLP too):
    the logged losses are bitwise the eager trainer's with float32 weights and the same MLP (steps 1-2
    eager, then captured and replayed, with a linear warm-up changing the learning rate, a gradient
    clip, and checkpoints, held-out losses and samples between replays), and a run killed at step 5
    resumes from the step-3 checkpoint (two eager steps again, a new capture) to the same losses,
    held-out losses and final weights."""
    kw = dict(model=model, steps=8, warmup_steps=4, grad_clip=1.0, update="fused", device="cuda", heldout_every=3,
              sample_every=4, sample_count=2, sample_respacing="5")

    def configure(run, **bindings):  # setup_gin, and the blocks' MLP
        setup_gin(run, **bindings)
        gin.bind_parameter(f"models.{model}.mlp_impl", mlp_impl)

    configure(tmp_path / "eager", **kw)
    train()
    reference = train_losses(tmp_path / "eager")
    kw["bf16_weights"] = bf16_weights
    configure(tmp_path / "graph", graph_step=True, **kw)
    train()
    assert train_losses(tmp_path / "graph") == reference

    original = DiffusionObjective.draw  # a replayed step calls draw (the forward is in the graph)

    def crash(self, x0, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(self, x0, step, *args, **kwargs)

    configure(tmp_path / "crashed", graph_step=True, **kw)
    monkeypatch.setattr(DiffusionObjective, "draw", crash)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(DiffusionObjective, "draw", original)
    assert len(train_losses(tmp_path / "crashed")) == 4
    configure(tmp_path / "crashed", graph_step=True, **kw)
    assert train()["status"] == "done"
    assert train_losses(tmp_path / "crashed") == reference

    def heldout(run):  # (each record's wall-clock time apart)
        return [{k: v for k, v in r.items() if k != "time"}
                for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if r["kind"] == "heldout"]

    assert heldout("graph") == heldout("eager") and [r["step"] for r in heldout("graph")] == [3, 4, 6, 8]
    assert heldout("crashed") == heldout("eager")
    for key in ("model", "ema"):  # (with bf16 weights: their float32 masters)
        final = [ckpt.load(tmp_path / run / "checkpoints" / "ckpt_00000008.pt")[key] for run in ("eager", "crashed")]
        assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("bindings, message", [
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'; valid: adamw, adan"),
    ({"micro_batch": 3}, "global batch 8 must split evenly over 1 processes and then into micro-batches of 3"),
    ({"precision": "fp16"}, "precision must be 'bf16', 'fp32' or 'auto'; got 'fp16'"),
    ({"model": "dit_s2", "passes": "both"}, "passes='both' needs a masked pass, but this model has no side-interp"),
    ({"global_batch": 128}, "the dataset has 96 items, fewer than one global batch of 128"),
    ({"eval_every": 2, "eval_metrics": ("fid",)}, "train.eval_metrics takes run metrics .*'fid' is not one"),
])
def test_an_option_the_trainer_cannot_run_fails_before_the_run_dir_exists(toy, tmp_path, bindings, message):
    run = tmp_path / "run"
    setup_gin(run, **bindings)
    with pytest.raises(ValueError, match=message):
        train()
    assert not run.exists()


@pytest.mark.parametrize("bindings, message", [
    ({}, "bf16_weights: they need bf16 autocast, and the precision is 'fp32'"),  # ('auto' on the CPU)
    ({"precision": "bf16"}, "train.bf16_weights needs the fused update: FusedAdamWEMA runs on CUDA"),
    ({"precision": "bf16", "update": "op_by_op", "_fused_ok": True}, "they need the fused update .*'op_by_op'"),
    ({"precision": "bf16", "micro_batch": 4, "_fused_ok": True}, "one micro-batch per step \\(the 2 micro-batches"),
    ({"precision": "bf16", "separate_passes": False, "_fused_ok": True}, "they need separate passes"),
    ({"precision": "bf16", "hold_grads": False, "_fused_ok": True}, "they need held gradients"),
    ({"precision": "bf16", "_fused_ok": True, "_mlp": "triton"}, "cannot use mlp_impl 'triton'"),
])
def test_bf16_weights_it_cannot_run_fail_before_the_run_dir_exists(toy, tmp_path, monkeypatch, bindings, message):
    """train.bf16_weights's needs (training.bf16_weights), each named before the run directory is
    made; '_fused_ok' lets the later checks be reached on this CPU (the fused update's interpreter)."""
    bindings = dict(bindings)
    if bindings.pop("_fused_ok", False):
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # (read by the check; nothing runs a kernel here)
    mlp = bindings.pop("_mlp", None)
    run = tmp_path / "run"
    setup_gin(run, bf16_weights=True, **bindings)
    if mlp:
        gin.bind_parameter("models.mdt_xs2.mlp_impl", mlp)
    with pytest.raises(ValueError, match=message):
        train()
    assert not run.exists()


def test_bf16_weights_on_several_processes_are_refused_by_the_option_checks():
    from mdtzoo.training.loop import check_options

    options = dict(compile=False, compile_scope="blocks", update="auto", optimizer="adamw", precision="bf16",
                   graph_step=False, global_batch=8, micro_batch=None, device=torch.device("cuda"),
                   bf16_weights=True)
    check_options(world=1, **options)  # (a CUDA device need not exist to be checked)
    with pytest.raises(ValueError, match="bf16_weights: they run on one process .*this run has 2"):
        check_options(world=2, **options)


# Under Triton's interpreter (the fused update on the CPU), the trainer with train.bf16_weights:
# checkpoints, resume after a kill, the float32 masters in the checkpoint.
BF16_TRAINER = r'''
import json, sys
import gin
import torch
sys.path.insert(0, sys.argv[1])  # the tests' folder
import pytest
from test_training import Toy, setup_gin, train_losses
from mdtzoo.registry import DATASETS
from mdtzoo.training import checkpoint as ckpt, train
from mdtzoo.training import fused_update
from mdtzoo.training.objective import DiffusionObjective

fused_update.FusedAdamWEMA.__init__.__kwdefaults__["block"] = 1 << 16  # fewer programs for the interpreter
root = __import__("pathlib").Path(sys.argv[2])

def setup(run, **kwargs):  # (torch's norm maths: the interpreter would run the Triton norm too, slowly)
    setup_gin(root / run, **kwargs)
    gin.bind_parameter("models.mdt_xs2.norm_impl", "torch")

kw = dict(steps=5, ckpt_every=2, warmup_steps=3, grad_clip=1.0, precision="bf16", update="fused", device="cpu",
          heldout_every=2)
with DATASETS.temporary("toy", Toy):
    setup("fp32", **kw)
    train()
    setup("bf16", bf16_weights=True, **kw)
    train()
    original = DiffusionObjective.draw
    def crash(self, x0, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, x0, step, *args, **kwargs)
    DiffusionObjective.draw = crash
    setup("crashed", bf16_weights=True, **kw)
    with pytest.raises(KeyboardInterrupt):
        train()
    DiffusionObjective.draw = original
    assert len(train_losses(root / "crashed")) == 3
    setup("crashed", bf16_weights=True, **kw)
    assert train()["status"] == "done"

def records(run, kind):
    return [{k: v for k, v in r.items() if k not in ("time", "img_per_sec")}
            for r in map(json.loads, open(root / run / "metrics.jsonl")) if r["kind"] == kind]

assert records("bf16", "train") == records("fp32", "train")  # the autocast steps, bit for bit
assert records("crashed", "train") == records("bf16", "train")  # resumed exactly
assert records("bf16", "heldout") == records("fp32", "heldout") and len(records("bf16", "heldout")) == 3
assert records("crashed", "heldout") == records("bf16", "heldout")
final = {run: ckpt.load(root / run / "checkpoints" / "ckpt_00000005.pt") for run in ("fp32", "bf16", "crashed")}
for key in ("model", "ema"):  # float32 weights under the model's names, as without bf16 weights
    assert final["bf16"][key].keys() == final["fp32"][key].keys()
    for run in ("fp32", "crashed"):
        assert all(torch.equal(v, final[run][key][k]) for k, v in final["bf16"][key].items()), (key, run)
    assert {v.dtype for v in final["bf16"][key].values() if v.is_floating_point()} == {torch.float32}, key
moments = [[s[k] for s in final[run]["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq", "step")]
           for run in ("fp32", "bf16")]
assert len(moments[0]) == len(moments[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*moments))
# the checkpoint's Linear weights are the float32 masters, not their bfloat16 copies
weight = final["bf16"]["model"]["blocks.0.attn.qkv.weight"]
assert not torch.equal(weight, weight.bfloat16().float())
print("ok")
'''


def test_bf16_weights_train_checkpoint_float32_masters_and_resume_exactly(triton_interpreter, tmp_path):
    """train.bf16_weights under the fused update's CPU interpreter (bf16 autocast on the CPU): the
    logged losses and held-out losses are the run's without bf16 weights bit for bit (warm-up,
    clipping, checkpoints between steps), and so are its final checkpoint's model, EMA and AdamW
    moments -- float32 masters under the model's names; a run killed at step 4 resumes from step
    2's checkpoint to the same losses, held-out losses and final weights."""
    out = triton_interpreter(BF16_TRAINER, os.path.dirname(__file__), str(tmp_path))
    assert out.startswith("ok"), out
