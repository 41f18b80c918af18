"""The training objective: DiT's full pass, MDT's full + masked passes (paper section 3.4).

One MDT step: x0 and t are shared; the full pass and the masked pass each draw their
own noise and label dropout, the masked pass its own mask; loss = mean(full loss) +
mean(masked loss); the trainer backpropagates the two passes in turn (same gradient,
half the live activations). Options reproduce the paper's Table 5d (``passes``:
both / full / masked) and 5e (``masked_loss_on``: all tokens / removed tokens only).
Wrapping both passes in one module gives DDP a single forward per step.

Randomness is drawn for the whole global batch from generators seeded by (seed, step)
and each process / micro-batch takes its rows, so the update does not depend on how
the batch is split over GPUs or accumulation steps, and a resumed run replays it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mdtzoo.training.distributed import step_generator

PASSES = ("both", "full", "masked")
LOSS_ON = ("all", "removed")

# Independent streams of the per-step generators (see distributed.step_generator).
T_STREAM, FULL_NOISE, FULL_DROP, MASKED_NOISE, MASKED_DROP, MASK_STREAM = range(6)


def token_weight_map(mask: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, N) token mask (1 = removed) -> (B, 1, H, W) pixel weights (1 on removed tokens' pixels)."""
    b = mask.shape[0]
    m = mask.reshape(b, 1, grid[0], grid[1])
    return F.interpolate(m, scale_factor=patch, mode="nearest")


def check_passes(model: nn.Module, passes: str, masked_loss_on: str) -> None:
    """A ValueError unless ``passes`` and ``masked_loss_on`` are valid and ``model`` can run the
    passes (a masked pass needs a side-interpolator); the model may be on the meta device."""
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}; got {passes!r}")
    if masked_loss_on not in LOSS_ON:
        raise ValueError(f"masked_loss_on must be one of {LOSS_ON}; got {masked_loss_on!r}")
    if passes != "full" and getattr(model, "interp", None) is None:
        raise ValueError(
            f"passes={passes!r} needs a masked pass, but this model has no side-interpolator "
            "(DiT presets train with passes='full')"
        )


class DiffusionObjective(nn.Module):
    """forward(x0, y, step, offset, global_batch) -> dict of scalar losses ('loss' is what to backprop).

    x0: (b, C, H, W), y: (b,) labels: rows offset..offset+b-1 of the step's global batch.
    """

    def __init__(self, model: nn.Module, diffusion, passes: str = "both", masked_loss_on: str = "all",
                 seed: int = 0):
        super().__init__()
        check_passes(model, passes, masked_loss_on)
        self.model, self.diffusion = model, diffusion
        self.passes, self.masked_loss_on, self.seed = passes, masked_loss_on, int(seed)

    def _draw(self, stream: int, step: int, fn, rows: slice):
        g = step_generator(self.seed, step, 0, stream, self._device)
        return fn(g)[rows]

    def _drop_flags(self, stream: int, step: int, total: int, rows: slice) -> torch.Tensor | None:
        """Which labels the pass drops (classifier-free guidance), drawn globally; None: no dropout."""
        p = self.model.y_embedder.dropout_prob
        if p <= 0:
            return None
        return self._draw(stream, step, lambda g: torch.rand(total, device=self._device, generator=g), rows) < p

    def _runs(self, pass_name: str, part: str) -> bool:
        return self.passes in ("both", pass_name) and part in ("all", pass_name)

    def draw(self, x0: torch.Tensor, step: int, offset: int = 0, global_batch: int | None = None,
             part: str = "all") -> dict:
        """Every random draw of the step's rows offset..offset+b-1 that ``part`` needs: 't', and per
        pass its noise and label-dropout flags ('full_noise', 'full_drop', 'masked_noise',
        'masked_drop'; a flag is None without dropout), and the masked pass's 'mask' (a MaskOut).
        ``forward(..., draws=...)`` takes them instead of drawing: a step captured in a CUDA graph
        draws eagerly and replays the rest."""
        if part not in ("all", "full", "masked"):
            raise ValueError(f"part must be 'all', 'full' or 'masked'; got {part!r}")
        self._device = dev = x0.device
        b = x0.shape[0]
        total = global_batch or b
        rows = slice(offset, offset + b)
        shape = (total, *x0.shape[1:])
        draws = {"t": self._draw(T_STREAM, step, lambda g: torch.randint(
            0, self.diffusion.num_timesteps, (total,), device=dev, generator=g), rows)}
        if self._runs("full", part):
            draws["full_noise"] = self._draw(FULL_NOISE, step, lambda g: torch.randn(shape, device=dev, generator=g),
                                             rows)
            draws["full_drop"] = self._drop_flags(FULL_DROP, step, total, rows)
        if self._runs("masked", part):
            draws["masked_noise"] = self._draw(MASKED_NOISE, step,
                                               lambda g: torch.randn(shape, device=dev, generator=g), rows)
            draws["masked_drop"] = self._drop_flags(MASKED_DROP, step, total, rows)
            g = step_generator(self.seed, step, 0, MASK_STREAM, dev)
            draws["mask"] = self.model.sample_mask(total, dev, g).rows(rows.start, rows.stop)
        return draws

    def _labels(self, y: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        return y if drop is None else torch.where(drop, self.model.num_classes, y)

    def forward(self, x0: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                global_batch: int | None = None, part: str = "all", draws: dict | None = None
                ) -> dict[str, torch.Tensor]:
        """The step's losses; ``part`` = 'full' or 'masked' computes one pass only.

        Backpropagating the two parts one after the other (the trainer's default) gives the
        same gradient as one backward of their sum, but only one pass's activations are alive
        at a time. Every draw depends on (seed, step, rows) only, never on ``part``; ``draws``
        (``draw``'s result for the same rows and a part covering this one) replaces them.
        """
        if draws is None:
            draws = self.draw(x0, step, offset, global_batch, part)
        elif part not in ("all", "full", "masked"):
            raise ValueError(f"part must be 'all', 'full' or 'masked'; got {part!r}")
        else:
            needed = ["t"]
            if self._runs("full", part):
                needed += ["full_noise", "full_drop"]
            if self._runs("masked", part):
                needed += ["masked_noise", "masked_drop", "mask"]
            missing = [k for k in needed if k not in draws]
            if missing:
                raise ValueError(f"draws lacks {missing} for part {part!r}: draw them with "
                                 f"draw(..., part={part!r}) or part='all'")
        t = draws["t"]
        out: dict[str, torch.Tensor] = {}
        loss = x0.new_zeros(())
        if self._runs("full", part):
            terms = self.diffusion.training_losses(
                self.model, x0, t, noise=draws["full_noise"].to(x0.dtype),
                model_kwargs={"y": self._labels(y, draws["full_drop"]), "drop_labels": False})
            loss = loss + terms["loss"].mean()
            out.update(full_loss=terms["loss"].mean(), full_mse=terms["mse"].mean(), full_vb=terms["vb"].mean())
        if self._runs("masked", part):
            mask = draws["mask"]
            weight = None
            if self.masked_loss_on == "removed":
                weight = token_weight_map(mask.mask.to(x0.dtype), self.model.grid, self.model.patch_size)
            terms = self.diffusion.training_losses(
                self.model, x0, t, noise=draws["masked_noise"].to(x0.dtype),
                model_kwargs={"y": self._labels(y, draws["masked_drop"]), "mask": mask, "drop_labels": False},
                token_weight=weight)
            loss = loss + terms["loss"].mean()
            out.update(masked_loss=terms["loss"].mean(), masked_mse=terms["mse"].mean(),
                       masked_vb=terms["vb"].mean(), mask_ratio=mask.mask.mean())
        out["loss"] = loss
        return out

    def parts(self, separate: bool = True) -> list[str]:
        """The parts a step backpropagates in turn: ['full', 'masked'] for MDT, else ['all']."""
        return ["full", "masked"] if (separate and self.passes == "both") else ["all"]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str) -> str | None:
    """``train.compile`` -> a torch.compile mode (None: not compiled): True = 'default', or a mode's name."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or a torch.compile mode ({', '.join(COMPILE_MODES)}); "
                         f"got {compile!r}")
    return compile


def uses_cudagraphs(compile: bool | str) -> bool:
    """Whether compiled blocks replay CUDA graphs (each training step must then be marked)."""
    return compile_mode(compile) in ("reduce-overhead", "max-autotune")


def prepare_step(objective: DiffusionObjective, device: torch.device, world: int = 1, *,
                 compile: bool | str = False, compile_scope: str = "blocks",
                 activation_checkpointing: bool = False, separate_passes: bool = True):
    """(step_fn, parts): the objective set up as the trainer runs it.

    Activation checkpointing and regional compilation (``compile``: True or a torch.compile mode;
    with 'reduce-overhead' each block replays CUDA graphs, and every step must begin with
    ``torch.compiler.cudagraph_mark_step_begin()``; the diffusion's loss maths compiled too, in the
    default mode; ``compile_scope``: each block a region, or 'stacks', the encoder's and the
    decoder's blocks as one region each, ``DiffusionTransformer.compile_blocks``) are switched on
    in the model; with
    ``world`` > 1 the objective is wrapped in DDP (unused parameters only when an MDT trains
    its full pass alone). ``parts`` are what ``backward_parts`` backpropagates in turn.
    """
    model = objective.model
    if activation_checkpointing:
        model.set_activation_checkpointing(True)
    mode = compile_mode(compile)
    if mode is not None:
        model.compile_blocks(mode, compile_scope)
        compile_losses = getattr(objective.diffusion, "compile_losses", None)  # (a user's diffusion may lack it)
        if compile_losses is not None:
            compile_losses(device)  # the loss maths: one graph, not ~100 launches a pass
    step_fn = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_fn = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=objective.passes == "full" and getattr(model, "interp", None) is not None)
    return step_fn, objective.parts(separate_passes)


def backward_parts(step_fn, parts: list[str], args: tuple, autocast, *, sync: bool = True, scale: float = 1.0,
                   world: int = 1, hold=None, draws: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward and backward every part in turn (loss x ``scale``); detached float outputs, summed.

    Under DDP only the last part of a micro-batch with ``sync`` all-reduces the gradients.
    ``hold``: on one process, called after every backward but the step's last (``sync`` marks
    the last micro-batch) -- the update's ``hold_grads``, which sets the gradients so far aside
    for its kernel to add, instead of autograd adding the next backward's into them. ``draws``:
    the step's random draws (``DiffusionObjective.draw``), passed to every part.
    """
    extra = {} if draws is None else {"draws": draws}
    out_sum: dict[str, torch.Tensor] = {}
    for i, part in enumerate(parts):
        last = sync and i == len(parts) - 1
        context = contextlib.nullcontext() if (last or world == 1) else step_fn.no_sync()
        with context:
            with autocast:
                out = step_fn(*args, part=part, **extra)
            (out["loss"] * scale).backward()
        if hold is not None and world == 1 and not last:
            hold()
        for k, v in out.items():
            out_sum[k] = out_sum.get(k, 0.0) + v.detach().float() * scale
    return out_sum
