"""Learning curves, the paper's Fig. 1 analogue: metrics vs training steps and vs GPU time.

    fig = plot_curves(["runs/table1"], metric="heldout_mse", x="both", out="curves.png")
    fig = plot_curves(["runs/small"], metric="relation_acc,relation_score", x="steps,gpu_seconds",
                      runs="mdt_seed*,dit_seed*", out="fig1.png")     # experiments/small (issue 8)

One panel per (metric, x axis): metrics are rows, x axes columns. One line per configuration
(runs that differ only in their seed, length or bookkeeping are one configuration): the mean
over its runs, with a mean +- std band where there are several. MDT lines are blue, DiT orange,
others grey (the model family is the first grouping). ``runs`` keeps the runs whose names match
one of its shell patterns.

GPU time (``gpu_hours``, ``gpu_seconds``): the training seconds of mdtzoo.tables.timing - the
trainer's logged windows (``steps x train.global_batch / img_per_sec`` each, times the GPU count:
``world`` in the records, else ``gpus``), with the windows that also hold start-up, held-out
evaluation or checkpoint writing charged at the run's median rate, so this is training time, as
in the paper's Fig. 1 (8 A100s). Where a configuration was timed alone on a GPU
(``calibration.json`` in the sweep root, written by experiments/small/run_gpu.py), its GPU time
is steps x that solo rate instead: runs that shared a GPU log slower steps than one GPU gives.
"""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from mdtzoo.tables.collect import collect, metric_columns
from mdtzoo.tables.ginparse import DERIVED_COLUMNS
from mdtzoo.tables.timing import seconds_at, solo_seconds_per_step, train_seconds

XS = ("steps", "gpu_hours", "gpu_seconds")
BOTH = ("steps", "gpu_hours")        # x="both"
SECONDS_PER_UNIT = {"gpu_hours": 3600.0, "gpu_seconds": 1.0}
# Columns that do not make two runs different experiments: seeds, length, paths, logging.
NOT_CONFIG = {
    "train.seed", "train.run_dir", "train.steps", "train.progress", "train.num_workers", "train.device",
    "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.keep_every", "train.heldout_every",
    "train.sample_every", "train.sample_count", "train.sample_respacing", "train.tensorboard", "train.compile", "datasets.latents.root",
}
FAMILY_COLOURS = {"mdt": "Blues", "mdtv2": "Purples", "dit": "Oranges"}


def config_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that define an experiment (bindings and derived model columns), seeds excluded."""
    keys = [c for c in frame.columns if (("." in c and not c.startswith("eval.")) or c in DERIVED_COLUMNS)]
    return [c for c in keys if c not in NOT_CONFIG and not (c.startswith("datasets.") and c.endswith(".seed"))]


def gpu_hours(run_dir: str | Path, global_batch: float, gpus: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(steps, cumulative GPU hours of training) of a run from its train records, starting at (0, 0)."""
    steps, seconds = train_seconds(run_dir, global_batch, gpus)
    return steps, seconds / 3600.0


def patterns(items: str | Sequence[str] | None) -> list[str]:
    """"a*,b*" or a list of such strings -> ["a*", "b*"]; None -> []."""
    items = [items] if isinstance(items, str) else list(items or ())
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def select_runs(frame: pd.DataFrame, runs: str | Sequence[str] | None) -> pd.DataFrame:
    """The rows of the runs whose name matches one of the shell patterns (every row without patterns)."""
    pats = patterns(runs)
    if not pats or frame.empty:
        return frame
    keep = [name for name in frame["run"].unique() if any(fnmatch.fnmatchcase(name, p) for p in pats)]
    return frame[frame["run"].isin(keep)]


def _label(key: tuple, keys: Sequence[str], others: Sequence[tuple], n: int) -> str:
    """The model, then up to three bindings that tell this group from the others of its model."""
    values = dict(zip(keys, key))
    same_model = [dict(zip(keys, o)) for o in others if dict(zip(keys, o)).get("model") == values.get("model")]
    varying = [k for k in keys if k not in ("model", "build.model") and len({str(o.get(k)) for o in same_model}) > 1]
    parts = [str(values.get("model"))] + [f"{k}={values[k]}" for k in varying[:3]]
    return " ".join(parts) + (f" (n={n})" if n > 1 else "")


def curve_groups(frame: pd.DataFrame, metric: str) -> list[dict]:
    """[{'key', 'family', 'label', 'runs': {run: DataFrame(step, value, run_dir)}, 'solo_rate'}] for the
    metric's rows; solo_rate: GPU-seconds per step of the configuration alone on its GPUs, from the
    calibration.json of any of its runs (None: not timed alone)."""
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
        rates = [solo_seconds_per_step(series[r]["run_dir"].iloc[0]) for r in runs]
        groups.append({"key": key, "family": dict(zip(keys, key)).get("family"), "runs": series,
                       "label": _label(key, keys, distinct, len(runs)),
                       "solo_rate": next((r for r in rates if r is not None), None)})
    return groups


def _hashable(v):
    return "nan" if isinstance(v, float) and np.isnan(v) else (tuple(v) if isinstance(v, list) else v)


def x_axes(x: str | Sequence[str]) -> tuple[str, ...]:
    """"both" -> (steps, gpu_hours); "steps,gpu_seconds" -> those two; each checked against XS."""
    xs = BOTH if x == "both" else tuple(patterns(x))
    if not xs or any(v not in XS for v in xs):
        raise ValueError(f"--x takes both or a comma-separated list of {', '.join(XS)}; got {x!r}")
    return xs


def plot_curves(paths: Sequence[str | Path], metric: str | Sequence[str] = "heldout_mse", x: str = "both",
                gpus: int = 1, out: str | Path | None = None, substitute: Mapping[str, str] | None = None,
                runs: str | Sequence[str] | None = None, upto: int | None = None):
    """Draw the curves (see the module docstring); returns the matplotlib Figure, saved to ``out``.

    metric: a metric or several ("relation_acc,relation_score": one row of panels each).
    x: "both" (steps and gpu_hours) or a comma-separated list of steps / gpu_hours / gpu_seconds.
    runs: shell patterns of the run names to plot ("mdt_seed*,dit_seed*"); default every run.
    upto: plot only up to this step (every run cut at a common horizon, ``collect.at_horizon``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib

    xs = x_axes(x)
    metrics = patterns(metric)
    frame = collect(paths, substitute, upto=upto)
    if not frame.empty:
        frame = select_runs(frame, runs)
    per_metric = {m: (curve_groups(frame, m) if not frame.empty else []) for m in metrics}
    missing = [m for m, found in per_metric.items() if not found]
    if missing or not metrics:
        known = sorted(c for c in metric_columns(frame) if frame[c].notna().any()) if not frame.empty else []
        which = f" among the runs matching {runs!r}" if patterns(runs) else ""
        raise ValueError(f"no run has the metric {', '.join(missing) or repr(metric)}{which}; "
                         f"metrics found: {', '.join(known) or 'none'}")
    fig = Figure(figsize=(5.5 * len(xs), 4.0 * len(metrics)), constrained_layout=True)
    FigureCanvasAgg(fig)
    for row, m in enumerate(metrics):
        groups = per_metric[m]
        axes = [fig.add_subplot(len(metrics), len(xs), row * len(xs) + i + 1) for i in range(len(xs))]
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
                _draw(ax, group, m, axis, gpus, colour)
        for ax, axis in zip(axes, xs):
            ax.set_xlabel(_x_label(axis, groups))
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    shown = {"steps": "steps", "gpu_hours": "GPU hours", "gpu_seconds": "GPU-seconds"}
    fig.suptitle(f"{', '.join(metrics)} vs training {' and '.join(shown[a] for a in xs)}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig


def _x_label(axis: str, groups: list[dict]) -> str:
    if axis == "steps":
        return "training steps"
    unit = "GPU hours" if axis == "gpu_hours" else "GPU-seconds"
    solo = [g["solo_rate"] is not None for g in groups]
    how = "timed alone on a GPU" if all(solo) else "as logged" if not any(solo) else "timed alone where calibrated"
    return f"{unit} of training ({how})"


def _draw(ax, group: dict, metric: str, axis: str, gpus: int, colour) -> None:
    """One mean line (+- std band where several runs have the step) for the group on ``ax``."""
    values, positions = {}, {}
    for run, s in group["runs"].items():
        steps = s["step"].to_numpy(dtype=float)
        x = steps
        if axis in SECONDS_PER_UNIT:
            x = seconds_at(s["run_dir"].iloc[0], steps, group["solo_rate"], gpus) / SECONDS_PER_UNIT[axis]
            if np.isnan(x).all():
                warnings.warn(f"{run}: no timed train records; left out of the {axis} plot")
                continue
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
