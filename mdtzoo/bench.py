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

def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_train_step(model_name: str = "mdt_xl2", batch: int = 64, *, compile: bool = False,
                     precision: str = "auto", passes: str = "auto", steps: int = 10, warmup: int = 3,
                     peak_tflops: float = DEFAULT_PEAK_TFLOPS, device: str | None = None,
                     seed: int = 0, log=None) -> dict:
    """Time the trainer's step for a preset at ImageNet latent shape; returns a result dict.

    An out-of-memory error does not raise: the result has ``status='oom'``.
    """
    from mdtzoo.diffusion import build_diffusion
    from mdtzoo.models import build_model
    from mdtzoo.training.ema import EMA
    from mdtzoo.training.loop import make_optimizer
    from mdtzoo.training.objective import DiffusionObjective

    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, steps >= 1, warmup >= 0; got {batch}, {steps}, {warmup}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16', 'fp32' or 'auto'; got {precision!r}")
    log = log or (lambda *_: None)
    result = dict(
        model=model_name, batch=batch, precision=precision, compile=bool(compile), passes=passes,
        steps=steps, warmup=warmup, peak_tflops=peak_tflops, device=dev.type,
        card=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
        date=datetime.date.today().isoformat(), status="ok",
    )
    torch.manual_seed(seed)
    # ImageNet latents: 32x32x4, 1000 classes (the presets' defaults, stated for clarity).
    model = build_model(model_name, input_size=32, in_channels=4, num_classes=1000)
    passes = resolve_passes(model, passes)
    flops = train_step_flops(model, batch, passes)
    result.update(passes=passes, flops_per_step=flops, params=sum(p.numel() for p in model.parameters()))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's GPU runs (fp32 uses TF32 matmuls)
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times: list[float] = []
    try:
        model = model.to(dev).train()
        diffusion = build_diffusion()
        opt = make_optimizer(model.parameters(), "adamw", 1e-4, 0.0, (0.9, 0.999), fused=cuda)
        ema = EMA(model, 0.9999, warmup=True)
        objective = DiffusionObjective(model, diffusion, passes, "all", seed=seed)
        step_fn = torch.compile(objective) if compile else objective
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        g = torch.Generator(device=dev).manual_seed(seed)
        x0 = torch.randn(batch, 4, 32, 32, device=dev, generator=g)
        y = torch.randint(0, 1000, (batch,), device=dev, generator=g)

        def one_step(step: int) -> None:
            with autocast:
                out = step_fn(x0, y, step)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(step + 1)

        start = time.perf_counter()
        for step in range(warmup):
            one_step(step)
            if cuda:
                torch.cuda.synchronize(dev)
            log(f"warm-up step {step + 1}/{warmup}: {time.perf_counter() - start:.1f}s")
        result["warmup_s"] = time.perf_counter() - start
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
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        result.update(status="oom", error=str(err).splitlines()[0][:300])
    finally:
        if cuda:
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if result["status"] == "ok":
        median = statistics.median(times)
        tflops = flops / median / 1e12
        result.update(step_ms=median * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                      img_per_s=batch / median, tflops=tflops, peak_fraction=tflops / peak_tflops)
    return result


def format_result(r: dict) -> str:
    """One human line for a result dict."""
    head = (f"{r['model']} b{r['batch']} {r['precision']}{' compile' if r['compile'] else ''} "
            f"passes={r['passes']}")
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    if r.get("status") != "ok":
        return f"{head}: {r.get('status', '?').upper()} ({r.get('error', '')}){mem}"
    return (f"{head}: {r['img_per_s']:,.1f} img/s, step {r['step_ms']:.1f} ms (median of {r['steps']}), "
            f"{r['tflops']:.1f} TFLOP/s = {100 * r['peak_fraction']:.1f}% of {r['peak_tflops']:g}{mem}")


def markdown_table(results: list[dict]) -> str:
    """A Markdown table of result dicts (``mdtzoo bench table``)."""
    lines = ["| model | batch | precision | compile | passes | img/s | step ms | TFLOP/s | % peak | peak GiB | card |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        if r.get("status") == "ok":
            nums = (f"{r['img_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.0f} | "
                    f"{100 * r['peak_fraction']:.0f}%")
        else:
            nums = f"{r.get('status', '?')} | - | - | -"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | "
                     f"{r['passes']} | {nums} | {mem} | {r.get('card', '-')} |")
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
