"""The captured training step's CPU-testable parts (training/graph_step.py): the objective's draws
taken out of its forward, the checks that refuse settings a captured step cannot run, and the
copies into the captured inputs. The capture itself needs CUDA: ``bench train-step --graph-step``
compares replayed steps with eager ones before it times anything (``graph_check``)."""

from __future__ import annotations

import pytest
import torch

from mdtzoo.diffusion import build_diffusion
from mdtzoo.masking.base import MaskOut
from mdtzoo.models import build_model
from mdtzoo.training.graph_step import StepGraph, _copy, check_fixed_keep, check_graph_step
from mdtzoo.training.objective import DiffusionObjective


def _model(name: str, **kw):
    torch.manual_seed(0)
    model = build_model(name, input_size=8, in_channels=3, num_classes=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("name,passes,part", [
    ("mdt_xs2", "both", "all"), ("mdt_xs2", "both", "full"), ("mdt_xs2", "both", "masked"),
    ("mdt_xs2", "masked", "all"), ("mdt_xs2", "masked", "masked"), ("dit_s2", "full", "all"), ("dit_s2", "full", "full"),
])
def test_forward_with_drawn_draws_equals_forward_drawing(name, passes, part):
    """forward(draws=draw(...)) is bitwise forward(step) for every pass set and part, on a
    micro-batch's rows of a global batch; gradients too."""
    model = _model(name)
    objective = DiffusionObjective(model, build_diffusion(), passes, seed=3)
    x0, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    runs = []
    for drawn in (False, True):
        model.zero_grad(set_to_none=True)
        draws = objective.draw(x0, 11, 2, 4, part) if drawn else None
        out = objective(x0, y, 11, 2, 4, part=part, draws=draws)
        out["loss"].backward()
        runs.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = runs
    assert a.keys() == b.keys() and len(ga) == len(gb) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, z in zip(ga, gb):
        assert torch.equal(x, z)


def test_draws_depend_on_step_and_rows_and_name_their_parts():
    model = _model("mdt_xs2")
    objective = DiffusionObjective(model, build_diffusion(), "both", seed=3)
    x0 = torch.randn(4, 3, 8, 8)
    full = objective.draw(x0, 5, 0, 4)
    assert set(full) == {"t", "full_noise", "full_drop", "masked_noise", "masked_drop", "mask"}
    assert isinstance(full["mask"], MaskOut) and full["full_noise"].shape == x0.shape
    rows = objective.draw(x0[:2], 5, 2, 4)  # rows 2..3 of the same global draw
    assert torch.equal(rows["full_noise"], full["full_noise"][2:]) and torch.equal(rows["t"], full["t"][2:])
    assert torch.equal(rows["mask"].ids_shuffle, full["mask"].ids_shuffle[2:])
    assert not torch.equal(objective.draw(x0, 6, 0, 4)["full_noise"], full["full_noise"])
    assert set(objective.draw(x0, 5, part="full")) == {"t", "full_noise", "full_drop"}
    with pytest.raises(ValueError, match="part must be"):
        objective.draw(x0, 5, part="both")
    with pytest.raises(ValueError, match=r"draws lacks \['masked_noise', 'masked_drop', 'mask'\] for part 'masked'"):
        objective(x0, torch.zeros(4, dtype=torch.long), 5, part="masked", draws=objective.draw(x0, 5, part="full"))


def test_check_graph_step_names_every_problem():
    check_graph_step(torch.device("cuda", 0), 1, 1, True)  # (a check of the settings only: no GPU touched)
    with pytest.raises(ValueError) as err:
        check_graph_step(torch.device("cpu"), 2, 4, "reduce-overhead")
    message = str(err.value)
    for part in ("needs CUDA", "one process", "accumulates 4", "micro-batch the per-GPU batch", "'reduce-overhead'"):
        assert part in message, (part, message)


def test_check_fixed_keep_refuses_a_varying_kept_count():
    check_fixed_keep(_model("mdt_xs2"))  # random masking at a fixed ratio: one count
    check_fixed_keep(_model("dit_s2"))  # no masked pass
    with pytest.raises(ValueError, match=r"RandomJitterMasking.*keeps a different number of tokens"):
        check_fixed_keep(_model("mdt_xs2", masking="random_jitter"))


def test_copy_into_captured_inputs_refuses_another_shape():
    static = torch.zeros(2, 3)
    _copy("x0", static, torch.ones(2, 3))
    assert torch.equal(static, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"'x0' is \(3, 3\).*captured step's \(2, 3\)"):
        _copy("x0", static, torch.ones(3, 3))
    mask = MaskOut(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), 3)
    other = MaskOut(mask.ids_shuffle, mask.ids_restore, mask.mask, 2)
    with pytest.raises(ValueError, match="keeps 2 tokens, the captured step 3"):
        _copy("mask", mask, other)
    with pytest.raises(ValueError, match="was absent"):
        _copy("full_drop", None, torch.zeros(2, dtype=torch.bool))


def test_step_graph_needs_the_fused_update():
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.fused_update import OpByOpUpdate

    model = _model("dit_s2")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="needs the fused update.*OpByOpUpdate"):
        StepGraph(None, None, ["all"], OpByOpUpdate(opt, EMA(model)), None)


class _Counted:
    """OpByOpUpdate with the step-count mirror ``graph_check`` restores (torch's AdamW keeps none)."""

    def __init__(self, opt, ema):
        from mdtzoo.training.fused_update import OpByOpUpdate

        self.inner, self.opt = OpByOpUpdate(opt, ema), opt

    def step(self, ema_step):
        return self.inner.step(ema_step)

    def step_counts(self):
        return {}

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def set_step_counts(self, counts):
        pass


def _check_setup():
    from mdtzoo.training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ema = EMA(model, 0.9, warmup=True)
    updater = _Counted(opt, ema)
    inputs = [torch.randn(5, 6, generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def one(step, lr=1e-2, stale=False, keep_grads=False):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(inputs[0 if stale else step]).square().mean()
        loss.backward()
        norm = updater.step(step + 1)
        if not keep_grads:  # a replayed step leaves its gradients in .grad
            opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}, norm

    one(0)  # AdamW's state exists before the check, as after a benchmark's warm-up
    return model, opt, ema, updater, one


@pytest.mark.parametrize("fault", [None, "kept_grads", "lr", "stale"])
def test_graph_check_passes_the_same_steps_and_names_a_stale_input_or_scalar(fault):
    """graph_check on the CPU with an eager 'replay': the same steps pass, bitwise, with the eager
    run against itself beside them, also when the 'replay' leaves its gradients in .grad as a CUDA
    graph's does (the eager run after it must not add to them: session 15's first GPU check failed
    so); a replay that kept an old learning rate (changes 2x as large) or an old batch (other
    losses) fails, naming what differs."""
    from mdtzoo.training.graph_step import GraphCheckError, graph_check

    model, opt, ema, updater, one = _check_setup()

    def run_steps(eager):
        if eager or fault is None:
            return [one(s) for s in (1, 2)]
        if fault == "kept_grads":
            return [one(1), one(2, keep_grads=True)]  # a replay overwrites them, and the last one stays
        return [one(s, lr=2e-2) if fault == "lr" else one(s, stale=True) for s in (1, 2)]

    if fault in (None, "kept_grads"):
        result = graph_check(run_steps, model, opt, ema, updater)
        assert result["values_rel_diff"] == {"graphed": 0.0, "eager_again": 0.0}
        assert all(c["bitwise"] and c["ratio"] == 1.0 for c in result["graphed"].values())
        assert set(result["graphed"]) == {"params", "ema", "exp_avg", "exp_avg_sq", "step"}
        assert set(result["graphed"]["params"]["worst"].values()) == {0.0}
        return
    match = r"params changed 1\.9\d*x as much replayed" if fault == "lr" else "losses or gradient norms differ"
    with pytest.raises(GraphCheckError, match=match) as err:
        graph_check(run_steps, model, opt, ema, updater)
    if fault == "lr":  # every parameter changed about twice as much: each differs by about its own change
        worst = err.value.result["graphed"]["params"]["worst"]
        assert set(worst) == {n for n, _ in model.named_parameters()}, worst
        assert all(0.5 < r < 1.5 for r in worst.values()), worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["mdt_xs2", "dit_s2"])
def test_captured_step_agrees_with_the_eager_step_on_cuda(name):
    """On a GPU: a small model's step captured (``StepGraph``) and replayed passes ``graph_check``
    against the same steps run eagerly, and its replays keep training (the loss is finite)."""
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.fused_update import make_update
    from mdtzoo.training.graph_step import GRAPH_WARMUP, StepGraph, graph_check
    from mdtzoo.training.objective import backward_parts, prepare_step

    dev = torch.device("cuda")
    model = _model(name).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ema = EMA(model, 0.999, warmup=True)
    updater = make_update(opt, ema, "fused")
    objective = DiffusionObjective(model, build_diffusion(), "both" if model.interp is not None else "full", seed=1)
    step_fn, parts = prepare_step(objective, dev)
    hold = updater.hold_grads
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    graph = StepGraph(objective, step_fn, parts, updater, autocast, hold=hold)
    x0, y = torch.randn(8, 3, 8, 8, device=dev), torch.randint(0, 3, (8,), device=dev)

    def one(step, eager=False):
        if step >= GRAPH_WARMUP and not eager:
            return graph(x0, y, step)
        out = backward_parts(step_fn, parts, (x0, y, step), autocast, hold=hold)
        norm = updater.step(step + 1)
        opt.zero_grad(set_to_none=True)
        return out, norm

    for step in range(GRAPH_WARMUP + 1):
        one(step)
    graph_check(lambda eager: [one(s, eager) for s in (3, 4)], model, opt, ema, updater)
    losses = [float(one(s)[0]["loss"]) for s in range(5, 9)]
    assert all(map(torch.isfinite, torch.tensor(losses))), losses


@pytest.mark.parametrize("kwargs,message", [
    ({"update": "op_by_op"}, "needs the fused update"),
    ({"warmup": 2}, r"needs warmup > 2"),
    ({"device": "cpu"}, "it needs CUDA, and the device is cpu"),
    ({"device": "cpu", "compile": "reduce-overhead"}, "compile mode 'reduce-overhead'"),
])
def test_bench_refuses_a_graph_step_it_cannot_run_before_building_anything(kwargs, message):
    from mdtzoo.bench import bench_train_step

    with pytest.raises(ValueError, match=message):
        bench_train_step("dit_s2", 2, graph_step=True, **kwargs)


def test_bench_command_reports_a_failed_graph_check_and_exits_1(monkeypatch, tmp_path, capsys):
    """A failed check is a result, not a traceback: its line, its comparison in the JSON, exit status 1."""
    import json

    from mdtzoo import bench
    from mdtzoo.launch.cli import main

    def failed(model_name, batch, **kw):
        assert kw["graph_step"] is True
        return dict(model=model_name, batch=batch, precision="bf16", compile=True, passes="full", graph_step=True,
                    status="graph_check_failed", error="the captured step differs from the eager step: params ...",
                    graph_check={"graphed": {"params": {"ratio": 2.0}}})

    monkeypatch.setattr(bench, "bench_train_step", failed)
    out = tmp_path / "r.json"
    assert main(["bench", "train-step", "--model", "dit_s2", "--graph-step", "--json", str(out)]) == 1
    assert "GRAPH_CHECK_FAILED (the captured step differs" in capsys.readouterr().out
    assert json.loads(out.read_text())["graph_check"]["graphed"]["params"]["ratio"] == 2.0
    monkeypatch.setattr(bench, "bench_train_step", lambda *a, **kw: {**failed(*a, **kw), "status": "oom"})
    assert main(["bench", "train-step", "--model", "dit_s2", "--graph-step", "--json", str(out)]) == 0
