"""The small-scale reproduction (issue 8, experiments/small): its tables and the learning-speed ratio.

MDT-XS/2 and DiT-XS/2 on the relations data at 32 px (experiments/small/small.sweep) stand in for
the paper's S/2 runs on ImageNet; the paper's FIDs sit beside our oracle accuracy for direction.

    frame = collect(["runs/small"])
    make_table(SMALL_TABLES["small_table3"], frame).frame     # mask ratio rows, our metrics at the last step
    speedup_table(frame).frame                                  # steps (and GPU-seconds) to DiT's final accuracy
    class_table(frame).frame                                    # per relation type, MDT vs DiT
    report("small", frame, out="docs/results/small")            # all of them: CSV + Markdown (+ LaTeX)

Steps to threshold (the issue's target): the threshold is DiT's final value of a metric, the mean
over its seeds of each seed's last evaluation. A curve reaches it at the first evaluation at or
past it, linearly interpolated from the evaluation before; reaching it at the first evaluation
means "at or before" that step; never reaching it is reported as such, not dropped silently.
DiT's steps are where the mean over its seeds first reaches the threshold; the ratio is MDT's
steps over DiT's, per MDT seed (mean +- std over the seeds that reached it) and of the mean curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mdtzoo.tables import papers
from mdtzoo.tables.papers import Row, TableSpec, dit, mdt
from mdtzoo.tables.pivot import label, make_table, mismatches
from mdtzoo.tables.render import markdown_table, table_markdown, write_table
from mdtzoo.tables.timing import seconds_at, solo_seconds_per_step

MODEL_MDT, MODEL_DIT = "mdt_xs2", "dit_xs2"
SMALL_DATA = {"dataset": "relations", "datasets.relations.image_size": 32}
OUR_METRICS = ("relation_acc", "relation_score", "heldout_mse")
CURVE_METRICS = ("heldout_mse", "relation_acc", "relation_score")
AXES = ("steps", "gpu_seconds")
SWEEP = "small/small.sweep"


def _mdt(**changes) -> dict:
    return {**mdt(MODEL_MDT, **changes), **SMALL_DATA}


def _spec(name: str, title: str, index: tuple[str, ...], rows: tuple[Row, ...]) -> TableSpec:
    return TableSpec(name=name, title=title, index=index, metrics=("fid",), rows=rows, sweep=SWEEP,
                     default_metrics=OUR_METRICS, default_step="last")


SMALL_TABLE1 = _spec(
    "small_table1",
    "Small Table 1 / Fig. 1: DiT-XS/2 vs MDT-XS/2, relations 32 px (256 tokens). Paper column: DiT-S/2 and "
    "MDT-S/2 at 400k steps on ImageNet 256 (Table 1).",
    ("Method",),
    (Row(("DiT-XS/2",), "dit", {**dit(MODEL_DIT), **SMALL_DATA}, {"fid": 68.40}, "small/dit.gin", 0),
     Row(("MDT-XS/2",), "mdt", _mdt(), {"fid": 53.46}, "small/mdt.gin", 0)),
)

SMALL_RATIOS = (0.1, 0.3, 0.5, 0.7)
SMALL_TABLE3 = _spec(
    "small_table3",
    "Small Table 3: mask ratio of MDT-XS/2, relations 32 px. Paper column: MDT-S/2, 600k steps (Table 3).",
    ("Mask ratio",),
    tuple(Row((str(r),), f"mask_ratio_{r}", _mdt(**{"masking.random.ratio": r}), {"fid": papers._T3[r][0]},
              "small/mdt.gin", 0) for r in SMALL_RATIOS),
)

# The parts of the paper's Table 5 that small.sweep runs, each with its baseline row.
SMALL_T5 = ("b_side_interp", "b_no_interp", "c_shortcut", "c_no_shortcut", "d_full_masked", "d_full", "d_masked",
            "e_loss_all", "e_loss_removed", "i_relbias", "i_no_relbias")
SMALL_TABLE5 = _spec(
    "small_table5",
    "Small Table 5: ablations of MDT-XS/2, relations 32 px; every baseline row is the same runs "
    "(mdt_seed*). Paper column: MDT-S/2, 600k steps (Table 5).",
    ("Ablation", "Setting"),
    tuple(Row((part, setting), name, _mdt(**changes), {"fid": fid}, "small/mdt.gin", 0)
          for name, part, setting, fid, changes, _ in papers._T5 if name in SMALL_T5),
)

SMALL_TABLES: dict[str, TableSpec] = {t.name: t for t in (SMALL_TABLE1, SMALL_TABLE3, SMALL_TABLE5)}
# `mdtzoo table NAME`: the specs above, plus these reports of the same runs ("small" = all of them).
REPORTS = ("small", "small_speedup", "small_classes")


@dataclass
class Report:
    """A small table that is not a paper layout (speed-up, per class): frame, caption, notes."""

    name: str
    frame: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ runs and curves
def runs_of(frame: pd.DataFrame, row: Row, done_only: bool = True) -> list[str]:
    """Names of the runs whose config matches ``row`` (finished ones only by default)."""
    out = []
    for name, group in frame.groupby("run", sort=True):
        first = group.iloc[0].to_dict()
        if not mismatches(first, row.match) and (not done_only or first["status"] == "done"):
            out.append(name)
    return out


def curve(frame: pd.DataFrame, run: str, metric: str) -> pd.Series:
    """The run's unguided evaluations of ``metric``: values indexed by step, ascending."""
    rows = frame[(frame["run"] == run) & frame[metric].notna() & ~frame["guided"].astype(bool)] \
        if metric in frame else frame.iloc[:0]
    series = rows.groupby("step")[metric].last().sort_index()
    series.index = series.index.astype(float)
    return series


@dataclass(frozen=True)
class Crossing:
    """Where a curve first reaches a threshold: ``x`` (NaN if never) and how ("reached", "at first
    evaluation": at or before the first evaluated x, "not reached")."""

    x: float
    how: str

    @property
    def reached(self) -> bool:
        return self.how != "not reached"

    def text(self, fmt=None) -> str:
        if not self.reached:
            return "not reached"
        return ("≤ " if self.how == "at first evaluation" else "") + (fmt or _number)(self.x)


def first_crossing(x: Sequence[float], y: Sequence[float], threshold: float, higher_is_better: bool = True) -> Crossing:
    """The first x at which y reaches ``threshold``, linearly interpolated between the evaluation
    before and the first one at or past it (module docstring). Equality (to 1e-12) counts."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sign = 1.0 if higher_is_better else -1.0
    tol = 1e-12 * max(1.0, abs(threshold))
    reached = sign * (y - threshold) >= -tol
    if not reached.any():
        return Crossing(float("nan"), "not reached")
    i = int(np.argmax(reached))
    if i == 0:
        return Crossing(float(x[0]), "at first evaluation")
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return Crossing(float(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0)), "reached")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN below two values) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def xy_curves(frame: pd.DataFrame, runs: Sequence[str], metric: str, axis: str = "steps") -> dict[str, pd.DataFrame]:
    """{run: DataFrame(step, x, y)} of the runs' evaluations of ``metric``; x is the step, or the
    GPU-seconds of training there: steps x a solo-calibrated rate of any of the runs (they are one
    configuration), else each run's logged training time (mdtzoo.tables.timing)."""
    steps = {r: curve(frame, r, metric) for r in runs}
    steps = {r: c for r, c in steps.items() if len(c)}
    dirs = {r: frame.loc[frame["run"] == r, "run_dir"].iloc[0] for r in steps}
    rate = None
    if axis != "steps":
        rate = next((x for x in (solo_seconds_per_step(d) for d in dirs.values()) if x is not None), None)
    out = {}
    for r, c in steps.items():
        x = c.index.to_numpy() if axis == "steps" else seconds_at(dirs[r], c.index.to_numpy(), rate)
        xy = pd.DataFrame({"step": c.index.to_numpy(), "x": x, "y": c.to_numpy()}).dropna()
        if len(xy):
            out[r] = xy
    return out


def mean_curve(curves: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): the mean over the runs at the steps that every run evaluated (x averaged too)."""
    if not curves:
        return np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(c["step"]) for c in curves.values())))
    at = [pd.concat([c[c["step"] == s] for c in curves.values()]) for s in common]
    return np.array([a["x"].mean() for a in at]), np.array([a["y"].mean() for a in at])


def _seed(frame: pd.DataFrame, run: str) -> str:
    """"s1" for a run with train.seed = 1 (the run's name when it has no seed)."""
    value = frame.loc[frame["run"] == run, "train.seed"].iloc[0] if "train.seed" in frame else None
    try:
        return f"s{int(value)}"
    except (TypeError, ValueError):
        return run


# ------------------------------------------------------------------------------ speed-up
def speedup_table(frame: pd.DataFrame, metrics: Sequence[str] = CURVE_METRICS, axes: Sequence[str] = AXES,
                  baseline: Row = SMALL_TABLE1.rows[0], candidate: Row = SMALL_TABLE1.rows[1]) -> Report:
    """Steps (and GPU-seconds) the candidate (MDT) needs to reach the baseline's (DiT) final value.

    One row per (metric, x axis); the definitions are in the module docstring. Numbers are columns
    of their own (CSV); per-seed crossings are text ("s0 1,234 · s1 not reached").
    """
    base_runs, cand_runs = runs_of(frame, baseline), runs_of(frame, candidate)
    who = {"DiT": baseline.label[0], "MDT": candidate.label[0]}
    rows, index = [], []
    if metrics is CURVE_METRICS:  # the defaults: those the runs have
        metrics = [m for m in metrics if m in frame.columns]
    for metric in metrics:
        higher = metric in papers.HIGHER_IS_BETTER
        finals = [c.iloc[-1] for c in (curve(frame, r, metric) for r in base_runs) if len(c)]
        threshold, threshold_std = mean_std(finals)
        for axis in axes:
            index.append((label(metric), "steps" if axis == "steps" else "GPU-seconds"))
            base, cand = xy_curves(frame, base_runs, metric, axis), xy_curves(frame, cand_runs, metric, axis)
            if not base or not cand:
                missing = who["DiT"] if not base else who["MDT"]
                rows.append({"note": f"no finished {missing} run has {metric}" + ("" if axis == "steps" else
                                                                                  " with timed train records")})
                continue
            base_cross = first_crossing(*mean_curve(base), threshold, higher)
            cand_mean_cross = first_crossing(*mean_curve(cand), threshold, higher)
            fmt = (lambda v: f"{v:,.0f}") if axis == "steps" else _number
            per_base = {r: first_crossing(c["x"], c["y"], threshold, higher) for r, c in base.items()}
            per_cand = {r: first_crossing(c["x"], c["y"], threshold, higher) for r, c in cand.items()}
            reached = [c.x for c in per_cand.values() if c.reached]
            usable = base_cross.reached and base_cross.x > 0
            ratio_mean, ratio_std = mean_std([x / base_cross.x for x in reached] if usable else [])
            notes = []
            if base_cross.how == "at first evaluation":
                notes.append(f"{who['DiT']}'s mean reaches its final value at its first evaluation: the ratio says little")
            missed = [r for r, c in per_cand.items() if not c.reached]
            if missed:
                bound = max(cand[r]["x"].iloc[-1] for r in missed) / base_cross.x if usable else float("nan")
                notes.append(f"{len(missed)} {who['MDT']} seed(s) never reached it"
                             + (f" (ratio > {bound:.2f}; left out of the mean)" if usable else ""))
            if any(c.how == "at first evaluation" for c in per_cand.values()):
                notes.append("≤: reached at the first evaluation (an upper bound)")
            rows.append({
                "threshold": threshold, "threshold std": threshold_std,
                "DiT (mean)": base_cross.x if base_cross.reached else float("nan"),
                "DiT seeds": " · ".join(f"{_seed(frame, r)} {c.text(fmt)}" for r, c in per_base.items()),
                "MDT seeds": " · ".join(f"{_seed(frame, r)} {c.text(fmt)}" for r, c in per_cand.items()),
                "MDT reached": f"{len(reached)}/{len(per_cand)}",
                "MDT mean": mean_std(reached)[0], "MDT std": mean_std(reached)[1],
                "MDT (mean)": cand_mean_cross.x if cand_mean_cross.reached else float("nan"),
                "ratio mean": ratio_mean, "ratio std": ratio_std,
                "ratio of means": (cand_mean_cross.x / base_cross.x if usable and cand_mean_cross.reached
                                   else float("nan")),
                "note": "; ".join(notes),
            })
    out = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=("Metric", "x")))
    caption = (f"Learning speed, {who['MDT']} vs {who['DiT']} ({len(cand_runs)} and {len(base_runs)} finished runs). "
               f"Threshold: {who['DiT']}'s final value, mean over seeds. DiT (mean) / MDT (mean): where the mean "
               "curve over seeds first reaches it (interpolated between evaluations); MDT mean ± std: over the "
               "MDT seeds that reach it; ratio: MDT's steps (or GPU-seconds) over DiT (mean), per MDT seed "
               "(mean ± std) and of the mean curves. Issue 8's target: ratio ≤ 0.5; the paper reports about 1/3.")
    notes = ["GPU-seconds: steps x the seconds per step of the configuration timed alone on one GPU where "
             "calibration.json has it, else the runs' logged training time (a GPU possibly shared)."]
    return Report("small_speedup", out, caption, notes)


def _number(value: float) -> str:
    """Steps and seconds: 3,600 / 95.3 / 0.412; NaN as —."""
    if value is None or not np.isfinite(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


# ------------------------------------------------------------------------------ per class
def class_table(frame: pd.DataFrame, rows: Sequence[Row] = SMALL_TABLE1.rows) -> Report:
    """Exact oracle accuracy and graded score per relation type at each finished run's last
    evaluation, mean (and std over seeds) per configuration; "overall" first."""
    from mdtzoo.data.oracle import CLASS_NAMES

    names = ("overall",) + CLASS_NAMES
    columns: dict[str, list] = {}
    counts = []
    for row in rows:
        runs = runs_of(frame, row)
        counts.append(f"{row.label[0]} {len(runs)}")
        for kind, prefix in (("exact", "relation_acc"), ("graded", "relation_score")):
            last = []
            for r in runs:
                evals = frame[(frame["run"] == r) & frame[prefix].notna()] if prefix in frame else frame.iloc[:0]
                if not evals.empty:
                    last.append(evals[evals["step"] == evals["step"].max()].iloc[-1])
            stats = [mean_std([float(v[key]) for v in last if pd.notna(v.get(key))])
                     for key in (prefix if n == "overall" else f"{prefix}_{n}" for n in names)]
            columns[f"{kind} {row.label[0]}"] = [m for m, _ in stats]
            columns[f"{kind} {row.label[0]} std"] = [s for _, s in stats]
    out = pd.DataFrame(columns, index=pd.Index(names, name="Relation"))
    out = out[[c for c in out.columns if not (c.endswith(" std") and out[c].isna().all())]]
    caption = ("Per relation type at the last evaluation: exact oracle accuracy and graded score (1.0 exactly "
               f"when the oracle passes), mean (std) over the finished runs ({', '.join(counts)}).")
    return Report("small_classes", out, caption)


# ------------------------------------------------------------------------------ output
def report_markdown(report: Report) -> str:
    text = f"**{report.caption}**\n\n" + markdown_table(_formatted(report.frame), floatfmt=str)
    if report.notes:
        text += "\n" + "".join(f"- {n}\n" for n in report.notes)
    return text


def _formatted(df: pd.DataFrame) -> pd.DataFrame:
    out = df.astype(object).copy()
    for col in df.columns:
        if pd.api.types.is_numeric_dtype(df[col]):
            out[col] = [_number(v) for v in df[col].tolist()]
        else:
            out[col] = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in df[col]]
    return out


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """``<name>.csv`` (numbers as numbers, NaN empty) and ``<name>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{report.name}.csv", "md": out / f"{report.name}.md"}
    report.frame.reset_index().to_csv(paths["csv"], index=False)
    paths["md"].write_text(report_markdown(report))
    return paths


def report(name: str, frame: pd.DataFrame, out: str | Path | None = None, metric: str | None = None,
           step: int | str | None = None) -> tuple[str, list[Path]]:
    """Markdown of the named small table(s) ("small": all of them) and the files written to ``out``."""
    if name not in SMALL_TABLES and name not in REPORTS:
        raise ValueError(f"unknown small table {name!r}; known: {', '.join([*SMALL_TABLES, *REPORTS])}")
    names = [*SMALL_TABLES, "small_speedup", "small_classes"] if name == "small" else [name]
    texts, paths = [], []
    for n in names:
        if n in SMALL_TABLES:
            table = make_table(SMALL_TABLES[n], frame, metric=metric, step=step)
            # The other points of the sweep fill the other small tables: not worth a note here.
            elsewhere = {r for spec in SMALL_TABLES.values() for row in spec.rows for r in runs_of(frame, row, False)}
            table.notes = [t for t in table.notes if not (t.startswith("Unmatched: ") and t.split()[1] in elsewhere)]
            texts.append(table_markdown(table))
            if out:
                paths += list(write_table(table, out, stem=n).values())
            continue
        rep = speedup_table(frame, metrics=(metric,) if metric else CURVE_METRICS) if n == "small_speedup" \
            else class_table(frame)
        texts.append(report_markdown(rep))
        if out:
            paths += list(write_report(rep, out).values())
    return "\n".join(texts), paths
