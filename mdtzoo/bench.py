"""Training-step benchmark: analytic FLOP count and a timed train step (``mdtzoo bench train-step``).

FLOPs are matrix-multiply FLOPs (2 per multiply-add), counted from the model's shapes:
patch embed, timestep MLP, per block adaLN (per image), qkv, attention QK^T and AV, proj,
MLP, skip linears; the side-interpolator's block(s) in the masked pass; the final layer.
Forward + backward = 3x forward (the convention behind SPEC section 6's TFLOP/s). The
masked pass runs the encoder on the kept tokens only (K = int(N (1 - ratio)); the mean over
draws for a jittered ratio) and the interpolator and decoder on all N tokens.

Checked against the DiT paper's forward "Gflops" (fvcore multiply-adds) in tests:
DiT-XL/2 118.64 G, L/2 80.71 G, B/2 23.01 G, S/2 6.06 G per image.

The timed step is the trainer's (``training/loop.py``): DiffusionObjective forward (optionally
torch.compile'd, as ``train.compile``) under bf16 autocast, backward, grad-norm, fused AdamW
step, zero_grad, EMA update; random latents, warm-up steps, then the median of per-step times
(CUDA events on a GPU, perf_counter on the CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import statistics
import time

import torch
from torch import nn

PASS_CHOICES = ("auto", "both", "full", "masked")
DEFAULT_PEAK_TFLOPS = 790.0  # measured H100 bf16 matmul peak (SPEC section 6)
BACKWARD_FACTOR = 3  # forward + backward (grad wrt inputs and wrt weights) = 3x forward


def _linear_macs(layer: nn.Module | None) -> int:
    """Multiply-adds of one nn.Linear per row of input (in_features * out_features)."""
    return 0 if layer is None else layer.in_features * layer.out_features


def block_macs(block: nn.Module, tokens: int) -> int:
    """Forward multiply-adds of one transformer Block on ``tokens`` tokens (one image)."""
    attn = block.attn
    d = attn.qkv.in_features
    per_token = (_linear_macs(attn.qkv) + _linear_macs(attn.proj) + _linear_macs(block.mlp.fc1)
                 + _linear_macs(block.mlp.fc2) + _linear_macs(block.skip_linear))
    attention = 2 * tokens * tokens * d  # QK^T and AV, over all heads
    return tokens * per_token + attention + _linear_macs(block.adaLN_modulation[-1])


def expected_kept_tokens(model: nn.Module, draws: int = 64) -> float:
    """Mean number of tokens the encoder sees in a masked pass (N for a symmetric encoder)."""
    n = model.num_tokens
    if model.symmetric:
        return float(n)
    g = torch.Generator().manual_seed(0)
    kept = [model.sample_mask(1, "cpu", g).ids_keep.shape[1] for _ in range(draws)]
    return float(sum(kept)) / len(kept)


def forward_macs(model: nn.Module, masked: bool = False, kept: float | None = None) -> float:
    """Forward multiply-adds for one image: the full pass, or the masked pass with ``kept`` encoder tokens."""
    n = model.num_tokens
    p, c = model.patch_size, model.in_channels
    embed = model.x_embedder.proj
    macs = n * p * p * c * embed.out_channels  # patch embed (a stride-p conv = per-token linear)
    macs += _linear_macs(model.t_embedder.mlp[0]) + _linear_macs(model.t_embedder.mlp[2])
    enc_tokens = n
    if masked:
        enc_tokens = expected_kept_tokens(model) if kept is None else float(kept)
    n_enc = model.num_encoder_blocks
    for i, block in enumerate(model.blocks):
        macs += block_macs(block, enc_tokens if i < n_enc else n)
    if masked and model.interp is not None:
        macs += sum(block_macs(b, n) for b in model.interp.blocks)
    final = model.final_layer
    macs += n * _linear_macs(final.linear) + _linear_macs(final.adaLN_modulation[-1])
    return float(macs)


def resolve_passes(model: nn.Module, passes: str) -> str:
    if passes not in PASS_CHOICES:
        raise ValueError(f"passes must be one of {PASS_CHOICES}; got {passes!r}")
    if passes == "auto":
        return "both" if getattr(model, "interp", None) is not None else "full"
    if passes != "full" and getattr(model, "interp", None) is None:
        raise ValueError(f"passes={passes!r} needs a masked pass; this model has no side-interpolator")
    return passes


def train_step_flops(model: nn.Module, batch: int, passes: str = "auto") -> float:
    """Matmul FLOPs of one training step (forward + backward) on ``batch`` images.

    passes: 'full' (DiT), 'both' (MDT: full + masked pass), 'masked', or 'auto' (both when
    the model has a side-interpolator).
    """
    passes = resolve_passes(model, passes)
    macs = 0.0
    if passes in ("both", "full"):
        macs += forward_macs(model)
    if passes in ("both", "masked"):
        macs += forward_macs(model, masked=True)
    return 2.0 * BACKWARD_FACTOR * macs * batch


# -- the timed step ---------------------------------------------------------------------------

def _kernel_ops_mode() -> str | None:
    """How our Triton kernels reach the compiled graphs (``models.kernel_ops.MODE``), for the
    results: 'triton' (traced, launched by inductor) or 'custom' (opaque ops); None without Triton."""
    from mdtzoo.models import kernel_ops

    return kernel_ops.MODE if kernel_ops.HAS_TRITON else None


def _kernel_settings(width: int) -> dict | None:
    """The launch settings our Triton kernels run with, for the results: the attention kernels'
    CONFIG, the norm kernels' at the model's width and the fused MLP backward's (None without Triton)."""
    from mdtzoo.models import kernel_ops

    if not kernel_ops.HAS_TRITON:
        return None
    from mdtzoo.models import triton_attention, triton_mlp, triton_norm

    return {"attention": dict(triton_attention.CONFIG), "norm": triton_norm.launch_settings(width),
            "mlp": dict(triton_mlp.CONFIG)}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_train_step(model_name: str = "mdt_xl2", batch: int = 64, *, compile: bool | str = False,
                     compile_scope: str = "blocks",
                     precision: str = "auto", passes: str = "auto", steps: int = 10, warmup: int = 3,
                     peak_tflops: float = DEFAULT_PEAK_TFLOPS, device: str | None = None,
                     seed: int = 0, attn_impl: str = "auto", norm_impl: str = "triton", mlp_impl: str = "torch",
                     separate_passes: bool = True,
                     activation_checkpointing: bool = False, profile: bool = False, flex_options: str | None = None,
                     triton_options: str | None = None, inductor_options: str | None = None,
                     update: str = "auto", hold_grads: bool = True, windows: int = 0, graph_step: bool = False,
                     bf16_weights: bool = False, log=None) -> dict:
    """Time the trainer's step for a preset at ImageNet latent shape; returns a result dict.

    ``flex_options``: a ``FLEX_VARIANTS`` name, FlexAttention's kernel options for this run;
    ``triton_options``: a ``TRITON_VARIANTS`` name, our Triton kernel's settings;
    ``inductor_options``: an ``INDUCTOR_VARIANTS`` name, torch.compile's code-generation settings;
    ``update``: the optimiser side as the trainer's ``train.update`` ('auto', 'fused', 'op_by_op');
    ``hold_grads``: as ``train.hold_grads`` (the fused update adds the full pass's gradients);
    ``norm_impl``: the blocks' ``norm_impl`` ('torch', 'triton': ``models.triton_norm``);
    ``mlp_impl``: the blocks' ``mlp_impl`` ('torch', 'triton': ``models.triton_mlp``, 'cublaslt':
    ``models.lt_mlp``);
    ``windows``: after the per-step timing, that many windows of ``steps`` steps each enqueued back to
    back between two CUDA events (one sync per window, as a training loop that does not wait for each
    step): ``window_step_ms`` (median per step) and ``window_img_per_s``.
    ``graph_step``: the step captured as CUDA graphs (``training.graph_step``; the trainer's
    ``train.graph_step``). Before anything is timed, ``GRAPH_CHECK_STEPS`` replayed steps are
    compared with the same steps run eagerly from the same state (``graph_check``). Its peak
    memory (``peak_mem_gib``) is what the caching allocator reserved while the replays were timed
    (``peak_mem_kind='reserved'``): the graphs' pool holds the step's temporaries without counting
    them as allocated (``peak_allocated_gib``).

    ``bf16_weights``: the model's Linear weights and biases in bfloat16, their float32 masters in the
    fused update, which writes the copies (``training.bf16_weights``: no casts in the step; meant
    to be the autocast step bit for bit, which ``graph_check`` shows with ``graph_step``).

    ``batch`` is per process: under torchrun (WORLD_SIZE > 1) the objective is wrapped in DDP
    as in the trainer and img/s counts all processes' images. An out-of-memory error does not
    raise: the result has ``status='oom'``; nor does a failed ``graph_check``: ``status=
    'graph_check_failed'``, with the comparison under ``graph_check``.
    """
    from mdtzoo.training import distributed as dist_util
    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.models import build_model
    from mdtzoo.models.blocks import check_mlp_impl, check_norm_impl
    from mdtzoo.models.transformer import check_compile_scope
    from mdtzoo.models.triton_norm import MAX_WIDTH as MAX_NORM_WIDTH
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.fused_update import FusedAdamWEMA, check_update_mode, make_update
    from mdtzoo.training.graph_step import (GRAPH_CHECK_STEPS, GRAPH_WARMUP, GraphCheckError, StepGraph,
                                            check_fixed_keep, check_graph_step, graph_check)
    from mdtzoo.training.loop import make_optimizer
    from mdtzoo.training.bf16_weights import Bf16Weights, check_bf16_weights
    from mdtzoo.training.objective import DiffusionObjective, backward_parts, prepare_step, uses_cudagraphs

    if batch < 1 or steps < 1 or warmup < 0 or windows < 0:
        raise ValueError(f"need batch >= 1, steps >= 1, warmup >= 0, windows >= 0; got {batch}, {steps}, {warmup}, "
                         f"{windows}")
    check_flex_variant(flex_options)
    check_triton_variant(triton_options)
    check_inductor_variant(inductor_options)
    check_update_mode(update)
    check_norm_impl(norm_impl)
    check_mlp_impl(mlp_impl)
    check_compile_scope(compile_scope)
    if graph_step and warmup <= GRAPH_WARMUP:
        raise ValueError(f"graph_step needs warmup > {GRAPH_WARMUP} (eager steps, then the capture); got {warmup}")
    if graph_step and update == "op_by_op":
        raise ValueError("graph_step needs the fused update (update 'auto' or 'fused'); got update 'op_by_op'")
    info = dist_util.env_info()
    if info.world > 1:
        info, dev = dist_util.setup(device or "auto")
    else:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    check_update_mode(update, dev)
    if graph_step:
        check_graph_step(dev, info.world, 1, compile)
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16', 'fp32' or 'auto'; got {precision!r}")
    if bf16_weights:
        check_bf16_weights(precision=precision, update=update, world=info.world, hold_grads=hold_grads,
                           mlp_impl=mlp_impl, separate_passes=separate_passes)
        check_update_mode("fused", dev)  # (the fused update writes the copies: CUDA, or Triton's interpreter)
    log = log or (lambda *_: None)
    result = dict(
        model=model_name, batch=batch, precision=precision, compile=compile if isinstance(compile, str) else bool(compile),
        passes=passes, compile_scope=compile_scope,
        steps=steps, warmup=warmup, peak_tflops=peak_tflops, device=dev.type, world=info.world,
        attn_impl=attn_impl, norm_impl=norm_impl, mlp_impl=mlp_impl, flex_options=flex_options, triton_options=triton_options,
        inductor_options=inductor_options, separate_passes=bool(separate_passes), kernel_ops=_kernel_ops_mode(),
        graph_step=bool(graph_step), bf16_weights=bool(bf16_weights),
        activation_checkpointing=bool(activation_checkpointing),
        card=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
        date=datetime.date.today().isoformat(), status="ok",
    )
    torch.manual_seed(seed)
    times: list[float] = []
    window_times: list[float] = []
    variant = contextlib.ExitStack()  # the kernel variants hold from the checks to the last timed step
    variant.enter_context(flex_variant(flex_options))
    variant.enter_context(triton_variant(triton_options))
    variant.enter_context(inductor_variant(inductor_options))
    try:
        # ImageNet latents: 32x32x4, 1000 classes (the presets' defaults, stated for clarity).
        model = build_model(model_name, input_size=32, in_channels=4, num_classes=1000, attn_impl=attn_impl,
                            norm_impl=norm_impl, mlp_impl=mlp_impl)
        if mlp_impl != "torch" and cuda:  # the fused GELU, checked at the model's width first
            result["mlp_errors"] = check_mlp(model.hidden_size, device=dev, impl=mlp_impl)
            if mlp_impl == "cublaslt":
                from mdtzoo.models import lt_mlp

                result["lt_wgrad_epilogue"] = lt_mlp.WGRAD_EPILOGUE  # (MDTZOO_LT_WGRAD)
            log(f"fused MLP checked against timm's Mlp: {result['mlp_errors']}")
        if norm_impl == "triton" and cuda and model.hidden_size <= MAX_NORM_WIDTH:  # the kernels the blocks will run,
            # checked at the model's width before anything is timed (wider rows take the torch maths)
            result["norm_errors"] = check_norm(model.hidden_size, device=dev, compile=bool(compile))
            log(f"fused norm checked against the block's maths: {result['norm_errors']}")
        passes = resolve_passes(model, passes)
        flops = train_step_flops(model, batch, passes)
        result.update(passes=passes, flops_per_step=flops, params=sum(p.numel() for p in model.parameters()),
                      kernel_settings=_kernel_settings(model.hidden_size))
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's GPU runs (fp32 uses TF32 matmuls)
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        model = model.to(dev).train()
        diffusion = build_diffusion()
        ema = EMA(model, 0.9999, warmup=True)  # (of the float32 model: with bf16 weights, of their masters)
        weights = Bf16Weights(model, ema) if bf16_weights else None
        opt = make_optimizer(weights.parameters() if weights else model.parameters(), "adamw", 1e-4, 0.0,
                             (0.9, 0.999), fused=cuda)
        updater = make_update(opt, ema, update, shadows=weights.shadows if weights else None)
        fused = isinstance(updater, FusedAdamWEMA)
        objective = DiffusionObjective(model, diffusion, passes, "all", seed=seed)
        cudagraphs = uses_cudagraphs(compile)
        step_fn, parts = prepare_step(objective, dev, info.world, compile=compile, compile_scope=compile_scope,
                                      activation_checkpointing=activation_checkpointing,
                                      separate_passes=separate_passes)
        hold = updater.hold_grads if fused and hold_grads else None
        held = hold is not None and info.world == 1 and len(parts) > 1  # gradients held between backwards
        result["update"] = ("fused+held" if held else "fused") if fused else "op_by_op"
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        g = torch.Generator(device=dev).manual_seed(seed)
        x0 = torch.randn(batch, 4, 32, 32, device=dev, generator=g)
        y = torch.randint(0, 1000, (batch,), device=dev, generator=g)
        graph = None
        if graph_step:
            check_fixed_keep(model)
            graph = StepGraph(objective, step_fn, parts, updater, autocast, hold=hold)

        def one_step(step: int, eager: bool = False):
            """(losses, grad norm) of one training step: replayed, or eager (``eager`` or before the capture)."""
            if graph is not None and step >= GRAPH_WARMUP and not eager:
                return graph(x0, y, step)
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = backward_parts(step_fn, parts, (x0, y, step), autocast, world=info.world,
                                 hold=hold)
            norm = updater.step(step + 1)  # grad norm, AdamW, EMA
            updater.zero_grad()
            return out, norm

        start = time.perf_counter()
        for step in range(warmup):
            one_step(step)
            if cuda:
                torch.cuda.synchronize(dev)
            log(f"warm-up step {step + 1}/{warmup}: {time.perf_counter() - start:.1f}s")
        result["warmup_s"] = time.perf_counter() - start
        if graph is not None:  # replayed steps against the same steps run eagerly, before any timing
            first = warmup
            result["graph_check"] = graph_check(
                lambda eager: [one_step(s, eager) for s in range(first, first + GRAPH_CHECK_STEPS)], model, opt, ema,
                updater, log=log)
            warmup += GRAPH_CHECK_STEPS
            updater.zero_grad()
            torch.cuda.empty_cache()  # the check's eager steps' blocks: the replays need only the graphs' pool
            torch.cuda.reset_peak_memory_stats(dev)
        for step in range(warmup, warmup + steps):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                one_step(step)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                one_step(step)
                times.append(time.perf_counter() - t0)
        for w in range(windows):  # the same steps back to back, as the trainer enqueues them: one sync per window
            first = warmup + steps + w * steps
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            t0 = time.perf_counter()
            for step in range(first, first + steps):
                one_step(step)
            if cuda:
                end.record()
                end.synchronize()
                window_times.append(begin.elapsed_time(end) / 1e3 / steps)
            else:
                window_times.append((time.perf_counter() - t0) / steps)
        if profile:  # the kernels of two more steps
            def two_steps():
                for step in range(warmup + steps, warmup + steps + 2):
                    one_step(step)

            result["profile"] = _profile_table(two_steps, dev, rows=25, per=2,
                                               step_ms=statistics.median(times) * 1e3 if cuda else None)
    except GraphCheckError as err:  # a refusal, not a crash: the comparison goes to the JSON, nothing is timed
        result.update(status="graph_check_failed", error=str(err), graph_check=err.result)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        result.update(status="oom", error=str(err).splitlines()[0][:300])
    finally:
        variant.close()
        if cuda:
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            if graph_step:  # the graphs' pool holds every temporary of the step between replays, unallocated
                result["peak_allocated_gib"] = result["peak_mem_gib"]
                result["peak_mem_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
                result["peak_mem_kind"] = "reserved"
            if mlp_impl == "cublaslt":  # how many of the MLP's matmul problems ran a tuned algorithm
                from mdtzoo.models import cublaslt

                result["lt_tuned_plans"] = cublaslt.tuned_plans()
    if result["status"] == "ok":
        median = statistics.median(times)
        tflops = flops / median / 1e12  # per GPU
        result.update(step_ms=median * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                      img_per_s=batch * info.world / median, tflops=tflops, peak_fraction=tflops / peak_tflops)
        if window_times:
            per_step = statistics.median(window_times)
            result.update(window_step_ms=per_step * 1e3, window_steps_ms=[t * 1e3 for t in window_times],
                          window_img_per_s=batch * info.world / per_step)
    return result


# Device kernels by kind, first match wins (names as torch.profiler reports them on CUDA).
KERNEL_CLASSES = (
    ("LayerNorm + modulate (ours)", ("_norm_fwd_kernel", "_norm_bwd_kernel")),  # before '_fwd_kernel' below
    ("attention", ("flex_attention", "flash", "fmha", "sdpa", "_fwd_kernel", "_bwd_kernel", "_dq_kernel",
                   "_delta_kernel", "kept_grad", "_offset_sum_kernel", "_batch_sum_kernel")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "_dgelu_kernel")),
    ("optimizer, EMA, grad norm", ("multi_tensor_apply", "adam", "lerp", "lpnorm", "foreach")),
    ("compiled elementwise", ("triton_poi", "triton_red", "triton_per")),
    ("copies, casts", ("copy", "catarray")),
    ("eager elementwise", ("elementwise", "reduce", "index", "scatter", "gather", "sort", "distribution", "fill")),
)


def kernel_class(name: str) -> str:
    """The kind of a device kernel, by name (``KERNEL_CLASSES``); 'other' when nothing matches."""
    low = name.lower()
    for kind, keys in KERNEL_CLASSES:
        if any(key in low for key in keys):
            return kind
    return "other"


def _short_kernel_name(name: str, width: int = 110) -> str:
    """A kernel name cut to ``width`` characters, keeping both ends (C++ template names put the
    functor that tells kernels apart at the end)."""
    return name if len(name) <= width else name[: width // 2 - 2] + " .. " + name[-(width - width // 2 - 2):]


# kernel kinds whose individual kernels ``kernel_breakdown`` lists after the compiled ones
_LISTED_KINDS = ("optimizer, EMA, grad norm", "other", "eager elementwise", "copies, casts")


def kernel_breakdown(kernels, per: int = 1, top: int = 12, top_other: int = 5, step_ms: float | None = None) -> str:
    """Where the device time goes: (name, microseconds) of every kernel run -> a text table of
    milliseconds per ``per`` (steps) by kernel kind, then the ``top`` compiled elementwise kernels
    (inductor's names list the ops each one fused) and the ``top_other`` largest kernels of each
    kind in ``_LISTED_KINDS`` (what the optimizer category and the unclassified time are made of).
    With ``step_ms`` (the step's time measured without the profiler) it also says how long the GPU
    idles per step: time the host, not the GPU, bounds."""
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, dict[str, list[float]]] = {}
    for name, us in kernels:
        kind = kernel_class(name)
        by_kind.setdefault(kind, []).append(us)
        by_name.setdefault(kind, {}).setdefault(name, []).append(us)
    total = sum(sum(v) for v in by_kind.values()) or 1.0
    lines = [f"device time per step ({per} profiled), by kernel kind:"]
    for kind, times in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {kind:<28}{sum(times) / per / 1e3:9.2f} ms {100 * sum(times) / total:6.1f}%"
                     f"  {len(times) / per:6g} kernels")
    lines.append(f"  {'total':<28}{total / per / 1e3:9.2f} ms")
    if step_ms is not None:
        busy = total / per / 1e3
        lines.append(f"GPU busy {busy:.1f} ms of the {step_ms:.1f} ms step (timed without the profiler): "
                     f"idle {max(step_ms - busy, 0.0):.1f} ms ({100 * max(step_ms - busy, 0.0) / step_ms:.1f}%)")
    for kind, count in (("compiled elementwise", top),) + tuple((k, top_other) for k in _LISTED_KINDS):
        names = by_name.get(kind)
        if not names or count < 1:
            continue
        lines.append(f"top {count} {kind} kernels (ms per step, calls per step):")
        for name, times in sorted(names.items(), key=lambda kv: -sum(kv[1]))[:count]:
            lines.append(f"  {sum(times) / per / 1e3:7.2f} {len(times) / per:4g}  {_short_kernel_name(name)}")
    return "\n".join(lines)


def _profile_table(fn, dev: torch.device, rows: int, per: int = 1, step_ms: float | None = None) -> str:
    """torch.profiler's table of what ``fn()`` ran, by total device time (CPU time off the GPU);
    on a GPU followed by ``kernel_breakdown`` (``fn`` runs ``per`` steps of ``step_ms`` each)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    if not cuda:
        return table
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return table + "\n" + kernel_breakdown(kernels, per, step_ms=step_ms)


def format_result(r: dict) -> str:
    """One human line for a result dict."""
    cell = _compile_cell(r)
    compiled = {"no": "", "yes": " compile"}.get(cell, f" compile ({cell})")
    head = (f"{r['model']} b{r['batch']} {r['precision']}{compiled} "
            f"passes={r['passes']}{' update=' + r['update'] if 'update' in r else ''}"
            f"{' graph-step' if r.get('graph_step') else ''}{' bf16-weights' if r.get('bf16_weights') else ''}")
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    if r.get("peak_mem_kind") == "reserved":
        mem += " reserved (the graphs' pool included)"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status', '?').upper()} ({r.get('error', '')}){mem}"
    window = ""
    if "window_img_per_s" in r:
        window = (f"; back to back: {r['window_img_per_s']:,.1f} img/s, {r['window_step_ms']:.1f} ms per step "
                  f"(median of {len(r['window_steps_ms'])} windows of {r['steps']})")
    return (f"{head}: {r['img_per_s']:,.1f} img/s, step {r['step_ms']:.1f} ms (median of {r['steps']}), "
            f"{r['tflops']:.1f} TFLOP/s = {100 * r['peak_fraction']:.1f}% of {r['peak_tflops']:g}{mem}{window}")


def _compile_cell(r: dict) -> str:
    """'no', 'yes' (the default mode, each block a region), or the mode and scope that differ."""
    if not r["compile"]:
        return "no"
    parts = [] if r["compile"] in (True, "default") else [str(r["compile"])]
    if r.get("compile_scope", "blocks") != "blocks":
        parts.append(r["compile_scope"])
    return ", ".join(parts) or "yes"


def markdown_table(results: list[dict]) -> str:
    """A Markdown table of result dicts (``mdtzoo bench table``)."""
    lines = ["| model | batch/GPU | GPUs | precision | compile | passes | img/s | step ms | TFLOP/s per GPU | % peak "
             "| peak GiB | card |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        if r.get("peak_mem_kind") == "reserved":
            mem += " reserved"
        compiled = (_compile_cell(r) + (", graph step" if r.get("graph_step") else "")
                    + (", bf16 weights" if r.get("bf16_weights") else ""))
        if r.get("status") == "ok":
            nums = (f"{r['img_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.0f} | "
                    f"{100 * r['peak_fraction']:.0f}%")
        else:
            nums = f"{r.get('status', '?')} | - | - | -"
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('world', 1)} | {r['precision']} | {compiled} | "
                     f"{r['passes']} | {nums} | {mem} | {r.get('card', '-')} |")
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")


# -- attention with the relative-position bias ------------------------------------------------

def _cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` with CUDA events (perf_counter on the CPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _record_errors(worst: dict, key: str, names, got, ref, tol: float, what: str) -> None:
    """The relative errors (norms) of ``got`` against ``ref``, pairwise under ``names``: the worst kept in
    ``worst[key]``; AssertionError naming ``what``, the key and the tensor at the first error >= ``tol``."""
    for name, a, b in zip(names, got, ref):
        err = ((a - b).norm() / b.norm()).item()
        worst[key] = max(worst.get(key, 0.0), err)
        if not err < tol:
            raise AssertionError(f"{what} {key} {name}: relative error {err:.2e} >= {tol}")


def check_mlp(dim: int, *, batch: int = 4, tokens: int = 256, device=None, impl: str = "triton") -> dict:
    """Relative errors of the MLP with the fused GELU (``models.triton_mlp.GeluMLP``; ``impl``: 'triton'
    or 'cublaslt', the block's ``mlp_impl``) against
    timm's ``Mlp`` at width ``dim``: the output and the gradients of the input and all four parameters,
    in float32 (< 1e-5) and under bf16 autocast against the float32 maths (< 2e-2; the module itself
    under autocast is checked alike, so its own error is in the result for scale). Raises
    AssertionError past those bounds; returns the worst errors."""
    from timm.layers import Mlp

    from mdtzoo.models import triton_mlp as tmlp

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(0)
    mlp = Mlp(dim, 4 * dim, act_layer=lambda: torch.nn.GELU(approximate="tanh")).to(dev)
    h0 = torch.randn(batch, tokens, dim, generator=g).to(dev)
    dy = torch.randn(batch, tokens, dim, generator=g).to(dev)

    def run(forward, autocast: bool):
        h = h0.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            y = forward(h)
        y.float().backward(dy)
        return [y.float(), h.grad.float()] + [p.grad.float() for p in mlp.parameters()]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls in float32 (TF32 alone errs by ~4e-4)
    try:
        ref = run(mlp, False)
        worst = {}
        for key, forward, autocast, tol in (("float32", lambda h: tmlp.gelu_mlp(h, mlp, impl), False, 1e-5),
                                            ("bfloat16", lambda h: tmlp.gelu_mlp(h, mlp, impl), True, 2e-2),
                                            ("module_bfloat16", mlp, True, 2e-2)):
            _record_errors(worst, key, ("y", "dh", "dw1", "db1", "dw2", "db2"), run(forward, autocast), ref, tol,
                           "fused MLP")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return worst


def check_norm(dim: int, *, batch: int = 4, tokens: int = 256, device=None, compile: bool = False) -> dict:
    """Relative errors of the fused LayerNorm + modulate kernels (``models.triton_norm``: the first
    LayerNorm with x forked into the residual, the second with the attention's gated residual)
    against the block's own maths: h1, x1, h and the gradients of x, a and the adaLN vector, with
    every input in float32 (< 1e-5) and with a, the adaLN vector, h1 and h in bf16 on a float32
    stream (< 2e-2). ``compile``: also both ops inside one torch.compile'd graph (where inductor
    launches the kernels itself), its errors under ``compiled_float32`` / ``compiled_bfloat16``.
    Raises AssertionError past those bounds; returns the worst errors."""
    from mdtzoo.models import triton_norm as tn

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(batch, tokens, dim, generator=g) * 3 + 1).to(dev)
    a0 = torch.randn(batch, tokens, dim, generator=g).to(dev)
    ada0 = torch.randn(batch, 6 * dim, generator=g).to(dev)

    def chain(fork, gated):  # both LayerNorms of a block, as Block chains them
        def forward(x, a, ada):
            shift1, scale1, gate, shift, scale, _ = ada.chunk(6, dim=1)  # strided views, as the block's adaLN chunks
            res, h1 = fork(x, shift1, scale1, 1e-6)
            x1, h = gated(res, a, gate, shift, scale, 1e-6)
            return h1, x1, h
        return forward

    def run(forward, dtype):
        x = x0.clone().requires_grad_(True)
        a = a0.to(dtype).clone().requires_grad_(True)
        ada = ada0.to(dtype).clone().requires_grad_(True)
        h1, x1, h = forward(x, a, ada)
        (x1.square().sum() + h.float().square().sum() + (h1.float() * a0).sum()).backward()
        return [h1.float(), x1, h.float(), x.grad, a.grad.float(), ada.grad.float()]

    worst = {}
    ref = run(chain(lambda x, sh, sc, eps: (x, tn.reference_norm(x, sh, sc, eps)), tn.reference), torch.float32)
    fused = chain(tn._NormFork.apply, lambda *t: tn._norm_fwd(*t)[:2])
    ways = [("", fused)] + ([("compiled_", torch.compile(fused, fullgraph=True, dynamic=False))] if compile else [])
    for (way, forward), (dtype, tol) in itertools.product(ways, ((torch.float32, 1e-5), (torch.bfloat16, 2e-2))):
        got = run(forward, dtype)
        key = way + str(dtype)[6:]
        _record_errors(worst, key, ("h1", "x1", "h", "dx", "da", "dadaLN"), got, ref, tol, "fused norm")
    return worst


def check_attention(impl: str, *, batch: int = 4, heads: int = 6, grid: int = 16, keep: int = 179,
                    dim: int = 64, device=None, compile: bool = False) -> dict:
    """Relative errors of ``impl`` against the explicit reference: full and masked pass,
    output and gradients (q, k, v, bias table), in float32 (TF32 off) and bf16.

    The float32 errors must be < 1e-5 and bf16 errors < 2e-2 (relative to the float32
    reference); raises AssertionError otherwise. Returns the worst errors.
    """
    from mdtzoo.models.attention import attention
    from mdtzoo.posenc.relbias import RelativePositionBias

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(0)
    n = grid * grid
    bias = RelativePositionBias((grid, grid), heads).to(dev)
    with torch.no_grad():
        bias.relative_position_bias_table.copy_(torch.randn(bias.relative_position_bias_table.shape, generator=g))
    ids = torch.stack([torch.randperm(n, generator=g)[:keep] for _ in range(batch)]).to(dev)
    base = torch.randn(batch, n, 3, heads, dim, generator=g).to(dev)  # packed, as the qkv projection makes it
    fn = torch.compile(attention, dynamic=False) if compile else attention

    def run(which, masked, dtype, f):
        qkv = (base[:, :keep] if masked else base).to(dtype).clone(memory_format=torch.contiguous_format)
        qkv.requires_grad_(True)
        bias.zero_grad(set_to_none=True)
        out = f(*qkv.permute(2, 0, 3, 1, 4), bias, ids if masked else None, impl=which, qkv=qkv)
        out.float().square().sum().backward()
        return [out.float(), *qkv.grad.float().unbind(2), bias.relative_position_bias_table.grad]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    worst = {}
    try:
        for masked in (False, True):
            ref = run("explicit", masked, torch.float32, attention)
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                got = run(impl, masked, dtype, fn)
                key = f"{'masked' if masked else 'full'}_{str(dtype)[6:]}"
                _record_errors(worst, key, ("out", "dq", "dk", "dv", "dtable"), got, ref, tol, f"attention impl {impl!r}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return worst


FLEX_VARIANTS = {  # kernel_options tried by ``bench attention --impl flex:NAME``
    "m64n64s1": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    "m128n64": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    "m64n64w8": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                 "num_warps": 8},
    "m64n64s2": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                 "num_stages": 2},
    "bwd64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
    # the default options with the bias (and its gradient atomics) in float32 instead of q's bf16
    "f32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
            "num_stages": 2, "bias_fp32": True},
    # the default blocks with the bias replicated over G batch groups (fewer colliding gradient atomics)
    **{f"g{g}": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                 "num_stages": 2, "bias_groups": g} for g in (4, 16, 64)},
}


TRITON_VARIANTS = {  # block shapes tried by ``bench attention --impl triton:NAME``
    "64x64": {},
    "f128": {"fwd_bm": 128, "fwd_warps": 8},
    "f128s3": {"fwd_bm": 128, "fwd_warps": 8, "fwd_stages": 3},
    "fn128": {"fwd_bn": 128, "fwd_warps": 8},
    "w8": {"fwd_warps": 8, "bwd_warps": 8},
    "s3": {"fwd_stages": 3, "bwd_stages": 3},
    "b32": {"bwd_bm": 32, "bwd_bn": 64},
    "b128": {"bwd_bm": 64, "bwd_bn": 128, "bwd_warps": 8},
    "pad": {"split_head": False},  # the head dim padded to one power-of-two tile (72 -> 128)
    "dq64": {"dq_bm": 64, "dq_warps": 4},  # dQ in 64-row blocks (slower than 128: docs/performance.md, call (n2))
    "g1": {"grad_programs": 1},  # kept_grad with one program per tile and head, the batch not split (before session 7)
    "sw8": {"fwd_bn": 32, "bwd_stages": 1},  # the best of attn_sweep.py's grid at XL/2 shapes: the default since session 8
    "s7": {"fwd_bn": 64, "bwd_stages": 2},  # the settings before session 8's sweep
}


PERSISTENT_ROWS = "persistent_rows"  # an INDUCTOR_VARIANTS key that is ours, not torch._inductor.config's

INDUCTOR_VARIANTS = {  # torch._inductor.config settings tried by ``bench train-step --inductor-options NAME``
    # each generated kernel's block sizes tuned by coordinate descent at compile time
    "cdt": {"coordinate_descent_tuning": True},
    # fuse nodes even where inductor sees no shared memory traffic to save
    "agg": {"aggressive_fusion": True},
    "cdt_agg": {"coordinate_descent_tuning": True, "aggressive_fusion": True},
    # compiled graphs launch their kernels from generated C++ instead of Python (less host time)
    "cpp": {"cpp_wrapper": True},
    # rows of up to 2048 elements reduced in registers (inductor stops at 1024, so XL's 1152-wide
    # LayerNorms loop over each row, reading it twice); not a config key: a choices handler
    "rows2048": {PERSISTENT_ROWS: 2048},
}


def _check_variant(name: str | None, variants: dict, kind: str) -> str | None:
    """``name`` if it is None or one of ``variants``; else a ValueError naming the valid ones."""
    if name is not None and name not in variants:
        raise ValueError(f"unknown {kind} variant {name!r}; valid: {', '.join(variants)}")
    return name


def check_flex_variant(name: str | None) -> str | None:
    return _check_variant(name, FLEX_VARIANTS, "FlexAttention")


@contextlib.contextmanager
def flex_variant(name: str | None):
    """FlexAttention's kernel options set to ``FLEX_VARIANTS[name]`` while inside (None: unchanged).

    Blocks compiled inside keep the options they were traced with. An unknown name is refused,
    naming the valid ones, before anything is changed.
    """
    if check_flex_variant(name) is None:
        yield
        return
    from mdtzoo.models import attention as attn_mod

    saved = dict(attn_mod.FLEX_KERNEL_OPTIONS)
    attn_mod.FLEX_KERNEL_OPTIONS.clear()
    attn_mod.FLEX_KERNEL_OPTIONS.update(FLEX_VARIANTS[name])
    attn_mod._flex.cache_clear()
    torch._dynamo.reset()
    try:
        yield
    finally:
        attn_mod.FLEX_KERNEL_OPTIONS.clear()
        attn_mod.FLEX_KERNEL_OPTIONS.update(saved)
        attn_mod._flex.cache_clear()


def check_inductor_variant(name: str | None) -> str | None:
    return _check_variant(name, INDUCTOR_VARIANTS, "inductor")


@contextlib.contextmanager
def inductor_variant(name: str | None):
    """torch._inductor.config patched with ``INDUCTOR_VARIANTS[name]`` while inside (None: unchanged).
    Dynamo's caches are reset first, so blocks compile afresh under the new settings."""
    if check_inductor_variant(name) is None:
        yield
        return
    import torch._inductor.config as inductor_config

    settings = dict(INDUCTOR_VARIANTS[name])
    rows = settings.pop(PERSISTENT_ROWS, None)
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        if rows is not None:
            stack.enter_context(persistent_rows(rows))
            settings["fx_graph_cache"] = False  # the cache's key does not see a choices handler
        stack.enter_context(inductor_config.patch(**settings))
        yield


@contextlib.contextmanager
def persistent_rows(limit: int):
    """Inductor keeps a whole row in registers (a persistent reduction) for inner reductions of up
    to ``limit`` elements while inside; its own limit is 1024 (``InductorChoices``)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        def should_use_persistent_reduction(self, features, cooperative_reduction):
            if super().should_use_persistent_reduction(features, cooperative_reduction):
                return True
            if cooperative_reduction or features.get_reduction_hint() != ReductionHint.INNER:
                return False
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)

    previous = V.choices
    V.set_choices_handler(WideRows())
    try:
        yield
    finally:
        V.set_choices_handler(previous)


POWER_OF_TWO = ("_bm", "_bn", "_bp", "_bq", "_bb", "_warps", "_rows")  # settings' suffixes Triton needs as 2^k


def triton_settings(spec: str) -> dict:
    """The CONFIG updates a ``--triton-options`` value stands for: a ``TRITON_VARIANTS`` name, or
    ``key=value`` pairs joined by commas (``fwd_bn=32,bwd_stages=1``: integer values, ``true`` /
    ``false`` for ``split_head``), keys from ``triton_attention.CONFIG``, or from
    ``triton_norm.CONFIG`` with a ``norm.`` prefix (``norm.bwd_rows=1,norm.bwd_warps=16``, kept
    prefixed in the result). Anything else is a ValueError naming what is valid."""
    if spec in TRITON_VARIANTS:
        return dict(TRITON_VARIANTS[spec])
    if "=" not in spec:
        raise ValueError(f"unknown Triton variant {spec!r}; valid: {', '.join(TRITON_VARIANTS)}, "
                         "or key=value settings such as fwd_bn=32,bwd_stages=1 or norm.bwd_rows=1")
    from mdtzoo.models import triton_attention, triton_norm

    settings = {}
    for pair in spec.split(","):
        key, _, value = pair.partition("=")
        key, value = key.strip(), value.strip().lower()
        config, name = (triton_norm.CONFIG, key[5:]) if key.startswith("norm.") else (triton_attention.CONFIG, key)
        if name not in config:
            valid = [*triton_attention.CONFIG, *(f"norm.{k}" for k in triton_norm.CONFIG)]
            raise ValueError(f"unknown Triton setting {key!r} in {spec!r}; valid: {', '.join(valid)}")
        if isinstance(config[name], bool):
            if value not in ("true", "false"):
                raise ValueError(f"Triton setting {key} takes true or false, not {value!r}")
            settings[key] = value == "true"
        elif value.isdigit() and int(value) > 0:
            settings[key] = int(value)
            if name.endswith(POWER_OF_TWO) and int(value) & (int(value) - 1):
                raise ValueError(f"Triton setting {key} is a tile side or a warp count: it takes a power of two, "
                                 f"not {value}")
        else:
            raise ValueError(f"Triton setting {key} takes a positive integer, not {value!r}")
    return settings


def check_triton_variant(name: str | None) -> str | None:
    """``name`` if it is None or a valid ``triton_settings`` spec; else a ValueError."""
    if name is not None:
        triton_settings(name)
    return name


@contextlib.contextmanager
def triton_variant(name: str | None):
    """Our Triton kernel's CONFIG updated with ``triton_settings(name)`` (a variant's name or
    key=value pairs) while inside (None: unchanged). An unknown name or setting is refused, naming
    the valid ones, before anything is changed."""
    if check_triton_variant(name) is None:
        yield
        return
    from mdtzoo.models import triton_attention, triton_norm
    from mdtzoo.models.kernel_ops import overridden

    settings = triton_settings(name)
    norm = {k[5:]: v for k, v in settings.items() if k.startswith("norm.")}
    attention = {k: v for k, v in settings.items() if not k.startswith("norm.")}
    with overridden(triton_attention.CONFIG, attention), overridden(triton_norm.CONFIG, norm):
        yield


def bench_attention(impls=("explicit", "auto", "sdpa", "flex"), *, batch: int = 256, heads: int = 6,
                    grid: int = 16, keep: int = 179, dim: int = 64, compile: bool = True, repeats: int = 20,
                    device=None, log=None) -> list[dict]:
    """Forward + backward time of biased attention (bf16), full and masked pass, per impl.

    Shapes default to MDT-S/2's (B 256, H 6, N 256, K 179 kept at ratio 0.3); q, k and v come packed
    in one (B, N, 3, H, d) tensor, as the model's qkv projection makes them. Every impl is
    checked against the explicit reference (``check_attention``) before it is timed; the
    flash kernel without any bias is timed too, as the floor.
    """
    from mdtzoo.models.attention import IMPLS, attention
    from mdtzoo.posenc.relbias import RelativePositionBias

    valid = [*IMPLS, *(f"flex:{k}" for k in FLEX_VARIANTS), *(f"triton:{k}" for k in TRITON_VARIANTS)]
    unknown = [i for i in impls if i not in valid]
    if unknown:
        raise ValueError(f"unknown attention path(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    if not 0 < keep <= grid * grid:
        raise ValueError(f"keep must be in 1..{grid * grid} (the grid's {grid}x{grid} tokens); got {keep}")
    log = log or (lambda *_: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = grid * grid
    bias = RelativePositionBias((grid, grid), heads).to(dev)
    # kept positions in grid order, as the model's masked pass passes them (MaskOut.in_grid_order)
    ids = torch.stack([torch.randperm(n, device=dev)[:keep] for _ in range(batch)]).sort(dim=1).values
    qkv0 = torch.randn(batch, n, 3, heads, dim, device=dev, dtype=torch.bfloat16)  # as the qkv projection makes it
    results = []
    for impl in (*impls, "no-bias"):
        row = {"impl": impl, "compile": bool(compile and not impl.startswith("flex")), "batch": batch,
               "heads": heads, "tokens": n, "kept": keep}
        impl_name, _, variant = impl.partition(":")
        with contextlib.ExitStack() as variants:
            if impl_name == "triton" and variant:
                variants.enter_context(triton_variant(variant))
            elif impl_name == "flex" and variant:
                variants.enter_context(flex_variant(variant))
            try:
                log(f"attention {impl}: checking against the explicit reference, then timing "
                    f"(compiles first; a stall here is the compilation)")
                if impl != "no-bias":
                    row["errors"] = check_attention(impl_name, heads=heads, grid=grid, keep=keep, dim=dim,
                                                    device=dev, compile=row["compile"])
                fn = torch.compile(attention, dynamic=False) if row["compile"] else attention
                for masked in (False, True):
                    qkv = (qkv0[:, :keep] if masked else qkv0).detach().contiguous().requires_grad_(True)
                    rel = None if impl == "no-bias" else bias
                    which = "auto" if impl == "no-bias" else impl_name

                    def step(backward=True):
                        out = fn(*qkv.permute(2, 0, 3, 1, 4), rel, ids if (masked and rel is not None) else None,
                                 impl=which, qkv=qkv)
                        if backward:
                            out.backward(torch.ones_like(out))

                    name = "masked" if masked else "full"
                    row[f"{name}_ms"] = _cuda_time(step, repeats) * 1e3
                    with torch.no_grad():
                        row[f"{name}_fwd_ms"] = _cuda_time(lambda: step(False), repeats) * 1e3
                row["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - a failing kernel is a result row, not a crash
                row.update(status="error", error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        log(f"attention {impl}: {row}")
        results.append(row)
    return results


# -- sampling ---------------------------------------------------------------------------------

def sample_flops(model: nn.Module, steps: int, guided: bool) -> float:
    """Matmul FLOPs to sample one image: ``steps`` full-pass forwards, two per step with CFG."""
    return 2.0 * forward_macs(model) * steps * (2 if guided else 1)


def bench_sample(model_name: str = "mdt_xl2", batch: int = 128, *, steps: int = 250,
                 guidance: str = "power_cosine", precision: str = "bf16", compile: bool | str = True,
                 attn_impl: str = "auto", repeats: int = 2, check: int = 8, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
                 device: str | None = None, seed: int = 0, profile: bool = False, flex_options: str | None = None,
                 triton_options: str | None = None, log=None) -> dict:
    """Time ``batch`` images of ``steps``-step DDPM sampling (VAE excluded) at ImageNet latent shape.

    With ``check`` > 0, first samples ``check`` images with the fast settings and with the
    unoptimised path (``unoptimised``: fp32, explicit attention, the torch LayerNorm maths, no
    compile) from the same seed (random weights scaled so the network's output matters) and reports
    their differences. ``compile``: True,
    False or a torch.compile mode for the blocks ('reduce-overhead' replays CUDA graphs).
    ``profile``: the top kernels of 3 more sampling steps at the timed batch, in ``result['profile']``.
    ``flex_options``: a ``FLEX_VARIANTS`` name, FlexAttention's kernel options for this run;
    ``triton_options``: a ``TRITON_VARIANTS`` name, our Triton kernel's settings.
    """
    from mdtzoo.training.objective import compile_mode
    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.models import build_model
    from mdtzoo.sample import generate

    log = log or (lambda *_: None)
    mode = compile_mode(compile)  # validated before any work, as the variant names are on entering
    with flex_variant(flex_options), triton_variant(triton_options):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = dev.type == "cuda"
        torch.manual_seed(seed)
        model = build_model(model_name, input_size=32, in_channels=4, num_classes=1000, attn_impl=attn_impl).to(dev)
        with torch.no_grad():  # DiT init zeroes the output layers; random weights make the check meaningful
            for name, p in model.named_parameters():
                if p.dim() > 1 and ("adaLN" in name or "final_layer.linear" in name):
                    p.normal_(0, 0.005)
        model.eval()
        diffusion = build_diffusion(respacing=str(steps))
        guided = guidance != "none"
        flops = sample_flops(model, steps, guided)
        result = dict(model=model_name, batch=batch, steps=steps, guidance=guidance, precision=precision,
                      compile=mode or False, attn_impl=attn_impl, flex_options=flex_options,
                      triton_options=triton_options, kernel_ops=_kernel_ops_mode(),
                      kernel_settings=_kernel_settings(model.hidden_size), device=dev.type,
                      card=torch.cuda.get_device_name(dev) if cuda else "cpu",
                      torch=torch.__version__, date=datetime.date.today().isoformat(), flops_per_image=flops,
                      peak_tflops=peak_tflops, status="ok")
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.cuda.reset_peak_memory_stats(dev)
        kwargs = dict(labels="uniform", seed=seed, device=dev, num_classes=1000)
        if check:
            with unoptimised(model):
                ref, _ = _latents(generate, model, diffusion, guidance, check, "fp32", kwargs)
        if mode:
            model.compile_blocks(mode)
        if check:
            fast, _ = _latents(generate, model, diffusion, guidance, check, precision, kwargs)
            diff = (fast - ref).abs()
            result.update(check_images=check, check_max_abs_diff=diff.max().item(),
                          check_mean_abs_diff=diff.mean().item(), check_ref_std=ref.std().item(),
                          check_rel_diff=((fast - ref).norm() / ref.norm()).item())
            log(f"sample check: max |fast - reference| = {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
                f"reference std {ref.std().item():.3g}")
        warm = build_diffusion(respacing="2")
        _latents(generate, model, warm, guidance, batch, precision, kwargs)  # compile at the timed shape
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            _latents(generate, model, diffusion, guidance, batch, precision, kwargs)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            log(f"sampled {batch} images in {times[-1]:.1f}s")
        median = statistics.median(times)
        tflops = flops * batch / median / 1e12
        result.update(seconds=median, img_per_s=batch / median, tflops=tflops, peak_fraction=tflops / peak_tflops)
        if profile:  # the kernels of 3 more sampling steps
            three = build_diffusion(respacing="3")
            result["profile"] = _profile_table(
                lambda: _latents(generate, model, three, guidance, batch, precision, kwargs), dev, rows=30, per=3)
        if cuda:
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        return result


@contextlib.contextmanager
def unoptimised(model):
    """Inside, every block of ``model`` runs the reference maths: explicit attention, the torch
    LayerNorm + modulate steps and timm's MLP (no kernels of ours); the blocks' settings are restored
    after."""
    blocks = list(model.all_blocks())
    saved = [(blk.attn.impl, blk.norm_impl, blk.mlp_impl) for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.impl, blk.norm_impl, blk.mlp_impl = "explicit", "torch", "torch"
        yield model
    finally:
        for blk, (attn, norm, mlp) in zip(blocks, saved):
            blk.attn.impl, blk.norm_impl, blk.mlp_impl = attn, norm, mlp


def _latents(generate, model, diffusion, guidance, num, precision, kwargs):
    """generate() returning the float latents (no VAE): a pass-through 'decoder' keeps them."""
    keep = []

    class Keep:
        def decode(self, x):
            keep.append(x.float().cpu())
            return x[:, :3]

    generate(model, diffusion, "ddpm", guidance, num_samples=num, batch_size=num, vae=Keep(),
             precision=precision, **kwargs)
    return torch.cat(keep), None
