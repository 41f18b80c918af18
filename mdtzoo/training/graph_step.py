"""A whole training step replayed as one CUDA graph (``train.graph_step``, ``bench train-step --graph-step``).

An eager step costs the host about as much time as the GPU at XL/2 and more at S/2: some 2,000 to
3,500 kernel launches from inductor's wrappers, the autograd engine's nodes, the update
(docs/performance.md). Captured once, the step is two graph launches: the forward and backward of
every part with the held gradients, then the update kernel (a second graph in the same memory pool,
because its tables hold the addresses of the gradients the first one writes). What changes from step to step stays
outside the graph and reaches it through fixed buffers:

- the batch (x0, y) and the step's random draws (``DiffusionObjective.draw``, drawn eagerly
  exactly as an eager step draws them) are copied into the captured inputs;
- the update's scalars (learning rate, bias corrections, EMA weight) go to the device buffers
  its kernel reads (``FusedAdamWEMA.before_replay``).

The gradients live in the graph's memory and every replay's backward writes them anew, so the
eager step's ``zero_grad(set_to_none=True)`` is not called between replays.

What it needs (``check_graph_step``, before any step runs): CUDA, one process (DDP's all-reduce
is not captured), no gradient accumulation, the fused update, torch.compile's default mode (its
'reduce-overhead' CUDA graphs do not nest in a captured one), and a masking strategy that keeps
the same number of tokens at every draw (the captured masked pass has one shape).
"""

from __future__ import annotations

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
                        "(set train.micro_batch to the per-GPU batch)")
    if uses_cudagraphs(compile):
        problems.append(f"compile mode {compile!r} replays its own CUDA graphs, which do not nest in the "
                        "step's; use compile=True")
    if problems:
        raise ValueError("train.graph_step: " + "; ".join(problems))


def check_fixed_keep(model, tries: int = 8) -> None:
    """A ValueError if the model's masking strategy keeps different numbers of tokens at different
    draws (e.g. ``random_jitter``): a captured masked pass has one shape."""
    masking = getattr(model, "masking", None)
    if masking is None or getattr(model, "interp", None) is None:
        return
    counts = sorted({masking(1, model.grid, device="cpu", generator=torch.Generator().manual_seed(i)).num_keep
                     for i in range(tries)})
    if len(counts) > 1:
        raise ValueError(f"train.graph_step: masking {masking!r} keeps a different number of tokens at each draw "
                         f"({', '.join(map(str, counts))} in {tries} draws), and a captured step has one shape; "
                         "use a strategy with a fixed ratio or train.graph_step=False")


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
            raise ValueError(f"train.graph_step needs the fused update (update='fused' or 'auto' with AdamW on "
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
        self.updater.opt.zero_grad(set_to_none=True)  # the captured backward allocates and writes them
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
GRAPH_CHECK_TOL = 2e-2  # the largest difference allowed, relative to each tensor's change over those steps


def _state(model, opt, ema) -> list[torch.Tensor]:
    """Every tensor a training step changes: parameters, AdamW's state, the EMA weights."""
    tensors = list(model.parameters()) + list(ema.model.parameters())
    for state in opt.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def graph_check(run_steps, model, opt, ema, updater) -> dict:
    """The same steps replayed and run eagerly from the same state: ``run_steps(eager)`` runs them
    one way. The state (host copies) is restored in place between the two, so the graphs' buffers
    keep their addresses; the eager run's state is kept. Returns whether every tensor came out
    bitwise equal and the largest difference ||eager - graphed|| / ||eager - start|| over the
    tensors (a norm, not an element's worst case: where a kernel sums in a varying order, as
    cuDNN's attention backward does, Adam can turn a near-zero gradient's noise into a full-size
    step of either sign); raises if it is over ``GRAPH_CHECK_TOL``."""
    tensors = [t.detach() for t in _state(model, opt, ema)]  # (the steps themselves need autograd)
    start = [t.to("cpu", copy=True) for t in tensors]
    counts = updater.step_counts()
    run_steps(False)
    graphed = [t.to("cpu", copy=True) for t in tensors]
    with torch.no_grad():
        for t, s in zip(tensors, start):
            t.copy_(s)
    updater.set_step_counts(counts)
    run_steps(True)
    worst, bitwise = 0.0, True
    for t, s, g in zip(tensors, start, graphed):
        g = g.to(t.device)
        if torch.equal(t, g):
            continue
        bitwise = False
        change = torch.linalg.vector_norm(t.double() - s.to(t.device).double()).item()
        diff = torch.linalg.vector_norm(t.double() - g.double()).item()
        worst = max(worst, diff / change if change > 0 else float("inf"))
    result = {"steps": GRAPH_CHECK_STEPS, "bitwise": bitwise, "max_rel_diff": worst}
    if worst > GRAPH_CHECK_TOL:
        raise RuntimeError(f"the captured step differs from the eager step: {result} (tolerance {GRAPH_CHECK_TOL})")
    return result
