"""Evaluate a run directory: sample from its EMA weights, score, record the step evaluated.

    evaluate_run("runs/demo/mdt")          # -> RUN/eval/step_00001500.json
    evaluate_run(run, ref="VIRTUAL_imagenet256_labeled.npz", num_samples=50_000)   # + the ADM suite

Two kinds of registered metrics (registry ``metrics``):
- ``kind = "run"`` metrics need no Inception weights and take a :class:`RunContext`:
  ``heldout_loss`` (ε-MSE and VLB term on the fixed held-out split) and ``relation_acc``
  (the relations oracle on generated samples, overall and per relation type).
- the ADM suite (``fid``, ``sfid``, ``inception_score``, ``precision_recall``) runs on
  Inception features of the same samples when a reference batch ``ref`` is given
  (see ``mdtzoo.evaluate``).

The result file is ``RUN/eval/step_XXXXXXXX.json`` = {"step", "checkpoint", "metrics": {...},
"settings": {...}}; an existing result for a step is returned, not recomputed, unless
``force`` (finished results are never overwritten by accident).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mdtzoo.registry import METRICS
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training.heldout import heldout_loss
from mdtzoo.training.rundir import RunDir, write_text

RUN_METRICS_DEFAULT = ("heldout_loss", "relation_acc")


@dataclass
class RunContext:
    """What a run metric may use. Samples are generated once, on first use, and shared."""

    model: torch.nn.Module
    diffusion: object  # the run's diffusion, all training steps (for losses)
    heldout: object  # the held-out split of the run's dataset
    num_samples: int
    sample_steps: str
    seed: int
    device: torch.device
    guidance: object = "none"
    vae: object = None
    _samples: tuple | None = field(default=None, repr=False)

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (N, H, W, 3), int64 (N,)) class-balanced samples from the EMA weights."""
        if self._samples is None:
            from mdtzoo.sample import generate
            from mdtzoo.training.loop import configured_diffusion

            num_classes = self.model.num_classes
            self._samples = generate(
                self.model, configured_diffusion(respacing=self.sample_steps), "ddpm", self.guidance,
                num_samples=self.num_samples, labels="balanced", batch_size=256, seed=self.seed,
                vae=self.vae, device=self.device, num_classes=num_classes, rank=0, world_size=1,
            )
        return self._samples


def _run_metric(fn):
    fn.kind = "run"
    return fn


def is_run_metric(name: str) -> bool:
    """A registered metric that needs no reference batch (computed on the run's own data)."""
    return getattr(METRICS.get(name), "kind", "features") == "run"


@METRICS.register("heldout_loss")
@_run_metric
def heldout_loss_metric(context: RunContext, num_timesteps: int = 10, max_items: int = 512) -> dict[str, float]:
    """Held-out diffusion loss: ε-MSE and VLB term (bits/dim) at fixed t on the fixed held-out split."""
    out = heldout_loss(context.model, context.diffusion, context.heldout, num_timesteps=num_timesteps,
                       max_items=max_items, seed=context.seed, device=context.device)
    return {"heldout_mse": out["heldout_mse"], "heldout_vb": out["heldout_vb"]}


@METRICS.register("relation_acc")
@_run_metric
def relation_acc_metric(context: RunContext) -> dict[str, float]:
    """Relations oracle on samples: exact accuracy and graded score in [0, 1], overall and per class."""
    oracle = getattr(context.heldout, "oracle", None)
    if oracle is None:
        raise ValueError("relation_acc needs the relations dataset (its oracle); this run trained on other data")
    images, labels = context.samples()
    exact, graded = oracle.accuracy(images, labels), oracle.graded(images, labels)
    return {
        "relation_acc": exact["overall"], **{f"relation_acc_{k}": v for k, v in exact["per_class"].items()},
        "relation_score": graded["overall"], **{f"relation_score_{k}": v for k, v in graded["per_class"].items()},
    }


def result_path(run_dir: str | os.PathLike, step: int, guidance: str = "none", cfg_scale: float | None = None) -> Path:
    """RUN/eval/step_XXXXXXXX.json, or step_XXXXXXXX_<guidance>[_<scale>].json for guided sampling,
    so a checkpoint's guided and unguided results (paper Table 2's -G rows) live side by side."""
    suffix = "" if guidance == "none" else f"_{guidance}" + (f"_{cfg_scale:g}" if cfg_scale is not None else "")
    return Path(run_dir) / "eval" / f"step_{step:08d}{suffix}.json"


def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """Every evaluation result of a run, by step."""
    folder = Path(run_dir) / "eval"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("step_*.json"))]


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_samples: int | None = None,
    sample_steps: str | None = None,
    guidance: str = "none",
    cfg_scale: float | None = None,
    ref: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    vae: str | None = None,
    seed: int = 0,
    device: str | None = None,
    force: bool = False,
) -> dict:
    """Evaluate the run's latest (or given) checkpoint and write RUN/eval/step_XXXXXXXX.json.

    metrics: names in the ``metrics`` registry; default: the run metrics that apply
      (heldout_loss; relation_acc on relations data) plus the ADM suite when ``ref`` is given.
    num_samples: default 50,000 with ``ref`` (the paper's FID-50K), else 16 per class.
    sample_steps: respaced DDPM steps; default "250" with ``ref`` (the paper), else "100".
    An existing result for the step is returned as is; metrics it lacks are added to it,
    computed with the settings it was made with (``force`` recomputes everything).
    """
    import gin

    from mdtzoo.launch.sample_cmd import load_model
    from mdtzoo.registry import DATASETS, GUIDANCE
    from mdtzoo.training.loop import configured_diffusion

    run = RunDir(run_dir)
    path = Path(checkpoint) if checkpoint else run.latest_checkpoint()
    if path is None:
        raise FileNotFoundError(f"{run.path} has no checkpoint to evaluate (checkpoints/ckpt_*.pt)")
    step = int(ckpt.load(path)["step"]) if checkpoint else int(ckpt.NAME.match(path.name).group(1))
    for name in metrics or ():
        METRICS.get(name)  # unknown names fail before any work, listing the known ones
    if ref is not None and not Path(ref).is_file():
        raise FileNotFoundError(f"reference batch not found: {ref}")
    needs_ref = [m for m in metrics or () if getattr(METRICS.get(m), "kind", "features") != "run"]
    if needs_ref and ref is None:
        raise ValueError(f"metrics {needs_ref} need a reference batch: give ref=REF.npz (--ref)")
    out_path = result_path(run.path, step, guidance, cfg_scale)
    existing = json.loads(out_path.read_text()) if out_path.is_file() and not force else None
    if existing is not None and metrics is None:
        return existing
    if existing is not None:
        missing = [m for m in metrics if m not in existing.get("metric_names", [])]
        if not missing:
            return existing
        metrics = missing  # add them to the existing result, computed with its settings
        num_samples, sample_steps = existing["settings"]["num_samples"], existing["settings"]["sample_steps"]
        guidance, cfg_scale, seed = (existing["settings"][k] for k in ("guidance", "cfg_scale", "seed"))

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, latent = load_model(str(path), None, True, dev)  # parses the run's config into gin
    vae = vae or getattr(model, "vae_id", None)
    heldout = DATASETS.build(gin.query_parameter("train.dataset"), split="heldout")
    if metrics is None:
        metrics = ["heldout_loss"] + (["relation_acc"] if hasattr(heldout, "oracle") else [])
        if ref is not None:
            from mdtzoo.metrics import ADM_SUITE

            metrics += list(ADM_SUITE)
    if latent and vae is None and any(m != "heldout_loss" for m in metrics):
        raise ValueError("this run trained on VAE latents: sampling needs --vae (a local directory, 'ema' or 'mse')")
    vae_model = None
    if latent and vae is not None:
        from mdtzoo.vae import load_vae

        vae_model = load_vae(vae, device=dev)
    guide = guidance
    if guidance != "none":
        kwargs = {"null_class": model.num_classes}
        if cfg_scale is not None:
            kwargs["scale"] = cfg_scale
        guide = GUIDANCE.build(guidance, **kwargs)
    num_samples = num_samples or (50_000 if ref else 16 * model.num_classes)
    sample_steps = sample_steps or ("250" if ref else "100")
    context = RunContext(model, configured_diffusion(), heldout, num_samples, sample_steps, seed, dev, guide,
                         vae_model)
    return _score(context, metrics, out_path, step, path.name, guidance, cfg_scale, ref, weights, existing)


def _score(context: RunContext, metrics, out_path: Path, step: int, checkpoint_name: str | None, guidance: str,
           cfg_scale, ref, weights, existing: dict | None) -> dict:
    """Compute ``metrics`` on the context's model, merge with ``existing``, write ``out_path`` (+ PNG grid)."""
    model, dev = context.model, context.device
    num_samples, sample_steps, seed = context.num_samples, context.sample_steps, context.seed
    results: dict[str, float] = {}
    feature_metrics = []
    for name in metrics:
        if getattr(METRICS.get(name), "kind", "features") == "run":
            results.update(METRICS.build(name, context=context))
        else:
            feature_metrics.append(name)
    if feature_metrics:
        from mdtzoo.evaluate import evaluate_arrays, make_extractor

        images, labels = context.samples()
        results.update(evaluate_arrays(images, ref, make_extractor(weights, str(dev)), labels=labels,
                                       metrics=feature_metrics))
    if existing is not None:
        results = {**existing["metrics"], **results}
        metrics = existing["metric_names"] + list(metrics)
    record = {
        "step": step,
        "checkpoint": checkpoint_name,
        "metric_names": list(metrics),
        "metrics": {k: float(v) for k, v in results.items()},
        "settings": {"num_samples": num_samples, "sample_steps": sample_steps, "guidance": guidance,
                     "cfg_scale": cfg_scale, "seed": seed, "ref": str(ref) if ref else None},
    }
    if context._samples is not None:  # a picture of what was scored: one column per class
        from mdtzoo.sample import save_grid

        images, labels = context.samples()
        per_class = min(8, max(1, len(labels) // max(model.num_classes, 1)))
        rows = [np.flatnonzero(labels == c)[:per_class] for c in range(model.num_classes)]
        order = [idx[r] for r in range(per_class) for idx in rows if r < len(idx)]
        grid = out_path.with_suffix(".png")
        save_grid(grid, images[order], nrow=model.num_classes)
        record["grid"] = grid.name
    write_text(out_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def evaluate_model(model: torch.nn.Module, heldout, run_dir: str | os.PathLike, step: int, *,
                   metrics: Sequence[str] | None = None, num_samples: int | None = None, sample_steps: str = "100",
                   seed: int = 0, vae=None, device=None) -> dict:
    """The trainer's in-run evaluation: run metrics of ``model`` (its EMA weights) at ``step``.

    Writes the same ``RUN/eval/step_XXXXXXXX.json`` (+ PNG grid) that ``evaluate_run`` writes for
    that step's checkpoint, so ``mdtzoo eval`` / the tables find it and no checkpoint has to be
    kept for it. An existing result is returned as it is (finished results are never overwritten).
    """
    from mdtzoo.training.loop import configured_diffusion

    out_path = result_path(run_dir, step)
    if out_path.is_file():
        return json.loads(out_path.read_text())
    if metrics is None:
        metrics = ["heldout_loss"] + (["relation_acc"] if hasattr(heldout, "oracle") else [])
    for name in metrics:
        if not is_run_metric(name):
            raise ValueError(f"in-run evaluation takes run metrics only (no reference batch); {name!r} is not one")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    num_samples = num_samples or 16 * model.num_classes
    context = RunContext(model, configured_diffusion(), heldout, num_samples, str(sample_steps), seed, dev, "none",
                         vae)
    return _score(context, list(metrics), out_path, step, None, "none", None, None, None, None)
