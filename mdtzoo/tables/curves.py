"""Learning curves, the paper's Fig. 1 analogue: a metric vs training steps and vs GPU hours.

    fig = plot_curves(["runs/table1"], metric="heldout_mse", x="both", out="curves.png")

One line per configuration (runs that differ only in their seed, length or bookkeeping are one
configuration): the mean over its runs, with a mean +- std band where there are several. MDT
lines are blue, DiT lines orange, others grey (the model family is the first grouping).

GPU hours: the trainer logs, per window of ``log_every`` steps, ``img_per_sec`` over the global
batch; a window took ``steps x train.global_batch / img_per_sec`` seconds of wall time, and the
run's hours at step s are the sum over windows up to s, times the number of GPUs, / 3600. The
GPU count is ``world`` in the log records when the trainer writes it, else ``gpus`` (the CLI's
``--gpus``; metrics.jsonl does not record the world size yet). Checkpoint writing, held-out
evaluation and SLURM queueing between resumes are outside the windows' timers, so this is
training time, as in the paper's Fig. 1 (8 A100s).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from mdtzoo.tables.collect import collect, metric_columns, read_jsonl
from mdtzoo.tables.ginparse import DERIVED_COLUMNS

XS = ("steps", "gpu_hours")
# Columns that do not make two runs different experiments: seeds, length, paths, logging.
NOT_CONFIG = {
    "train.seed", "train.run_dir", "train.steps", "train.progress", "train.num_workers", "train.device",
    "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.heldout_every", "train.sample_every",
    "train.sample_count", "train.sample_respacing", "train.tensorboard", "train.compile", "datasets.latents.root",
}
FAMILY_COLOURS = {"mdt": "Blues", "mdtv2": "Purples", "dit": "Oranges"}


def config_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that define an experiment (bindings and derived model columns), seeds excluded."""
    keys = [c for c in frame.columns if (("." in c and not c.startswith("eval.")) or c in DERIVED_COLUMNS)]
    return [c for c in keys if c not in NOT_CONFIG and not (c.startswith("datasets.") and c.endswith(".seed"))]


def gpu_hours(run_dir: str | Path, global_batch: float, gpus: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(steps, cumulative GPU hours) of a run from its train records, starting at (0, 0)."""
    steps, hours, total, last = [0.0], [0.0], 0.0, 0.0
    for r in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if r.get("kind") != "train" or not r.get("img_per_sec"):
            continue
        step = float(r["step"])
        if step <= last:  # a resumed run re-logs from its checkpoint: keep the first timing of a step
            continue
        total += (step - last) * global_batch / float(r["img_per_sec"]) * int(r.get("world", gpus)) / 3600.0
        steps.append(step)
        hours.append(total)
        last = step
    return np.asarray(steps), np.asarray(hours)


def _label(key: tuple, keys: Sequence[str], others: Sequence[tuple], n: int) -> str:
    """The model, then up to three bindings that tell this group from the others of its model."""
    values = dict(zip(keys, key))
    same_model = [dict(zip(keys, o)) for o in others if dict(zip(keys, o)).get("model") == values.get("model")]
    varying = [k for k in keys if k not in ("model", "build.model") and len({str(o.get(k)) for o in same_model}) > 1]
    parts = [str(values.get("model"))] + [f"{k}={values[k]}" for k in varying[:3]]
    return " ".join(parts) + (f" (n={n})" if n > 1 else "")


def curve_groups(frame: pd.DataFrame, metric: str) -> list[dict]:
    """[{'key', 'family', 'label', 'runs': {run: DataFrame(step, value, run_dir)}}] for the metric's rows."""
    rows = frame[frame[metric].notna() & ~frame["guided"].astype(bool)] if metric in frame else frame.iloc[:0]
    if rows.empty:
        return []
    keys = config_keys(rows)
    per_run = rows.drop_duplicates("run").set_index("run")[keys]
    group_of = {run: tuple(_hashable(v) for v in per_run.loc[run]) for run in per_run.index}
    distinct = sorted(set(group_of.values()), key=str)
    groups = []
    for key in distinct:
        runs = sorted(r for r, g in group_of.items() if g == key)
        series = {r: rows[rows["run"] == r].groupby("step", as_index=False).last() for r in runs}
        groups.append({"key": key, "family": dict(zip(keys, key)).get("family"), "runs": series,
                       "label": _label(key, keys, distinct, len(runs))})
    return groups


def _hashable(v):
    return "nan" if isinstance(v, float) and np.isnan(v) else (tuple(v) if isinstance(v, list) else v)


def plot_curves(paths: Sequence[str | Path], metric: str = "heldout_mse", x: str = "both", gpus: int = 1,
                out: str | Path | None = None, substitute: Mapping[str, str] | None = None):
    """Draw the curves (see the module docstring); returns the matplotlib Figure, saved to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib

    xs = XS if x == "both" else (x,)
    if any(v not in XS for v in xs):
        raise ValueError(f"--x must be steps, gpu_hours or both; got {x!r}")
    frame = collect(paths, substitute)
    groups = curve_groups(frame, metric) if not frame.empty else []
    if not groups:
        known = sorted(c for c in metric_columns(frame) if frame[c].notna().any()) if not frame.empty else []
        raise ValueError(f"no run has the metric {metric!r}; metrics found: {', '.join(known) or 'none'}")
    fig = Figure(figsize=(5.5 * len(xs), 4.0), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(xs), i + 1) for i in range(len(xs))]
    shade = {f: 0 for f in FAMILY_COLOURS}
    counts = {f: sum(g["family"] == f for g in groups) for f in FAMILY_COLOURS}
    for group in groups:
        family = group["family"]
        if family in FAMILY_COLOURS:
            cmap = matplotlib.colormaps[FAMILY_COLOURS[family]]
            colour = cmap(0.45 + 0.5 * (shade[family] + 1) / (counts[family] + 1))
            shade[family] += 1
        else:
            colour = "grey"
        for ax, axis in zip(axes, xs):
            _draw(ax, group, metric, axis, gpus, colour)
    for ax, axis in zip(axes, xs):
        ax.set_xlabel("training steps" if axis == "steps" else "GPU hours (training)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{metric} vs training {' and '.join('steps' if a == 'steps' else 'GPU hours' for a in xs)}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig


def _draw(ax, group: dict, metric: str, axis: str, gpus: int, colour) -> None:
    """One mean line (+- std band where several runs have the step) for the group on ``ax``."""
    values, positions = {}, {}
    for run, s in group["runs"].items():
        steps = s["step"].to_numpy(dtype=float)
        x = steps
        if axis == "gpu_hours":
            batch = float(s["train.global_batch"].iloc[0]) if "train.global_batch" in s else float("nan")
            logged, hours = gpu_hours(s["run_dir"].iloc[0], batch, gpus)
            if len(logged) < 2 or np.isnan(batch):
                warnings.warn(f"{run}: no timed train records (or no train.global_batch); left out of the GPU-hours plot")
                continue
            x = np.interp(steps, logged, hours)
        values[run] = pd.Series(s[metric].to_numpy(dtype=float), index=steps)
        positions[run] = pd.Series(x, index=steps)
    if not values:
        ax.plot([], [], color=colour, label=group["label"] + " (no timing)")
        return
    # Aligned on steps: seeds of one config are evaluated at the same steps; a step only some runs
    # reached yet is averaged over those.
    table, where = pd.DataFrame(values).sort_index(), pd.DataFrame(positions).sort_index()
    mean, std, x = table.mean(axis=1), table.std(axis=1), where.mean(axis=1)
    ax.plot(x.to_numpy(), mean.to_numpy(), color=colour, marker="o", markersize=3, label=group["label"])
    if table.shape[1] > 1:
        ax.fill_between(x.to_numpy(), (mean - std).to_numpy(), (mean + std).to_numpy(), color=colour,
                        alpha=0.2, linewidth=0)
