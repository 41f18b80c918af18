"""``train()``: the gin-configurable training entry point (one trainer for every variant).

gin files -> train() -> run directory. The model comes from ``build`` (sized to the
dataset), the diffusion from ``diffusion.build_diffusion``, the data from the
``datasets`` registry. A run resumes from its last checkpoint with the same data
order and random draws; SIGTERM / SIGUSR1 (SLURM preemption) checkpoint before exit;
a NaN/Inf loss stops the run naming the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import signal
import sys
import time
from pathlib import Path

import gin
import torch

from mdtzoo import config as cfg
from mdtzoo.models.transformer import check_compile_scope
from mdtzoo.registry import DATASETS, METRICS
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training import distributed as dist_util
from mdtzoo.training.bf16_weights import Bf16Weights, check_bf16_model, check_bf16_weights
from mdtzoo.training.data import StepSampler, check_batch_split, check_dataset_size, make_loader
from mdtzoo.training.ema import EMA
from mdtzoo.training.fused_update import check_update_mode, make_update
from mdtzoo.training.graph_step import GRAPH_WARMUP, StepGraph, check_fixed_keep, check_graph_step
from mdtzoo.training.heldout import heldout_loss
from mdtzoo.training.objective import (DiffusionObjective, backward_parts, check_passes, prepare_step,
                                      uses_cudagraphs)
from mdtzoo.training.rundir import RunDir, write_text

OPTIMIZERS = ("adamw", "adan")
VAE_STREAM = 101  # generator stream of the on-the-fly posterior samples (objective.py uses 0..5)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the step."""


class _Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag the loop checks after each step."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if sys.platform != "win32":
            try:
                for s in self.SIGNALS:
                    self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._old = {}
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class _DeferredCheck:
    """A step's loss (and, under DDP, the all-reduced preemption flag) read without waiting for the step.

    ``bool(loss)`` on a CUDA tensor waits until the GPU has run everything enqueued so far: the queue
    drains every step, and the next step's first kernels wait for the host to launch them (the S/2
    steps lost 4.5-18% to it in ``bench train-step``, docs/performance.md, session 13). Instead each
    step's values are copied to pinned host memory behind a CUDA event, and read one step later
    (``previous``) or before anything that must not see a bad step -- a checkpoint, an evaluation, a
    log line (``current``): by then the GPU is past that event, so reading waits for nothing queued
    after it. A non-finite loss still stops the run before the next checkpoint is written. The pinned
    buffers and events are a small ring, allocated once (a pinned allocation per step would cost more
    than the wait it saves).
    """

    SLOTS = 4

    def __init__(self, device: torch.device, width: int = 2):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple] = []  # (step, slot, value read early or None), oldest first
        self.next = 0
        if self.cuda:
            self.host = torch.empty((self.SLOTS, width), dtype=torch.float32, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(self.SLOTS)]
        else:
            self.host = torch.empty((self.SLOTS, width), dtype=torch.float32)

    def push(self, step: int, values: torch.Tensor) -> None:
        slot = self.next
        # (the loop keeps at most two pending) a step still in the slot about to be reused is read first
        self.pending = [(at, None, self._read(s)) if s == slot else (at, s, v) for at, s, v in self.pending]
        self.next = (slot + 1) % self.SLOTS
        self.host[slot].copy_(values.detach().float(), non_blocking=self.cuda)
        if self.cuda:
            self.events[slot].record()
        self.pending.append((step, slot, None))

    def _read(self, slot: int) -> torch.Tensor:
        if self.cuda:
            self.events[slot].synchronize()
        return self.host[slot].clone()

    def _resolve(self, keep: int) -> list[tuple[int, torch.Tensor]]:
        done, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return [(at, self._read(slot) if value is None else value) for at, slot, value in done]

    def previous(self):
        """Every step's values but the last pushed, oldest first: [(step, values)]."""
        return self._resolve(keep=1)

    def current(self):
        """Every pushed step's values, oldest first (waits for the last step's loss)."""
        return self._resolve(keep=0)


def check_options(*, compile, compile_scope: str, update: str, optimizer: str, precision: str, graph_step: bool,
                  global_batch: int, micro_batch: int | None, device: torch.device, world: int,
                  bf16_weights: bool = False, hold_grads: bool = True, separate_passes: bool = True) -> None:
    """A ValueError naming the first of the trainer's options (``train.*``) that cannot run on
    ``world`` processes of ``device``'s kind: the checks that need no data, model or GPU. ``train``
    runs them before any work, and a sweep's validation before anything is submitted (with the
    job's process count and device kind from its resources)."""
    uses_cudagraphs(compile)
    check_compile_scope(compile_scope)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    check_update_mode(update, device, optimizer)
    if precision not in ("bf16", "fp32", "auto"):
        raise ValueError(f"precision must be 'bf16', 'fp32' or 'auto'; got {precision!r}")
    check_batch_split(global_batch, micro_batch, world)
    if graph_step:
        per_rank = global_batch // world
        check_graph_step(device, world, per_rank // (micro_batch or per_rank), compile)
        if update == "op_by_op" or optimizer != "adamw":
            raise ValueError(f"train.graph_step needs the fused update (AdamW, update 'auto' or 'fused'); this run "
                             f"has optimizer {optimizer!r}, update {update!r}")
    if bf16_weights:
        per_rank = global_batch // world
        check_bf16_weights(precision=_resolve_precision(precision, device), update=update, world=world,
                           hold_grads=hold_grads, separate_passes=separate_passes,
                           accumulation=per_rank // (micro_batch or per_rank))
        try:
            check_update_mode("fused", device, optimizer)  # (the fused update writes the copies)
        except ValueError as e:
            raise ValueError(f"train.bf16_weights needs the fused update: {e}") from None


def _resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision``: 'auto' is bf16 on a GPU, fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_passes(passes: str, model) -> str:
    """``train.passes``: 'auto' is 'both' for a model with a side-interpolator, else 'full'."""
    if passes == "auto":
        return "both" if getattr(model, "interp", None) is not None else "full"
    return passes


def check_vae(data, dataset: str, vae: str | None) -> None:
    """A ValueError if ``train.vae`` is set for data that already holds latents; a
    ``VAEWeightsNotFoundError`` if its weights are not on this machine (from the file tree alone)."""
    if vae is None:
        return
    if getattr(data, "latent", False):
        raise ValueError(f"train.vae is set but {dataset!r} already holds latents; remove train.vae")
    from mdtzoo.vae import check_vae_available

    check_vae_available(vae)


def check_run(data, model, *, passes: str, masked_loss_on: str, global_batch: int, eval_every: int,
              eval_metrics, graph_step: bool, bf16_weights: bool = False) -> None:
    """A ValueError naming the first of the trainer's options that does not fit the data or the
    model (which may be on the meta device): the passes for the model, a global batch larger than
    the data, in-run metrics that are not run metrics, a captured step with a varying kept count,
    bf16 weights for a model without Linear layers or with the Triton MLP.
    ``train`` runs it before the run directory is made, a sweep's validation before submission."""
    check_passes(model, resolve_passes(passes, model), masked_loss_on)
    check_dataset_size(len(data), global_batch)
    if eval_every:
        from mdtzoo import evaluation  # registers the run metrics

        for name in eval_metrics or ():
            if not evaluation.is_run_metric(name):  # an unknown name fails here, listing the known ones
                raise ValueError(f"train.eval_metrics takes run metrics (no reference batch); {name!r} is not "
                                 f"one: {', '.join(n for n in METRICS.names() if evaluation.is_run_metric(n))}")
    if graph_step:
        check_fixed_keep(model)
    if bf16_weights:
        check_bf16_model(model)


def check_bound_options(world: int, device: torch.device, data, model) -> None:
    """``check_options``, ``check_vae`` and ``check_run`` on the parsed gin config's ``train.*``
    bindings (the trainer's defaults where unbound), for ``world`` processes on ``device``'s kind
    (``train.device``, when bound, wins), the training data and the model built for it."""
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}

    def value(name):
        try:
            return gin.query_parameter(f"train.{name}")
        except ValueError:  # not bound
            return defaults[name]

    bound = value("device")
    if bound not in (None, "auto"):
        device = torch.device(bound)
    check_options(compile=value("compile"), compile_scope=value("compile_scope"), update=value("update"),
                  optimizer=value("optimizer"), precision=value("precision"), graph_step=value("graph_step"),
                  global_batch=value("global_batch"), micro_batch=value("micro_batch"), device=device, world=world,
                  bf16_weights=value("bf16_weights"), hold_grads=value("hold_grads"),
                  separate_passes=value("separate_passes"))
    check_vae(data, value("dataset"), value("vae"))
    check_run(data, model, passes=value("passes"), masked_loss_on=value("masked_loss_on"),
              global_batch=value("global_batch"), eval_every=value("eval_every"), eval_metrics=value("eval_metrics"),
              graph_step=value("graph_step"), bf16_weights=value("bf16_weights"))


def make_optimizer(params, name: str, lr: float, weight_decay: float, betas, fused: bool):
    """AdamW (the paper: lr 3e-4, no weight decay) or Adan (MDT v2; from pytorch-optimizer)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        kwargs = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.9, 0.999)))
        if fused:
            kwargs["fused"] = True
        return torch.optim.AdamW(params, **kwargs)
    if name == "adan":
        from pytorch_optimizer import Adan

        return Adan(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas or (0.98, 0.92, 0.99)))
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def grad_norm_(parameters, max_norm: float | None = None) -> torch.Tensor:
    """The gradients' total 2-norm (what the trainer logs); with ``max_norm`` they are also clipped
    to it (``clip_grad_norm_``). Without a clip no rescaling pass runs: clip_grad_norm_ with an
    infinite bound still multiplies every gradient by 1.0 (a read and write of all of them: 3.74
    against 1.56 ms for MDT-XL/2's 700M parameters on an H100, docs/performance.md)."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is not None or not hasattr(torch.nn.utils, "get_total_norm"):  # (torch < 2.6)
        return torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
    if not params:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def configured_diffusion(**overrides):
    """``diffusion.build_diffusion`` with the gin bindings of the run applied."""
    return gin.get_configurable("diffusion.build_diffusion")(**overrides)


def build_for_dataset(dataset, autoencoder=None):
    """The ``build`` root's model, sized to the dataset (or to its VAE latents when images are
    encoded on the fly); a conflicting gin binding is an error."""
    shape = dict(input_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes)
    if autoencoder is not None:
        if dataset.image_size % autoencoder.downsample:
            raise ValueError(f"image size {dataset.image_size} is not divisible by the VAE's {autoencoder.downsample}x")
        shape.update(input_size=dataset.image_size // autoencoder.downsample, in_channels=autoencoder.latent_channels)
    for key, value in shape.items():
        try:
            bound = gin.query_parameter(f"build.{key}")
        except ValueError:
            continue
        if bound != value:
            raise cfg.ConfigError(
                f"build.{key} = {bound} but the dataset {getattr(dataset, 'name', '')!r} has {key} {value}; "
                "remove the binding (train sizes the model to its data) or pick matching data"
            )
    return cfg.call_root(cfg.build, **shape)


@gin.configurable("train")
def train(
    run_dir: str = gin.REQUIRED,
    dataset: str = gin.REQUIRED,
    steps: int = 1000,
    global_batch: int = 256,
    micro_batch: int | None = None,
    optimizer: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas: tuple | None = None,
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    ema_decay: float = 0.9999,
    ema_warmup: bool = True,
    passes: str = "auto",
    masked_loss_on: str = "all",
    precision: str = "auto",
    compile: bool | str = False,
    compile_scope: str = "blocks",
    separate_passes: bool = True,
    activation_checkpointing: bool = False,
    update: str = "auto",
    hold_grads: bool = True,
    graph_step: bool = False,
    bf16_weights: bool = False,
    seed: int = 0,
    log_every: int = 50,
    ckpt_every: int = 1000,
    keep_checkpoints: int = 2,
    keep_every: int = 0,
    heldout_every: int = 0,
    heldout_items: int = 256,
    heldout_timesteps: int = 10,
    sample_every: int = 0,
    eval_every: int = 0,
    eval_metrics: tuple | None = None,
    eval_samples: int | None = None,
    eval_sample_steps: str = "100",
    sample_count: int = 16,
    sample_respacing: str = "100",
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    tensorboard: bool = False,
    vae: str | None = None,
) -> dict:
    """Train one run into ``run_dir``; returns {'status': 'done'|'preempted', 'step': ..., 'run_dir': ...}.

    global_batch: images per optimiser step over all processes; micro_batch: images per
    forward per process (default global_batch / world; smaller means gradient accumulation).
    passes: 'both' (MDT: full + masked), 'full' (DiT; MDT's Table 5d "Full"), 'masked'
    (Table 5d "Masked"), 'auto' = 'both' when the model has a side-interpolator, else 'full'.
    masked_loss_on: 'all' tokens (default) or 'removed' tokens only (Table 5e).
    precision: 'bf16' autocast, 'fp32', or 'auto' (bf16 on GPU, fp32 on CPU).
    compile: torch.compile every transformer block (regional: one graph per token count, no
      graph breaks; the random draws, masks and loss stay eager). True, or a torch.compile mode:
      'reduce-overhead' also replays each block as CUDA graphs (less CPU launch overhead: small
      models; see docs/performance.md).
    compile_scope: what one compiled region is -- 'blocks' (each transformer block) or 'stacks'
      (the encoder's blocks, and the decoder's: fewer region calls, a longer compile).
    separate_passes: backpropagate MDT's full and masked pass one after the other (the same
      gradient as one backward of the sum; only one pass's activations are alive at a time).
    activation_checkpointing: recompute block activations in the backward (less memory, slower).
    update: the optimiser side of a step -- 'fused' (AdamW, EMA and the gradient norm in one Triton
      kernel, ``training.fused_update``; CUDA, AdamW), 'op_by_op' (the norm, ``opt.step()``, the EMA
      update one after the other; any optimiser), or 'auto' (fused where it can run).
    hold_grads: with the fused update on one process, the first backward's gradients (MDT's full
      pass) are set aside and the update kernel adds them to the masked pass's, instead of autograd
      adding them one launch per parameter (one gradient-sized buffer more while the masked pass
      runs; False: autograd accumulates, as op_by_op and DDP always do).
    graph_step: after ``GRAPH_WARMUP`` eager steps, capture the whole step (forward, backward and the
      fused update) as CUDA graphs and replay it (``training.graph_step``): the host launches two
      graphs a step instead of thousands of kernels. On an H100 the replayed steps were bitwise the
      eager ones at every benchmarked size, so a resumed run (two eager steps, then a new capture)
      still replays the uninterrupted one; ``bench train-step --graph-step`` checks that on your card.
      There it gave 1-5% more img/s than eager steps run back to back, as this loop runs them
      (docs/performance.md, session 15). Needs one CUDA process, no gradient
      accumulation, the fused update (AdamW), compile's default mode, and a masking strategy that
      keeps a fixed number of tokens; each is checked before any work.
    bf16_weights: the model's Linear weights and biases are bfloat16 parameters and their float32
      masters live in the fused update, which writes their copies (``training.bf16_weights``):
      autocast has no weight to cast and no gradient to cast back. The steps are the autocast
      steps bit for bit (on an H100, session 16), and checkpoints hold the float32 masters under
      the model's names, as without the option. With ``graph_step``, ``bench train-step`` gave
      MDT-XL/2 2.1% more img/s, DiT-XL/2 2.5% and MDT-S/2 1.6% (docs/performance.md, session 16).
      Needs bf16 precision, the fused update (AdamW; CUDA), one process, one micro-batch, held
      gradients, separate passes and mlp_impl 'torch' or 'cublaslt'; each is checked before any work.
    heldout_every / heldout_items / heldout_timesteps: the held-out loss (EMA weights) every so many
      steps, on the first ``heldout_items`` held-out items at ``heldout_timesteps`` evenly spaced t.
    keep_every: checkpoints at multiples of this step are never pruned (0: keep only the newest
      ``keep_checkpoints``); evaluate them later with ``mdtzoo eval RUN --step N``.
    eval_every / eval_metrics / eval_samples / eval_sample_steps: in-run evaluation of the EMA
      weights every so many steps (and at the end) with registered run metrics (default:
      heldout_loss, plus relation_acc on the relations data): RUN/eval/step_X.json and its PNG grid,
      exactly what ``mdtzoo eval RUN --step X`` would write from that step's checkpoint, without
      keeping the checkpoint. Checkpointing and evaluation time is left out of the logged img/s.
    ema_warmup: EMA decay min(ema_decay, (1+step)/(10+step)) so short runs' EMA weights are
      usable (the paper's DiT-style EMA has no warm-up: set False; over 400k steps it changes nothing).
    vae: encode images with this VAE on the fly ('ema', 'mse', a local directory; offline) and
      train on posterior samples, as the reference code does; pre-extracted latents
      (``datasets.latents``, ``mdtzoo extract``) are much cheaper for long runs.
    tensorboard: also write every logged record to RUN/tensorboard (needs the tensorboard package).
    """
    cudagraphs = uses_cudagraphs(compile)  # checks the value before any work
    info, dev = dist_util.setup(device)
    check_options(compile=compile, compile_scope=compile_scope, update=update, optimizer=optimizer,
                  precision=precision, graph_step=graph_step, global_batch=global_batch, micro_batch=micro_batch,
                  device=dev, world=info.world, bf16_weights=bf16_weights, hold_grads=hold_grads,
                  separate_passes=separate_passes)
    run = RunDir(run_dir)
    config_text = cfg.config_str()
    if run.is_done():  # before any work: a finished run is never touched
        run.prepare(config_text)

    # Everything a bad config can break is built before the run directory is touched.
    data = DATASETS.build(dataset, split="train")
    autoencoder = None
    check_vae(data, dataset, vae)
    if vae is not None:
        from mdtzoo.vae import load_vae

        autoencoder = load_vae(vae, device=dev)
    torch.manual_seed(seed)  # the initial weights are part of the run's seed
    model = build_for_dataset(data, autoencoder).to(dev)
    check_run(data, model, passes=passes, masked_loss_on=masked_loss_on, global_batch=global_batch,
              eval_every=eval_every, eval_metrics=eval_metrics, graph_step=graph_step, bf16_weights=bf16_weights)
    from mdtzoo.models.lt_mlp import check_library  # (here: importing the package registers no MLP ops)

    check_library(model, dev)  # mlp_impl='cublaslt' on CUDA: the library is there
    diffusion = configured_diffusion()
    writer = _tensorboard_writer(run) if (tensorboard and info.is_main) else None
    if info.is_main:
        run.prepare(config_text)
    dist_util.barrier()
    passes = resolve_passes(passes, model)
    world_batch = global_batch // info.world
    micro_batch = micro_batch or world_batch
    precision = _resolve_precision(precision, dev)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    start, state = 0, None
    latest = run.latest_checkpoint()
    if latest is not None:  # (float32 weights: loaded before any become bfloat16)
        state = ckpt.load(latest, map_location=dev)
        model.load_state_dict(state["model"])
    ema = EMA(model, ema_decay, ema_warmup)
    weights = Bf16Weights(model, ema) if bf16_weights else None  # the EMA and the optimiser get the masters
    opt = make_optimizer(weights.parameters() if weights else model.parameters(), optimizer, lr, weight_decay, betas,
                         fused=dev.type == "cuda")
    if state is not None:
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if info.is_main:
            run.truncate_metrics(start)
    if start >= steps:
        if info.is_main:
            run.mark_done(start)
        return {"status": "done", "step": start, "run_dir": str(run.path)}

    updater = make_update(opt, ema, update, shadows=weights.shadows if weights else None)
    hold = getattr(updater, "hold_grads", None) if hold_grads else None  # (the fused update's)
    objective = DiffusionObjective(model, diffusion, passes, masked_loss_on, seed=seed)
    step_fn, parts = prepare_step(objective, dev, info.world, compile=compile, compile_scope=compile_scope,
                                  activation_checkpointing=activation_checkpointing, separate_passes=separate_passes)
    sampler = StepSampler(len(data), global_batch, micro_batch, info.rank, info.world, seed, start, steps - start)
    loader = make_loader(data, sampler, num_workers)
    accum = world_batch // micro_batch
    graph = (StepGraph(objective, step_fn, parts, updater, autocast, hold=hold,
                       max_norm=grad_clip or None) if graph_step else None)
    heldout = DATASETS.build(dataset, split="heldout") if (heldout_every or sample_every or eval_every) else None

    def save(step: int) -> None:
        if info.is_main:
            state = {
                "model": (weights or model).state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "seed": seed, "world": info.world, "config": config_text,
                "model_shape": {"input_size": model.input_size, "in_channels": model.in_channels,
                                "num_classes": model.num_classes},
                "latent": bool(getattr(data, "latent", False) or autoencoder is not None),
                "vae": vae or getattr(data, "vae_id", None),
                "torch_rng": torch.get_rng_state(),
            }
            ckpt.atomic_save(state, ckpt.checkpoint_path(run.checkpoints, step))
            ckpt.prune(run.checkpoints, keep_checkpoints, keep_every)
        dist_util.barrier()

    def evaluate(step: int) -> None:
        if not info.is_main:
            return
        if heldout_every and heldout is not None:
            record = heldout_loss(ema.model, diffusion, heldout, num_timesteps=heldout_timesteps,
                                  max_items=heldout_items, seed=seed, device=dev)
            run.log({"step": step, "kind": "heldout", **record})
            _to_tensorboard(writer, {"step": step, "kind": "heldout", **record})
        if sample_every:
            _sample_grid(run, ema.model, step, data, sample_count, sample_respacing, seed, dev)
        if eval_every and (step % eval_every == 0 or step == steps):
            from mdtzoo.evaluation import evaluate_model

            result = evaluate_model(ema.model, heldout, run.path, step, metrics=eval_metrics,
                                    num_samples=eval_samples, sample_steps=eval_sample_steps, seed=seed,
                                    vae=autoencoder, device=dev)
            run.log({"step": step, "kind": "eval", **result["metrics"]})

    step, window, t_last, status = start, [], time.perf_counter(), "done"
    checks = _DeferredCheck(dev)

    def verify(resolved) -> bool:
        """Raise on the first non-finite loss among resolved steps; else whether any asked to stop."""
        stop = False
        for at, (loss, flag) in ((at, values.tolist()) for at, values in resolved):
            if not math.isfinite(loss):
                message = (f"loss is {loss} at step {at}; stopped. The last good checkpoint "
                           f"is {run.latest_checkpoint()}")
                if info.is_main:
                    run.mark_failed(message)
                raise NonFiniteLossError(message)
            stop = stop or flag > 0
        return stop

    bar = _progress_bar(start, steps) if (progress and info.is_main) else None
    batches = iter(loader)
    model.train()
    with _Preemption() as preempt:
        while step < steps:
            for group in opt.param_groups:  # linear warm-up, then constant (the paper's schedule)
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            losses = {}
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            replay = graph is not None and step >= start + GRAPH_WARMUP  # (else eager: compiles, then the capture)
            for micro in range(accum):
                x0, y = next(batches)
                x0, y = x0.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                offset = info.rank * world_batch + micro * micro_batch
                if autoencoder is not None:  # posterior sample, noise drawn per global batch
                    mean, std = autoencoder.encode(x0)
                    g = dist_util.step_generator(seed, step, 0, VAE_STREAM, dev)
                    z = torch.randn((global_batch, *mean.shape[1:]), device=dev, generator=g)
                    x0 = (mean + std * z[offset : offset + mean.shape[0]]).float()
                if replay:  # forward, backward and the update (one micro-batch: check_graph_step)
                    out, grad_norm = graph(x0, y, step, offset, global_batch)
                else:
                    out = backward_parts(step_fn, parts, (x0, y, step, offset, global_batch), autocast,
                                         sync=micro == accum - 1, scale=1.0 / accum, world=info.world,
                                         hold=hold)
                for k, v in out.items():
                    losses[k] = losses.get(k, 0.0) + v
            # One all-reduce of every logged scalar: the log shows the global batch, not rank 0's share.
            # The preemption flag rides along, so every rank stops at the same step (else one rank
            # would wait in the checkpoint barrier while another enters the next all-reduce).
            # Neither is read now (that would wait for the GPU): ``checks`` reads them one step later.
            keys = sorted(losses)
            flag = torch.full((), float(preempt.requested), device=dev)  # a fill: no copy from the host, no wait
            reduced = dist_util.all_reduce_mean(torch.stack([losses["loss"], flag] + [losses[k] for k in keys]))
            losses = dict(zip(keys, reduced[2:]))
            checks.push(step + 1, reduced[:2])  # a slice: a list index would copy itself to the GPU, and wait
            stop = verify(checks.previous())  # the steps before this one: finite, or raise
            if info.world == 1:
                stop = preempt.requested  # one process: at once (several agree on the all-reduced flag)
            if not replay:
                grad_norm = updater.step(step + 1, grad_clip or None)  # AdamW + EMA (+ clip)
                updater.zero_grad()  # (with bf16 weights, the copies' gradients too)
            step += 1
            window.append({k: v for k, v in losses.items()} | {"grad_norm": grad_norm.detach().float()})
            if step == start + 1 and info.is_main:
                write_text(run.operative_config, cfg.config_str(operative=True))
            at_log = step % log_every == 0 or step == steps
            evaluating = step == steps or (heldout_every and step % heldout_every == 0) or (
                sample_every and step % sample_every == 0) or (eval_every and step % eval_every == 0)
            if at_log or evaluating or step % ckpt_every == 0 or stop:
                # a log line, a checkpoint or an evaluation sees only finite steps: wait for this step's loss
                stop = verify(checks.current()) or stop
            if at_log:
                now = time.perf_counter()
                record = _summarise(window, step, opt, global_batch, now - t_last, dev, info.world)
                window, t_last = [], now
                if info.is_main:
                    run.log(record)
                    _to_tensorboard(writer, record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_sec']:.0f}")
            if bar is not None:
                bar.update(1)
            pause = time.perf_counter()
            if step % ckpt_every == 0 or step == steps or stop:
                save(step)
            if evaluating:
                evaluate(step)
            t_last += time.perf_counter() - pause  # the next log window times training only
            if stop and step < steps:
                status = "preempted"
                if info.is_main:
                    run.log({"step": step, "kind": "preempted"})
                break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if status == "done" and info.is_main:
        run.mark_done(step)
    dist_util.barrier()
    return {"status": status, "step": step, "run_dir": str(run.path)}


def _summarise(window: list[dict], step: int, opt, global_batch: int, seconds: float, dev, world: int) -> dict:
    record = {"step": step, "kind": "train", "lr": opt.param_groups[0]["lr"], "world": world}
    for k in window[0]:
        record[k] = float(torch.stack([w[k] for w in window]).mean())
    record["img_per_sec"] = len(window) * global_batch / max(seconds, 1e-9)
    if dev.type == "cuda":  # (a captured step's temporaries are reserved in its graphs' pool, not allocated)
        record["max_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        record["max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
    return record  # full float precision: resumed runs are compared bit for bit


def _tensorboard_writer(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("train.tensorboard = True needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run.path / "tensorboard"))


def _to_tensorboard(writer, record: dict) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key not in ("step", "time", "kind") and isinstance(value, (int, float)):
            writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])


def _progress_bar(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, leave=False)


def _sample_grid(run: RunDir, model, step: int, data, count: int, respacing: str, seed: int, dev) -> None:
    """A PNG grid from the EMA model, classes in order (pixel-space data; latent data needs a VAE)."""
    from mdtzoo.sample import generate, save_grid

    if getattr(data, "latent", False):
        return
    labels = [i % data.num_classes for i in range(count)]
    images, _ = generate(model, configured_diffusion(respacing=respacing), "ddpm", "none", num_samples=count,
                         labels=labels, batch_size=count, seed=seed, device=dev,
                         num_classes=data.num_classes, rank=0, world_size=1)
    save_grid(Path(run.samples) / f"step_{step:08d}.png", images, nrow=min(count, data.num_classes))
