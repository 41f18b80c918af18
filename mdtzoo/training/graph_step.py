"""A whole training step replayed from CUDA graphs (``train.graph_step``, ``bench train-step --graph-step``).

An eager step costs the host about as much time as the GPU at XL/2 and more at S/2: some 2,000 to
3,500 kernel launches from inductor's wrappers, the autograd engine's nodes, the update
(docs/performance.md). Captured once, the step is two graph launches: the forward and backward of
every part with the held gradients, then the update (a second graph in the same memory pool: its
tables hold the addresses of the gradients the first one writes, sent between the two captures).
What changes from step to step stays outside the graphs and reaches them through fixed buffers:

- the batch (x0, y) and the step's random draws (``DiffusionObjective.draw``, drawn eagerly
  exactly as an eager step draws them) are copied into the captured inputs;
- the update's scalars (learning rate, bias corrections, EMA weight) go to the device buffers
  its kernel reads (``FusedAdamWEMA.before_replay``).

The gradients live in the graph's memory and every replay's backward writes them anew, so the
eager step's ``zero_grad(set_to_none=True)`` is not called between replays.

Status (session 15, docs/performance.md): on an H100 the replayed steps are bitwise the eager ones
(losses, gradient norms, parameters, EMA, AdamW's moments) at every benchmarked size, DiT-S/2 to
MDT-XL/2, and the trainer runs it as ``train.graph_step``. The benchmark compares them before it
times anything (``graph_check``): run ``mdtzoo bench train-step --graph-step`` once on a new card
or torch version.

What it needs (``check_graph_step``, before any step runs): CUDA, one process (DDP's all-reduce
is not captured), no gradient accumulation, the fused update, torch.compile's default mode (its
'reduce-overhead' CUDA graphs do not nest in a captured one), and a masking strategy that keeps
the same number of tokens at every draw (the captured masked pass has one shape).
"""

from __future__ import annotations

import math

import torch

from mdtzoo.masking.base import MaskOut
from mdtzoo.training.fused_update import FusedAdamWEMA
from mdtzoo.training.objective import backward_parts, uses_cudagraphs

GRAPH_WARMUP = 2  # eager steps before the capture: compilation, the update's device tables


def check_graph_step(device: torch.device, world: int, accum: int, compile) -> None:
    """A ValueError naming every reason a captured step cannot run with these settings."""
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs CUDA, and the device is {device}")
    if world > 1:
        problems.append(f"it runs on one process, and this run has {world} (DDP's all-reduce is not captured)")
    if accum > 1:
        problems.append(f"it runs one micro-batch a step, and this run accumulates {accum} "
                        "(make the micro-batch the per-GPU batch)")
    if uses_cudagraphs(compile):
        problems.append(f"compile mode {compile!r} replays its own CUDA graphs, which do not nest in the "
                        "step's; use the default mode")
    if problems:
        raise ValueError("graph_step: " + "; ".join(problems))


def check_fixed_keep(model, tries: int = 8) -> None:
    """A ValueError if the model's masking strategy keeps different numbers of tokens at different
    draws (e.g. ``random_jitter``): a captured masked pass has one shape."""
    masking = getattr(model, "masking", None)
    if masking is None or getattr(model, "interp", None) is None:
        return
    counts = sorted({masking(1, model.grid, device="cpu", generator=torch.Generator().manual_seed(i)).num_keep
                     for i in range(tries)})
    if len(counts) > 1:
        raise ValueError(f"graph_step: masking {masking!r} keeps a different number of tokens at each draw "
                         f"({', '.join(map(str, counts))} in {tries} draws), and a captured step has one shape; "
                         "use a strategy with a fixed ratio, or the eager step")


def _clone(value):
    if value is None:
        return None
    if isinstance(value, MaskOut):
        return MaskOut(value.ids_shuffle.clone(), value.ids_restore.clone(), value.mask.clone(), value.num_keep)
    return value.clone()


def _copy(name: str, static, value) -> None:
    """static := value, or a ValueError naming what no longer matches the captured step."""
    if static is None or value is None:
        if static is not value:
            raise ValueError(f"graph_step: draw {name!r} was {'absent' if static is None else 'present'} when the "
                             "step was captured")
        return
    if isinstance(value, MaskOut):
        if value.num_keep != static.num_keep:
            raise ValueError(f"graph_step: the mask keeps {value.num_keep} tokens, the captured step "
                             f"{static.num_keep}; a captured step has one shape")
        for field in ("ids_shuffle", "ids_restore", "mask"):
            _copy(f"{name}.{field}", getattr(static, field), getattr(value, field))
        return
    if value.shape != static.shape or value.dtype != static.dtype:
        raise ValueError(f"graph_step: {name!r} is {tuple(value.shape)} {value.dtype}, the captured step's "
                         f"{tuple(static.shape)} {static.dtype}; a captured step has one shape")
    static.copy_(value, non_blocking=True)


class StepGraph:
    """``graph(x0, y, step, offset, global_batch)`` -> (losses, grad_norm): one training step, as
    ``backward_parts`` + ``updater.step`` would run it, captured at its first call and replayed
    after. The returned tensors are this step's own (not the graph's buffers, which the next
    replay overwrites). Run ``GRAPH_WARMUP`` eager steps before the first call."""

    def __init__(self, objective, step_fn, parts: list[str], updater, autocast, *, hold=None,
                 max_norm: float | None = None):
        if not isinstance(updater, FusedAdamWEMA):
            raise ValueError(f"graph_step needs the fused update (update='fused' or 'auto' with AdamW on "
                             f"CUDA); this run's update is {type(updater).__name__}")
        self.objective, self.step_fn, self.parts, self.updater = objective, step_fn, parts, updater
        self.autocast, self.hold, self.max_norm = autocast, hold, max_norm
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x0: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                 global_batch: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        draws = self.objective.draw(x0, step, offset, global_batch)
        if self.graph is None:
            self._capture(x0, y, draws, step, offset, global_batch)
        else:
            _copy("x0", self._x0, x0)
            _copy("y", self._y, y)
            if draws.keys() != self._draws.keys():
                raise ValueError(f"graph_step: the step draws {sorted(draws)}, the captured one {sorted(self._draws)}")
            for name, value in draws.items():
                _copy(name, self._draws[name], value)
        self.updater.before_replay(step + 1)
        self.graph.replay()
        self._update.replay()
        values = torch.stack([*self._out.values(), self._norm])  # one copy out of the graph's buffers
        return dict(zip(self._out, values[:-1])), values[-1]

    def _capture(self, x0, y, draws, step, offset, global_batch) -> None:
        self._x0, self._y = x0.clone(), y.clone()
        self._draws = {name: _clone(value) for name, value in draws.items()}
        self.updater.zero_grad()  # the captured backward allocates and writes them
        torch.cuda.synchronize(x0.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks, before the graph takes its own pool
        graph, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = backward_parts(self.step_fn, self.parts, (self._x0, self._y, step, offset, global_batch),
                                 self.autocast, hold=self.hold, draws=self._draws)
        # The update is a second graph in the same memory pool: its device tables hold the addresses
        # of the gradients the first graph writes, sent from the host now, between the two captures.
        launches = self.updater.prepare_launches()
        with torch.cuda.graph(update, pool=graph.pool()):
            norm = self.updater.launch(launches, self.max_norm)
        self._out, self._norm, self.graph, self._update = out, norm.reshape(()), graph, update


GRAPH_CHECK_STEPS = 2  # steps compared, replayed against eager, before a benchmark times the graph
LOSS_TOL = 1e-2  # the steps' losses and gradient norms: the same inputs, bf16 rounding apart
UPDATE_TOL = 0.1  # each state group's change over the steps, as a norm: replayed / eager within 1 +- this


def _groups(model, opt, ema) -> dict[str, list[torch.Tensor]]:
    """Every tensor a training step changes, by kind: parameters (the model's, then the optimiser's
    that are not the model's: ``Bf16Weights``' float32 masters), EMA weights, AdamW's moments and counts."""
    params = list(model.parameters())
    known = {id(p) for p in params}
    params += [p for group in opt.param_groups for p in group["params"] if id(p) not in known]
    groups = {"params": params, "ema": list(ema.model.parameters()),
              "exp_avg": [], "exp_avg_sq": [], "step": []}
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                groups[key].append(state[key])
    return {k: [t.detach() for t in v] for k, v in groups.items()}


def _snapshot(groups: dict) -> dict:
    return {k: [t.to("cpu", copy=True) for t in ts] for k, ts in groups.items()}


def _norm(tensors) -> float:
    return math.sqrt(sum(torch.linalg.vector_norm(t.double()).item() ** 2 for t in tensors))


def _compare(groups: dict, start: dict, other: dict, names: list[str]) -> dict:
    """Per group, the live state (an eager run's) against ``other`` (another run's host copy), both
    from ``start``: their changes ||x - start|| as norms, ``ratio`` = other's / the live one's,
    ``diff`` = ||live - other|| relative to the live change, and whether they are bitwise equal;
    for the parameters also the five tensors (``names``) that differ most, relative to their change."""
    out = {}
    for k, ts in groups.items():
        dev = [t.device for t in ts]
        changes = [_norm([t.double() - s.to(d).double()]) for t, s, d in zip(ts, start[k], dev)]
        diffs = [_norm([t.double() - o.to(d).double()]) for t, o, d in zip(ts, other[k], dev)]
        change, diff = math.hypot(*changes), math.hypot(*diffs)
        other_change = math.hypot(*(_norm([o.double() - s.double()]) for o, s in zip(other[k], start[k])))
        out[k] = {"ratio": other_change / change if change > 0 else float("inf"),
                  "diff": diff / change if change > 0 else float("inf"),
                  "bitwise": all(torch.equal(t, o.to(d)) for t, o, d in zip(ts, other[k], dev))}
        if k == "params":
            worst = sorted(((d / c if c > 0 else float("inf") if d > 0 else 0.0), n)
                           for d, c, n in zip(diffs, changes, names))[::-1][:5]
            out[k]["worst"] = {n: r for r, n in worst}
    return out


class GraphCheckError(RuntimeError):
    """The captured step differs from the eager one; ``result`` holds ``graph_check``'s comparison."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def _values(steps: list) -> list[dict[str, float]]:
    """(losses, grad norm) per step -> plain floats (one wait, after the steps)."""
    return [{**{k: float(v) for k, v in out.items()}, "grad_norm": float(norm)} for out, norm in steps]


def graph_check(run_steps, model, opt, ema, updater, log=None) -> dict:
    """The same steps replayed, run eagerly, and run eagerly again, each from the same state:
    ``run_steps(eager)`` runs them one way and returns each step's (losses, grad norm). The state
    is restored in place between runs (the graphs' buffers keep their addresses); the last eager
    run's state is kept.

    What must agree (else a RuntimeError): every step's losses and gradient norm (the same inputs
    through the same kernels: bf16 rounding apart, ``LOSS_TOL``), and each state group's change
    as a norm (``UPDATE_TOL``: a stale learning rate, bias correction or EMA weight scales it).
    Elementwise, the states may differ by more than rounding: near initialisation (adaLN-Zero)
    most gradients are rounding noise, which Adam's normalisation turns into full-size steps of
    either sign, so a kernel that sums in another order moves them differently. Those differences
    are reported per group (``diff``: the distance relative to the change) with the eager run
    against itself beside them (``eager_again``); the error (``GraphCheckError``) carries them too."""
    log = log or (lambda *_: None)
    groups = _groups(model, opt, ema)
    start = _snapshot(groups)
    counts = updater.step_counts()

    def from_start(eager: bool):
        with torch.no_grad():
            for k, ts in groups.items():
                for t, s in zip(ts, start[k]):
                    t.copy_(s)
        updater.set_step_counts(counts)
        # A replay leaves the graph's gradient buffers in .grad (it never zeroes them); an eager
        # backward would add to them, so every run starts as an eager step expects, without gradients.
        updater.zero_grad()
        return _values(run_steps(eager))

    graphed_values = from_start(False)
    graphed = _snapshot(groups)
    eager_values = from_start(True)
    eager = _snapshot(groups)
    again_values = from_start(True)
    by_id, source = {id(p): n for n, p in model.named_parameters()}, getattr(updater, "grad_source", lambda p: p)
    names = list(by_id.values()) + [f"{by_id.get(id(source(p)), '?')} (float32 master)"  # (as _groups orders them)
                                    for group in opt.param_groups for p in group["params"] if id(p) not in by_id]
    result = {"steps": GRAPH_CHECK_STEPS, "graphed": _compare(groups, start, graphed, names),
              "eager_again": _compare(groups, start, eager, names)}
    del graphed, eager
    worst = {}
    for name, values in (("graphed", graphed_values), ("eager_again", again_values)):
        worst[name] = max(abs(v[k] - e[k]) / max(abs(e[k]), 1e-12) for v, e in zip(values, eager_values) for k in e)
    result["values_rel_diff"] = worst
    result["values"] = {"graphed": graphed_values, "eager": eager_values}
    problems = []
    if worst["graphed"] > LOSS_TOL:
        problems.append(f"the steps' losses or gradient norms differ by {worst['graphed']:.3g} relative "
                        f"(eager against itself: {worst['eager_again']:.3g}; tolerance {LOSS_TOL})")
    for k, c in result["graphed"].items():
        if not abs(c["ratio"] - 1) <= UPDATE_TOL:
            problems.append(f"{k} changed {c['ratio']:.3f}x as much replayed as eagerly (tolerance 1 +- {UPDATE_TOL})")
    log(f"graph check: {result}")
    if problems:
        raise GraphCheckError("the captured step differs from the eager step: " + "; ".join(problems), result)
    return result
