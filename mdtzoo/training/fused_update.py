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
# The step's scalars as the kernel reads them from device memory (``_adamw_ema_kernel``'s SCAL).
SCALARS = ("step_size", "bc2_sqrt", "wd_factor", "beta1", "beta2", "eps", "ema_weight")
WARPS = 8
ALIGN = 16  # bytes: the kernel's 128-bit loads assume every tensor starts at such an address

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

if triton is not None:

    @triton.jit
    def _column(ADDRS, t, offs, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
        """Pointers to elements ``offs`` of tensor t (of DTYPE), whose address is ADDRS[t]. The hints
        (16-byte aligned, BLOCK contiguous: true of every tensor the caching allocator hands out) let
        Triton use 128-bit loads and stores; a pointer read from memory carries no alignment otherwise."""
        ptr = tl.load(ADDRS + t).to(tl.pointer_type(DTYPE))
        return tl.max_contiguous(tl.multiple_of(ptr + offs, 16), BLOCK)  # 16 = ALIGN

    @triton.jit
    def _load(ADDRS, t, offs, ok, BLOCK: tl.constexpr, MASKED: tl.constexpr, DTYPE: tl.constexpr):
        """A block of tensor t (of DTYPE) as float32."""
        ptrs = _column(ADDRS, t, offs, BLOCK, DTYPE)
        if MASKED:
            return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        return tl.load(ptrs).to(tl.float32)

    @triton.jit
    def _bf16_rne(x):
        """x (float32) rounded to bfloat16, to nearest with ties to even, by integer arithmetic on its
        bits -- torch's own rounding (c10::BFloat16) written out: on a GPU it equals the cvt.rn
        conversion, and Triton's CPU interpreter, whose own cast does not round as torch's does (about
        half of a test's values came out otherwise), computes it the same way, so the copies are
        torch's cast of the masters bit for bit there too. NaN stays NaN."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _grad(G, G2, t, offs, ok, bf16, BLOCK: tl.constexpr, HAS_G2: tl.constexpr, MASKED: tl.constexpr):
        """The gradient of one block, in float32: .grad, plus the held gradient of an earlier backward
        where tensor t has one (its address in G2 is not 0); both bfloat16 where ``bf16``."""
        if bf16:
            g = _load(G, t, offs, ok, BLOCK, MASKED, tl.bfloat16)
        else:
            g = _load(G, t, offs, ok, BLOCK, MASKED, tl.float32)
        if HAS_G2:
            if tl.load(G2 + t) != 0:
                if bf16:
                    g += _load(G2, t, offs, ok, BLOCK, MASKED, tl.bfloat16)
                else:
                    g += _load(G2, t, offs, ok, BLOCK, MASKED, tl.float32)
        return g

    @triton.jit
    def _update(p_ptrs, g, m_ptrs, v_ptrs, e_ptrs, W, t, offs, bf16, ok, PARTIAL, pid, COEF, step_size, bc2_sqrt,
                wd_factor, beta1, beta2, eps, ema_weight, BLOCK: tl.constexpr, HAS_COEF: tl.constexpr,
                MASKED: tl.constexpr):
        """AdamW (torch's fused maths) + EMA lerp of one block of gradient g, and where ``bf16`` the
        updated values' bfloat16 copy at W[t] (``Bf16Weights``); the masks only for a tensor's last,
        partial block (an unmasked block vectorises)."""
        if MASKED:
            p = tl.load(p_ptrs, mask=ok, other=0.0)
            m = tl.load(m_ptrs, mask=ok, other=0.0)
            v = tl.load(v_ptrs, mask=ok, other=0.0)
            e = tl.load(e_ptrs, mask=ok, other=0.0)
        else:
            p = tl.load(p_ptrs)
            m = tl.load(m_ptrs)
            v = tl.load(v_ptrs)
            e = tl.load(e_ptrs)
        tl.store(PARTIAL + pid, tl.sum(g * g, axis=0))  # the unclipped norm, summed per block
        if HAS_COEF:
            g = g * tl.load(COEF)
        p = p * wd_factor  # decoupled weight decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        e = e + ema_weight * (p - e)  # torch.lerp's form for a weight below 0.5
        if MASKED:
            tl.store(p_ptrs, p, mask=ok)
            tl.store(m_ptrs, m, mask=ok)
            tl.store(v_ptrs, v, mask=ok)
            tl.store(e_ptrs, e, mask=ok)
        else:
            tl.store(p_ptrs, p)
            tl.store(m_ptrs, m)
            tl.store(v_ptrs, v)
            tl.store(e_ptrs, e)
        if bf16:
            w_ptrs = _column(W, t, offs, BLOCK, tl.bfloat16)
            if MASKED:
                tl.store(w_ptrs, _bf16_rne(p), mask=ok)
            else:
                tl.store(w_ptrs, _bf16_rne(p))

    @triton.jit
    def _adamw_ema_kernel(P, G, G2, M, V, E, W, NUMEL, STEP_SIZE, BC2_SQRT, BLOCK_T, BLOCK_S, PARTIAL, COEF, SCAL,
                          UNIFORM: tl.constexpr, HAS_COEF: tl.constexpr, HAS_G2: tl.constexpr,
                          NORM_ONLY: tl.constexpr, BLOCK: tl.constexpr):
        """One program: BLOCK elements of tensor t = BLOCK_T[pid] from element BLOCK_S[pid] on.
        P, G, G2, M, V, E hold each tensor's address (int64; G2: a held gradient to add, 0 where
        none); all tensors are float32, contiguous. SCAL (float32, device memory) holds the step's
        scalars, ``SCALARS`` in order: read from memory rather than passed as arguments, so that a
        step captured in a CUDA graph takes each replay's learning rate, bias corrections and EMA
        weight. STEP_SIZE and BC2_SQRT hold lr / (1 - beta1^step) and sqrt(1 - beta2^step) per
        tensor; with UNIFORM (every tensor at the same step count, the usual case) SCAL's first two
        entries hold them for all. NORM_ONLY: only the squared gradient's partial sums (the norm
        that clipping needs first). W holds, per tensor, the address of a bfloat16 copy of the
        parameter (``Bf16Weights``), or 0: where it is not 0, the gradients (G, G2) are bfloat16 too,
        and the update writes the copy. The copies are data, not a compile-time switch: with or
        without them this is one compiled kernel, so each block's norm sum has one layout (Triton
        lays the block out for the bf16 loads; a kernel without that code chose another and summed
        in another order) and the launches stay one per param group -- the norm is the same sum in
        the same order, bit for bit, with or without copies."""
        pid = tl.program_id(0)
        t = tl.load(BLOCK_T + pid)
        start = tl.load(BLOCK_S + pid)
        offs = start + tl.arange(0, BLOCK)
        n = tl.load(NUMEL + t)
        full = start + BLOCK <= n
        bf16 = tl.load(W + t) != 0
        if NORM_ONLY:
            if full:
                g = _grad(G, G2, t, offs, offs < n, bf16, BLOCK, HAS_G2, False)
            else:
                g = _grad(G, G2, t, offs, offs < n, bf16, BLOCK, HAS_G2, True)
            tl.store(PARTIAL + pid, tl.sum(g * g, axis=0))
        else:
            p_ptrs = _column(P, t, offs, BLOCK, tl.float32)
            m_ptrs = _column(M, t, offs, BLOCK, tl.float32)
            v_ptrs = _column(V, t, offs, BLOCK, tl.float32)
            e_ptrs = _column(E, t, offs, BLOCK, tl.float32)
            wd_factor = tl.load(SCAL + 2)
            beta1 = tl.load(SCAL + 3)
            beta2 = tl.load(SCAL + 4)
            eps = tl.load(SCAL + 5)
            ema_weight = tl.load(SCAL + 6)
            if UNIFORM:
                step_size = tl.load(SCAL + 0)
                bc2_sqrt = tl.load(SCAL + 1)
            else:
                step_size = tl.load(STEP_SIZE + t)
                bc2_sqrt = tl.load(BC2_SQRT + t)
            if full:
                g = _grad(G, G2, t, offs, offs < n, bf16, BLOCK, HAS_G2, False)
                _update(p_ptrs, g, m_ptrs, v_ptrs, e_ptrs, W, t, offs, bf16, offs < n, PARTIAL, pid, COEF,
                        step_size, bc2_sqrt, wd_factor, beta1, beta2, eps, ema_weight, BLOCK, HAS_COEF, False)
            else:
                g = _grad(G, G2, t, offs, offs < n, bf16, BLOCK, HAS_G2, True)
                _update(p_ptrs, g, m_ptrs, v_ptrs, e_ptrs, W, t, offs, bf16, offs < n, PARTIAL, pid, COEF,
                        step_size, bc2_sqrt, wd_factor, beta1, beta2, eps, ema_weight, BLOCK, HAS_COEF, True)


def _group_hyper(group: dict) -> tuple[float, float, float, float, float]:
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    return lr, float(group["weight_decay"]), beta1, beta2, float(group["eps"])


def unsupported(opt: torch.optim.Optimizer, ema, shadows: dict | None = None) -> str | None:
    """Why ``FusedAdamWEMA`` cannot run this optimiser + EMA (+ bfloat16 copies), or None when it can."""
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
            if p.data_ptr() % ALIGN or ema_of[id(p)].data_ptr() % ALIGN:
                return f"a parameter of shape {tuple(p.shape)} (or its EMA copy) is not {ALIGN}-byte aligned"
            copy = (shadows or {}).get(id(p))
            if copy is not None and (copy.dtype != torch.bfloat16 or copy.shape != p.shape
                                     or not copy.is_contiguous() or copy.data_ptr() % ALIGN):
                return (f"the bfloat16 copy of a parameter of shape {tuple(p.shape)} is {copy.dtype} "
                        f"{tuple(copy.shape)}, contiguous={copy.is_contiguous()}, or not {ALIGN}-byte aligned")
    if triton is None:
        return "triton is not installed"
    return None


class FusedAdamWEMA:
    """``opt.step()`` (torch.optim.AdamW), ``ema.update(step)`` and the gradient norm in one kernel.

    ``step(ema_step, max_norm)`` returns the gradients' total 2-norm before clipping (a 0-d device
    tensor, as ``clip_grad_norm_``); with ``max_norm`` the update uses the gradients clipped to it
    (``clip_grad_norm_``'s coefficient; the .grad tensors themselves are left as they are).
    Parameters without a gradient this step are skipped by AdamW (as torch does) and still
    EMA-updated; EMA entries that are not optimised (frozen parameters) and buffers are updated as
    ``EMA.update`` does.

    ``shadows`` (``training.bf16_weights.Bf16Weights``): id(float32 parameter) -> its bfloat16 copy
    in the model; that parameter's gradient is read from the copy's .grad (bfloat16), and the kernel
    writes the updated value's copy. ``zero_grad`` clears both.
    """

    def __init__(self, opt: torch.optim.AdamW, ema, *, block: int = BLOCK, shadows: dict | None = None):
        why = unsupported(opt, ema, shadows)
        if why:
            raise ValueError(f"FusedAdamWEMA cannot run here: {why}")
        self.opt, self.ema, self.block = opt, ema, int(block)
        # id(fp32 parameter) -> its bfloat16 copy in the model (``Bf16Weights``): the gradient is read
        # from the copy's .grad, and the update writes the copy
        self._shadows = dict(shadows or {})
        ema_of = {id(p): e for e, p in ema._pairs}
        self._groups = [[(p, ema_of[id(p)]) for p in group["params"]] for group in opt.param_groups]
        optimised = {id(p) for group in opt.param_groups for p in group["params"]}
        self._ema_only = [(e, p) for e, p in ema._pairs if id(p) not in optimised]
        self._steps: dict[int, int] = {}  # id(param) -> its AdamW step count, mirrored on the host
        self._step_tensors: dict[int, torch.Tensor] = {}
        self._grad_addrs: dict = {}  # ("g" or "g2", group, present tensors) -> (host list, device tensor), last step
        self._plans: dict = {}  # (group, present tensors) -> ``_plan``
        self._held: dict[int, torch.Tensor] | None = None  # id(param) -> gradient held by ``hold_grads``
        dev = next((p.device for group in opt.param_groups for p in group["params"]), torch.device("cpu"))
        self._ema_weight = torch.zeros(1, dtype=torch.float32, device=dev)  # 1 - decay, for the EMA-only lerp
        self._captured: list | None = None  # the launches of a captured update (``prepare_launches``)

    def hold_grads(self) -> None:
        """Set the optimised parameters' gradients aside (their .grad becomes None), so that the
        next backward writes its gradients instead of adding them into these one launch per
        parameter; ``step`` adds the two inside its kernel (4 more bytes read per parameter instead
        of autograd's 12 and a launch each). Once per step: while gradients are held, a second
        call does nothing and later backwards accumulate into .grad as usual. One process only:
        DDP all-reduces .grad, which would miss the held part."""
        if self._held is not None:
            return
        held = {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                source = self.grad_source(p)
                if source.grad is not None:
                    held[id(p)] = source.grad
                    source.grad = None
        self._held = held

    def zero_grad(self) -> None:
        """``opt.zero_grad(set_to_none=True)``, and the bfloat16 copies' gradients too."""
        self.opt.zero_grad(set_to_none=True)
        for copy in self._shadows.values():
            copy.grad = None

    def grad_source(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor whose .grad is p's gradient: its bfloat16 copy in the model, or p itself."""
        return self._shadows.get(id(p), p)

    def prepare_launches(self) -> list[dict]:
        """For a step whose backward was captured in a CUDA graph (``training.graph_step``): the
        update's host side for the gradients the captured backward writes (their tables are sent
        now, outside any graph). Capture ``launch(result)`` next, then call ``before_replay`` before
        each replay: the kernels read the step's scalars from device buffers, so the graph takes
        each step's learning rate, bias corrections and EMA weight."""
        self._captured = self._launches()
        return self._captured

    def before_replay(self, ema_step: int) -> None:
        """Before each replay of the captured update (the eager ``step``'s host side): the step
        counts advance and the scalars of step ``ema_step`` go to the buffers the kernels read."""
        if self._captured is None:
            raise RuntimeError("no update was prepared for capture: call prepare_launches() first")
        self._write_scalars(self._captured, ema_step)

    def step_counts(self) -> dict[int, int]:
        """The host's mirror of every parameter's AdamW step count (``set_step_counts`` restores it
        after the state tensors were restored in place, e.g. by ``graph_step.graph_check``)."""
        return dict(self._steps)

    def set_step_counts(self, counts: dict[int, int]) -> None:
        self._steps.clear()
        self._steps.update(counts)

    def _device_addresses(self, key, tensors: list, dev) -> torch.Tensor:
        """The addresses of ``tensors`` (0 for None) as a device int64 tensor, re-sent only when
        they changed since the last step with this key (the allocator usually hands out the same
        memory)."""
        addrs = [0 if t is None else t.data_ptr() for t in tensors]
        last = self._grad_addrs.get(key)
        if last is not None and last[0] == addrs:
            return last[1]
        on_device = self._to_device(addrs, torch.int64, dev)
        self._grad_addrs[key] = (addrs, on_device)
        return on_device

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

    def _table(self, pairs, states) -> dict:
        """Addresses of p, m, v, e, w (the bfloat16 copies; 0 where there is none) and the block ->
        (tensor, start) map for one set of tensors."""
        dev = pairs[0][0].device
        block_t, block_s = [], []
        for i, (p, _) in enumerate(pairs):
            starts = range(0, p.numel(), self.block)
            block_t.extend([i] * len(starts))
            block_s.extend(starts)
        columns = ([p.data_ptr() for p, _ in pairs], [st["exp_avg"].data_ptr() for st in states],
                   [st["exp_avg_sq"].data_ptr() for st in states], [e.data_ptr() for _, e in pairs],
                   [self._shadows[id(p)].data_ptr() if id(p) in self._shadows else 0 for p, _ in pairs])
        return dict(
            addrs=[torch.tensor(col, dtype=torch.int64, device=dev) for col in columns],
            numel=torch.tensor([p.numel() for p, _ in pairs], dtype=torch.int64, device=dev),
            block_t=torch.tensor(block_t, dtype=torch.int32, device=dev),
            block_s=torch.tensor(block_s, dtype=torch.int64, device=dev),
        )

    @staticmethod
    def _staged(values: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        """``values`` on the host, pinned for a CUDA device: the copy does not wait for the queued GPU work."""
        host = torch.tensor(values, dtype=dtype)
        return host.pin_memory() if dev.type == "cuda" else host

    @classmethod
    def _to_device(cls, values: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        return cls._staged(values, dtype, dev).to(dev, non_blocking=True)

    @classmethod
    def _write(cls, buffer: torch.Tensor, values: list) -> None:
        """``buffer`` := values, queued behind the GPU work already enqueued."""
        buffer.copy_(cls._staged(values, buffer.dtype, buffer.device).reshape(buffer.shape), non_blocking=True)

    def _plan(self, gi: int, present: tuple[int, ...], chosen: list) -> dict:
        """What a step of one group needs besides the gradients: AdamW's states, their step
        tensors, the device tables and the scalars' buffers -- rebuilt only when the optimiser's
        state was replaced (load_state_dict: new exp_avg / exp_avg_sq tensors), a parameter or EMA
        tensor moved, or the set of parameters with a gradient changed."""
        key = (gi, present)
        plan = self._plans.get(key)
        ident = [t.data_ptr() for p, e in chosen for t in (p, e, self.grad_source(p))]
        if plan is not None and plan["opt_state"] is self.opt.state and plan["ident"] == ident:
            return plan
        states = [self._state(p) for p, _ in chosen]
        dev = chosen[0][0].device
        plan = dict(opt_state=self.opt.state, ident=ident, table=self._table(chosen, states),
                    step_tensors=[st["step"] for st in states], ids=[id(p) for p, _ in chosen],
                    scal=torch.zeros(len(SCALARS), dtype=torch.float32, device=dev),
                    per_tensor=torch.zeros((2, len(chosen)), dtype=torch.float32, device=dev))
        self._plans[key] = plan
        return plan

    @staticmethod
    def _kernel_ready(grads: list, copies: list, dtypes: list) -> list:
        """Gradients as the kernel reads them: of ``dtypes`` (float32; bfloat16 for a parameter with a
        bfloat16 copy), contiguous, 16-byte aligned. One that is not contiguous or aligned (a view
        into a bucket, say) gets a buffer of its own, and (buffer, gradient) goes to ``copies``:
        ``launch`` copies it there first, so that a captured update replays the copy with the rest
        instead of reading the values of the step it was prepared at."""
        for g, dtype in zip(grads, dtypes):
            if g is not None and g.dtype != dtype:
                raise ValueError(f"FusedAdamWEMA needs a {dtype} gradient for a parameter of shape "
                                 f"{tuple(g.shape)}; it is {g.dtype}")
        ready = []
        for g in grads:
            if g is not None and not (g.is_contiguous() and g.data_ptr() % ALIGN == 0):
                copies.append((torch.empty(g.shape, dtype=g.dtype, device=g.device), g))
                g = copies[-1][0]
            ready.append(g)
        return ready

    @torch.no_grad()
    def step(self, ema_step: int, max_norm: float | None = None) -> torch.Tensor:
        launches = self._launches()
        self._write_scalars(launches, ema_step)
        return self.launch(launches, max_norm)

    def _launches(self) -> list[dict]:
        """Host side, part 1: each group's plan and gradient tables (held gradients joined in)."""
        held, self._held = self._held or {}, None
        for group in self.opt.param_groups:  # a gradient that is only held is the gradient
            for p in group["params"]:
                source = self.grad_source(p)
                if source.grad is None and id(p) in held:
                    source.grad = held.pop(id(p))
        launches = []
        for gi, (group, pairs) in enumerate(zip(self.opt.param_groups, self._groups)):
            present = tuple(i for i, (p, _) in enumerate(pairs) if self.grad_source(p).grad is not None)
            if not present:
                continue
            chosen = pairs if len(present) == len(pairs) else [pairs[i] for i in present]
            plan = self._plan(gi, present, chosen)
            dev = chosen[0][0].device
            copies = []
            dtypes = [torch.bfloat16 if id(p) in self._shadows else torch.float32 for p, _ in chosen]
            gs = self._kernel_ready([self.grad_source(p).grad for p, _ in chosen], copies, dtypes)
            g2s = self._kernel_ready([held.get(id(p)) for p, _ in chosen], copies, dtypes)
            has_g2 = any(g is not None for g in g2s)
            g_addrs = self._device_addresses(("g", gi, present), gs, dev)
            g2_addrs = self._device_addresses(("g2", gi, present), g2s, dev) if has_g2 else g_addrs
            counts = {self._steps[i] for i in plan["ids"]}  # (all advance by one: uniform stays uniform)
            launches.append(dict(group=group, plan=plan, g=g_addrs, g2=g2_addrs, has_g2=has_g2, dev=dev,
                                 blocks=plan["table"]["block_t"].numel(), uniform=len(counts) == 1,
                                 copies=copies, alive=gs + g2s))  # (held gradients kept alive)
        self._rest = list(self._ema_only)  # EMA for what AdamW does not touch: frozen parameters, no gradient
        for pairs in self._groups:
            self._rest += [(e, p) for p, e in pairs if self.grad_source(p).grad is None]
        return launches

    def _write_scalars(self, launches: list[dict], ema_step: int) -> None:
        """Host side, part 2: the step counts advance, and every launch's scalars (``SCALARS``)
        go to its device buffer."""
        ema_weight = 1.0 - self.ema.decay_at(ema_step)
        for ln in launches:
            plan = ln["plan"]
            lr, wd, beta1, beta2, eps = _group_hyper(ln["group"])
            counts = [self._steps[i] + 1 for i in plan["ids"]]
            self._steps.update(zip(plan["ids"], counts))
            step_size = [lr / (1.0 - beta1**n) for n in counts]
            bc2_sqrt = [math.sqrt(1.0 - beta2**n) for n in counts]
            self._write(plan["scal"], [step_size[0], bc2_sqrt[0], 1.0 - lr * wd, beta1, beta2, eps, ema_weight])
            if not ln["uniform"]:  # (set by ``_launches``: the counts all advance by one)
                self._write(plan["per_tensor"], step_size + bc2_sqrt)
        if self._rest:
            self._write(self._ema_weight, [ema_weight])

    def launch(self, launches: list[dict], max_norm: float | None = None) -> torch.Tensor:
        """Device side: the kernels (the norm first when clipping), the step counters, the EMA of
        the rest and the buffers -- nothing here reads the host's values of this step."""
        for ln in launches:
            for buffer, grad in ln["copies"]:
                buffer.copy_(grad)
        coef = None
        if max_norm is not None and launches:  # the norm must be known before the update
            sums = []
            for ln in launches:
                partial = torch.empty(ln["blocks"], dtype=torch.float32, device=ln["dev"])
                table, unused = ln["plan"]["table"], partial  # NORM_ONLY reads only G, G2, W and the block map
                _adamw_ema_kernel[(ln["blocks"],)](
                    unused, ln["g"], ln["g2"], unused, unused, unused, table["addrs"][4], table["numel"], unused,
                    unused, table["block_t"], table["block_s"], partial, unused, unused,
                    UNIFORM=True, HAS_COEF=False, HAS_G2=ln["has_g2"], NORM_ONLY=True, BLOCK=self.block,
                    num_warps=WARPS)
                sums.append(partial.sum())
            norm = torch.stack(sums).sum().sqrt()
            coef = torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0).to(torch.float32)
        partials = []
        for ln in launches:
            plan, n_blocks = ln["plan"], ln["blocks"]
            table, per_tensor = plan["table"], plan["per_tensor"]
            partial = torch.empty(n_blocks, dtype=torch.float32, device=ln["dev"])
            p_addrs, m_addrs, v_addrs, e_addrs, w_addrs = table["addrs"]
            _adamw_ema_kernel[(n_blocks,)](
                p_addrs, ln["g"], ln["g2"], m_addrs, v_addrs, e_addrs, w_addrs, table["numel"], per_tensor[0],
                per_tensor[1], table["block_t"], table["block_s"], partial, coef if coef is not None else partial,
                plan["scal"], UNIFORM=ln["uniform"], HAS_COEF=coef is not None, HAS_G2=ln["has_g2"], NORM_ONLY=False,
                BLOCK=self.block, num_warps=WARPS)
            torch._foreach_add_(plan["step_tensors"], 1.0)
            partials.append(partial)
        for e, p in self._rest:  # (few tensors: frozen parameters, parameters without a gradient)
            e.lerp_(p.detach(), self._ema_weight[0])
        self.ema.copy_buffers()
        if not partials:
            return torch.zeros(())
        return (partials[0] if len(partials) == 1 else torch.cat(partials)).sum().sqrt()


class OpByOpUpdate:
    """The same step as ``FusedAdamWEMA`` with torch's ops one after the other: the gradient norm
    (clipping with ``max_norm``), ``opt.step()``, ``ema.update(ema_step)``. Any optimiser."""

    def __init__(self, opt: torch.optim.Optimizer, ema):
        self.opt, self.ema = opt, ema

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, ema_step: int, max_norm: float | None = None) -> torch.Tensor:
        from mdtzoo.training.loop import grad_norm_

        params = [p for group in self.opt.param_groups for p in group["params"]]
        norm = grad_norm_(params, max_norm)
        self.opt.step()
        self.ema.update(ema_step)
        return norm


UPDATE_MODES = ("auto", "fused", "op_by_op")


def check_update_mode(mode: str, device: torch.device | None = None, optimizer: str | None = None) -> str:
    """``mode`` if valid (and, for 'fused', runnable on ``device`` with the trainer's ``optimizer``
    name); else a ValueError saying why."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"unknown update mode {mode!r}; valid: {', '.join(UPDATE_MODES)}")
    if mode == "fused" and optimizer not in (None, "adamw"):
        raise ValueError(f"update mode 'fused' runs AdamW only; train.optimizer is {optimizer!r}. "
                         "Use update mode 'auto' or 'op_by_op'")
    if mode == "fused" and triton is None:
        raise ValueError("update mode 'fused' needs triton, which is not installed; use 'auto' or 'op_by_op'")
    if (mode == "fused" and device is not None and device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError(f"FusedAdamWEMA runs on CUDA (or in Triton's interpreter, TRITON_INTERPRET=1); "
                         f"the parameters are on {device}. Use update mode 'auto' or 'op_by_op'")
    return mode


def make_update(opt: torch.optim.Optimizer, ema, mode: str = "auto", shadows: dict | None = None):
    """The step's optimiser side: ``'fused'`` (``FusedAdamWEMA``; an error says why when it cannot
    run), ``'op_by_op'`` (``OpByOpUpdate``), or ``'auto'``: fused on CUDA where supported. With
    ``shadows`` (``Bf16Weights``) only the fused update can run."""
    check_update_mode(mode)
    if shadows:
        if mode == "op_by_op":
            raise ValueError("bfloat16 Linear weights need the fused update; the update mode is 'op_by_op'")
        return FusedAdamWEMA(opt, ema, shadows=shadows)
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
