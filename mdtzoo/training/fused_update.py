"""The optimiser side of a training step in one pass over the parameters: AdamW, EMA, grad norm.

A step after the backward reads every parameter several times when done op by op: the gradient
norm (read g), fused AdamW (read p, g, m, v; write p, m, v) and the EMA lerp (read e, p; write e)
-- 44 bytes per float32 parameter. ``FusedAdamWEMA`` does it in one Triton kernel: each element's
gradient is read once (and squared into a per-block partial sum for the norm), the AdamW update
applied, and the EMA moved towards the new value while it is still in registers -- 36 bytes per
parameter and one launch instead of dozens. Timings: docs/performance.md.

The maths is torch's fused AdamW (decoupled weight decay, bias corrections per parameter's step
count) and ``EMA.update``'s lerp; the optimiser's state stays ``torch.optim.AdamW``'s
(``exp_avg``, ``exp_avg_sq``, ``step``), so checkpoints, ``load_state_dict`` and learning-rate
changes through ``param_groups`` work as before. Tested against torch.optim.AdamW + ``EMA.update``
+ ``clip_grad_norm_`` in Triton's CPU interpreter (tests/test_fused_update.py).

``make_update`` picks this path or the op-by-op one (``OpByOpUpdate``) for the trainer and bench.
"""

from __future__ import annotations

import math
import os

import torch

BLOCK = 4096  # elements per program; 16 per thread at 8 warps
WARPS = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

if triton is not None:

    @triton.jit
    def _adamw_ema_kernel(P, G, M, V, E, NUMEL, STEP_SIZE, BC2_SQRT, BLOCK_T, BLOCK_S, PARTIAL, COEF,
                          wd_factor, beta1, beta2, eps, ema_weight,
                          HAS_COEF: tl.constexpr, BLOCK: tl.constexpr):
        """One program: BLOCK elements of tensor t = BLOCK_T[pid] from element BLOCK_S[pid] on.
        P, G, M, V, E hold each tensor's address (int64); all tensors are float32, contiguous."""
        pid = tl.program_id(0)
        t = tl.load(BLOCK_T + pid)
        offs = tl.load(BLOCK_S + pid) + tl.arange(0, BLOCK)
        ok = offs < tl.load(NUMEL + t)
        p_ptr = tl.load(P + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(G + t).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(M + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(V + t).to(tl.pointer_type(tl.float32))
        e_ptr = tl.load(E + t).to(tl.pointer_type(tl.float32))
        g = tl.load(g_ptr + offs, mask=ok, other=0.0)
        tl.store(PARTIAL + pid, tl.sum(g * g, axis=0))  # the unclipped norm, summed per block
        if HAS_COEF:
            g = g * tl.load(COEF)
        p = tl.load(p_ptr + offs, mask=ok, other=0.0) * wd_factor  # decoupled weight decay
        m = beta1 * tl.load(m_ptr + offs, mask=ok, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_ptr + offs, mask=ok, other=0.0) + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / tl.load(BC2_SQRT + t) + eps
        p = p - tl.load(STEP_SIZE + t) * m / denom
        e = tl.load(e_ptr + offs, mask=ok, other=0.0)
        e = e + ema_weight * (p - e)  # torch.lerp's form for a weight below 0.5
        tl.store(p_ptr + offs, p, mask=ok)
        tl.store(m_ptr + offs, m, mask=ok)
        tl.store(v_ptr + offs, v, mask=ok)
        tl.store(e_ptr + offs, e, mask=ok)


def _group_hyper(group: dict) -> tuple[float, float, float, float, float]:
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    return lr, float(group["weight_decay"]), beta1, beta2, float(group["eps"])


def unsupported(opt: torch.optim.Optimizer, ema, device: torch.device | None = None) -> str | None:
    """Why ``FusedAdamWEMA`` cannot run this optimiser + EMA, or None when it can."""
    if triton is None:
        return "triton is not installed"
    if type(opt) is not torch.optim.AdamW:
        return f"the optimiser is {type(opt).__name__}, not torch.optim.AdamW"
    for group in opt.param_groups:
        for key in ("amsgrad", "maximize"):
            if group.get(key):
                return f"AdamW option {key}=True"
        if any(torch.is_tensor(group[k]) for k in ("lr", "weight_decay")):
            return "tensor-valued lr or weight_decay"
    ema_of = {id(p): e for e, p in ema._pairs}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.dtype != torch.float32 or not p.is_contiguous():
                return f"a parameter of shape {tuple(p.shape)} is {p.dtype}, contiguous={p.is_contiguous()}"
            if id(p) not in ema_of:
                return f"a parameter of shape {tuple(p.shape)} has no EMA copy"
            if device is not None and p.device != device:
                return f"a parameter is on {p.device}, not {device}"
    return None


class FusedAdamWEMA:
    """``opt.step()`` (torch.optim.AdamW), ``ema.update(step)`` and the gradient norm in one kernel.

    ``step(ema_step, max_norm)`` returns the gradients' total 2-norm before clipping (a 0-d device
    tensor, as ``clip_grad_norm_``); with ``max_norm`` the update uses the gradients clipped to it
    (``clip_grad_norm_``'s coefficient; the .grad tensors themselves are left as they are).
    Parameters without a gradient this step are skipped by AdamW (as torch does) and still
    EMA-updated; EMA entries that are not optimised (frozen parameters) and buffers are updated as
    ``EMA.update`` does.
    """

    def __init__(self, opt: torch.optim.AdamW, ema, *, block: int = BLOCK):
        why = unsupported(opt, ema)
        if why:
            raise ValueError(f"FusedAdamWEMA cannot run here: {why}")
        self.opt, self.ema, self.block = opt, ema, int(block)
        ema_of = {id(p): e for e, p in ema._pairs}
        self._groups = [[(p, ema_of[id(p)]) for p in group["params"]] for group in opt.param_groups]
        optimised = {id(p) for group in opt.param_groups for p in group["params"]}
        self._ema_only = [(e, p) for e, p in ema._pairs if id(p) not in optimised]
        self._tables: dict = {}  # (group, present tensors) -> the fixed device tables
        self._steps: dict[int, int] = {}  # id(param) -> its AdamW step count, mirrored on the host
        self._step_tensors: dict[int, torch.Tensor] = {}

    def _state(self, p: torch.Tensor) -> dict:
        """AdamW's state of p, created as torch's fused AdamW creates it; the host step mirror
        re-read whenever the state's step tensor was replaced (e.g. by load_state_dict)."""
        state = self.opt.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self._step_tensors.get(id(p)) is not state["step"]:
            self._step_tensors[id(p)] = state["step"]
            self._steps[id(p)] = int(state["step"].item())
        return state

    def _table(self, gi: int, present: tuple[int, ...], pairs, states):
        """Addresses of p, m, v, e and the block -> (tensor, start) map for one set of tensors; built
        once per (group, set of tensors with a gradient) and kept while the tensors are unchanged."""
        key = (gi, present)
        ident = tuple((p.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(), e.data_ptr())
                      for (p, e), s in zip(pairs, states))
        hit = self._tables.get(key)
        if hit is not None and hit["ident"] == ident:
            return hit
        dev = pairs[0][0].device
        block_t, block_s = [], []
        for i, (p, _) in enumerate(pairs):
            starts = range(0, p.numel(), self.block)
            block_t.extend([i] * len(starts))
            block_s.extend(starts)
        table = dict(
            ident=ident,
            addrs=[torch.tensor(col, dtype=torch.int64, device=dev) for col in zip(*ident)],
            numel=torch.tensor([p.numel() for p, _ in pairs], dtype=torch.int64, device=dev),
            block_t=torch.tensor(block_t, dtype=torch.int32, device=dev),
            block_s=torch.tensor(block_s, dtype=torch.int64, device=dev),
        )
        self._tables[key] = table
        return table

    @staticmethod
    def _to_device(values: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if dev.type == "cuda":  # pinned: the copy does not wait for the queued GPU work
            return host.pin_memory().to(dev, non_blocking=True)
        return host.to(dev)

    @torch.no_grad()
    def step(self, ema_step: int, max_norm: float | None = None) -> torch.Tensor:
        groups = []
        for gi, (group, pairs) in enumerate(zip(self.opt.param_groups, self._groups)):
            present = tuple(i for i, (p, _) in enumerate(pairs) if p.grad is not None)
            groups.append((gi, group, present, [pairs[i] for i in present]))
        grads = [p.grad for *_, chosen in groups for p, _ in chosen]
        dev = grads[0].device if grads else None
        coef = None
        if max_norm is not None and grads:  # the norm must be known before the update
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            coef = torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0).to(torch.float32)
        partials = []
        ema_weight = 1.0 - self.ema.decay_at(ema_step)
        for gi, group, present, chosen in groups:
            if not chosen:
                continue
            lr, wd, beta1, beta2, eps = _group_hyper(group)
            states = [self._state(p) for p, _ in chosen]
            table = self._table(gi, present, chosen, states)
            step_size, bc2_sqrt = [], []
            for p, _ in chosen:
                n = self._steps[id(p)] + 1
                self._steps[id(p)] = n
                step_size.append(lr / (1.0 - beta1**n))
                bc2_sqrt.append(math.sqrt(1.0 - beta2**n))
            gs = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p, _ in chosen]
            if any(g.dtype != torch.float32 for g in gs):
                raise ValueError("FusedAdamWEMA needs float32 gradients")
            g_addrs = self._to_device([g.data_ptr() for g in gs], torch.int64, dev)
            scalars = self._to_device([step_size, bc2_sqrt], torch.float32, dev)
            n_blocks = table["block_t"].numel()
            partial = torch.empty(n_blocks, dtype=torch.float32, device=dev)
            p_addrs, m_addrs, v_addrs, e_addrs = table["addrs"]
            _adamw_ema_kernel[(n_blocks,)](
                p_addrs, g_addrs, m_addrs, v_addrs, e_addrs, table["numel"], scalars[0], scalars[1],
                table["block_t"], table["block_s"], partial, coef if coef is not None else partial,
                1.0 - lr * wd, beta1, beta2, eps, ema_weight,
                HAS_COEF=coef is not None, BLOCK=self.block, num_warps=WARPS)
            torch._foreach_add_([s["step"] for s in states], 1.0)
            partials.append(partial)
        # EMA for what AdamW did not touch: frozen parameters and parameters without a gradient
        rest = list(self._ema_only)
        for (_, _, present, _), pairs in zip(groups, self._groups):
            with_grad = set(present)
            rest += [(e, p) for i, (p, e) in enumerate(pairs) if i not in with_grad]
        if rest:
            torch._foreach_lerp_([e for e, _ in rest], [p.detach() for _, p in rest], ema_weight)
        for e, b in self.ema._buffers:
            e.copy_(b)
        if not partials:
            return torch.zeros(())
        return torch.cat(partials).sum().sqrt()


class OpByOpUpdate:
    """The same step as ``FusedAdamWEMA`` with torch's ops one after the other: the gradient norm
    (clipping with ``max_norm``), ``opt.step()``, ``ema.update(ema_step)``. Any optimiser."""

    def __init__(self, opt: torch.optim.Optimizer, ema):
        self.opt, self.ema = opt, ema

    def step(self, ema_step: int, max_norm: float | None = None) -> torch.Tensor:
        from mdtzoo.training.loop import grad_norm_

        params = [p for group in self.opt.param_groups for p in group["params"]]
        norm = grad_norm_(params, max_norm)
        self.opt.step()
        self.ema.update(ema_step)
        return norm


UPDATE_MODES = ("auto", "fused", "op_by_op")


def check_update_mode(mode: str, device: torch.device | None = None) -> str:
    """``mode`` if valid (and, for 'fused', runnable on ``device``); else a ValueError saying why."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"unknown update mode {mode!r}; valid: {', '.join(UPDATE_MODES)}")
    if mode == "fused" and triton is None:
        raise ValueError("update mode 'fused' needs triton, which is not installed; use 'auto' or 'op_by_op'")
    if (mode == "fused" and device is not None and device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError(f"FusedAdamWEMA runs on CUDA (or in Triton's interpreter, TRITON_INTERPRET=1); "
                         f"the parameters are on {device}. Use update mode 'auto' or 'op_by_op'")
    return mode


def make_update(opt: torch.optim.Optimizer, ema, mode: str = "auto"):
    """The step's optimiser side: ``'fused'`` (``FusedAdamWEMA``; an error says why when it cannot
    run), ``'op_by_op'`` (``OpByOpUpdate``), or ``'auto'``: fused on CUDA where supported."""
    check_update_mode(mode)
    if mode == "op_by_op":
        return OpByOpUpdate(opt, ema)
    devices = {p.device for group in opt.param_groups for p in group["params"]}
    if mode == "auto":
        on_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        return FusedAdamWEMA(opt, ema) if on_cuda and unsupported(opt, ema) is None else OpByOpUpdate(opt, ema)
    if len(devices) > 1:
        raise ValueError(f"FusedAdamWEMA cannot run here: parameters on several devices {sorted(map(str, devices))}")
    if devices:
        check_update_mode(mode, next(iter(devices)))
    return FusedAdamWEMA(opt, ema)
