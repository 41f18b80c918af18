"""The training model's Linear layers in bfloat16, their float32 masters in the optimiser.

Under bf16 autocast every Linear casts its float32 weight and bias to bfloat16 at each call
(twice a step for MDT's two passes, and again where the backward recomputes them), and its weight
gradient, a bfloat16 matmul output, back to float32. At MDT-XL/2 those casts are several ms of a
~218 ms step (docs/performance.md, sessions 14 and 15). With ``Bf16Weights`` the model's Linear
weights and biases *are* bfloat16: autocast has nothing to cast and the gradients stay bfloat16.
The float32 values (the masters) move to the optimiser, the EMA follows the masters, and the fused
update (``FusedAdamWEMA(shadows=...)``) reads the bfloat16 gradients, updates the masters and
writes their bfloat16 copies into the model in the same pass.

The step is the autocast step's, bit for bit: the forward reads bf16(master) as autocast's cast
does; the gradients are the same bfloat16 values that autocast casts exactly to float32; the held
gradients of MDT's two passes are summed in float32 inside the update kernel as before. What would
round differently is summing gradients in a bfloat16 ``.grad`` -- autograd's accumulation of the
passes (held gradients and separate passes avoid it), of micro-batches, or DDP's all-reduce -- so it
needs held gradients, separate passes, one micro-batch and one process (``check_bf16_weights``).
On an H100 four steps and the captured step were bitwise the autocast ones at MDT-XS/2 and DiT-S/2
(docs/performance.md, session 16). The trainer's checkpoints hold the float32 masters under the
model's own names (``state_dict``): evaluation, sampling and conversion read them as any other.
"""

from __future__ import annotations

import torch
from torch import nn


# The MLPs whose weights and gradients go through torch ops (cuBLASLt's reads the bf16 weights as given).
BF16_MLP_IMPLS = ("torch", "cublaslt")


def check_bf16_weights(*, precision: str, update: str, world: int, hold_grads: bool, mlp_impl: str | None = None,
                       separate_passes: bool = True, accumulation: int = 1) -> None:
    """A ValueError naming every reason bfloat16 Linear weights cannot run with these settings
    (``mlp_impl`` None: not known yet, ``check_bf16_model`` checks the built model)."""
    problems = []
    if precision != "bf16":
        problems.append(f"they need bf16 autocast, and the precision is {precision!r}")
    if update == "op_by_op":
        problems.append("they need the fused update (it writes the bfloat16 copies), and the update is 'op_by_op'")
    if world > 1:
        problems.append(f"they run on one process (DDP would all-reduce bfloat16 gradients), and this run has {world}")
    if not hold_grads:
        problems.append("they need held gradients (autograd would sum the passes' gradients in bfloat16)")
    if not separate_passes:
        problems.append("they need separate passes (one backward of both passes would sum their gradients in "
                        "bfloat16)")
    if accumulation > 1:
        problems.append(f"they need one micro-batch per step (the {accumulation} micro-batches' gradients would be "
                        "summed in bfloat16)")
    if mlp_impl not in (None,) + BF16_MLP_IMPLS:
        problems.append(_mlp_problem(mlp_impl))
    if problems:
        raise ValueError("bf16_weights: " + "; ".join(problems))


def _mlp_problem(mlp_impl: str) -> str:
    return (f"they cannot use mlp_impl {mlp_impl!r}, which reads the Linear weights in its own kernel; use "
            f"{' or '.join(map(repr, BF16_MLP_IMPLS))}")


def _converted(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(kind, parameter) of a Linear layer's trainable float32 weight and bias: what becomes bfloat16."""
    if not isinstance(module, nn.Linear):
        return []
    params = ((kind, getattr(module, kind)) for kind in ("weight", "bias"))
    return [(kind, p) for kind, p in params if p is not None and p.requires_grad and p.dtype == torch.float32]


def check_bf16_model(model: nn.Module) -> None:
    """A ValueError if bfloat16 Linear weights cannot run with ``model`` (which may be on the meta
    device): a block with ``mlp_impl='triton'``, or no trainable float32 Linear layer."""
    impls = sorted({getattr(m, "mlp_impl", "torch") for m in model.modules()} - set(BF16_MLP_IMPLS))
    if impls:
        raise ValueError("bf16_weights: " + _mlp_problem(impls[0]))
    if not any(_converted(m) for m in model.modules()):
        raise ValueError(f"bf16_weights: {type(model).__name__} has no trainable float32 Linear layer")


class Bf16Weights:
    """Makes ``model``'s trainable float32 Linear weights and biases bfloat16, in place (the same
    Parameter objects, so compiled regions and hooks see them), keeping a float32 master of each.
    ``ema`` (built from the float32 model before this) is re-pointed at the masters.

    ``parameters()``: what the optimiser updates, in the model's order with each converted
    parameter replaced by its master; ``shadows``: id(master) -> the model's bfloat16 parameter,
    for ``FusedAdamWEMA(shadows=...)``; ``names``: id(master) -> the parameter's name."""

    def __init__(self, model: nn.Module, ema=None):
        check_bf16_model(model)
        self.model = model
        self.shadows: dict[int, nn.Parameter] = {}
        self.names: dict[int, str] = {}
        self._master_of: dict[int, nn.Parameter] = {}  # id(bfloat16 parameter) -> its master
        self._masters: dict[int, nn.Parameter] = {}  # id(master) -> master
        for module_name, module in model.named_modules():
            for kind, p in _converted(module):
                if id(p) in self._master_of:  # (a parameter shared by two layers: converted once)
                    continue
                master = nn.Parameter(p.detach().clone())
                p.data = p.data.to(torch.bfloat16)
                self.shadows[id(master)] = p
                self.names[id(master)] = f"{module_name}.{kind}" if module_name else kind
                self._master_of[id(p)] = master
                self._masters[id(master)] = master
        if ema is not None:
            ema._pairs = [(e, self._master_of.get(id(p), p)) for e, p in ema._pairs]

    def parameters(self) -> list[nn.Parameter]:
        return [self._master_of.get(id(p), p) for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        """The model's state dict with each bfloat16 copy replaced by its float32 master: what the
        model's own ``state_dict`` is without bf16 weights (the checkpoints' 'model' entry)."""
        state = self.model.state_dict()
        for master_id, name in self.names.items():
            state[name] = self._masters[master_id].detach()
        return state
