"""Collected runs -> a paper table: rows matched by config, ours beside the paper's, the difference.

    table = make_table(TABLES["table3"], collect(["runs/table3", "runs/baseline"]))
    table.frame        # index: the paper's row labels; columns: "FID paper", "FID ours", "FID diff", ..., "runs"
    table.caption      # what is compared, at which step, with which evaluation settings
    table.notes        # footnotes: unmatched runs (closest row, what differs), runs without a value, ...

A cell of ours is the mean over the matched runs (seeds) that have the metric at the row's step
(``step="last"``: each finished run's last evaluated step); "runs" says how many had a value out
of how many matched (``2/3``). A row nobody ran, or whose runs failed / are still running, has
NaN. ``diff`` is ours - paper; with a metric the paper does not report (``relation_acc``,
``heldout_mse``) ours stands beside the paper's FID for direction only, without a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

from mdtzoo.tables.collect import metric_columns
from mdtzoo.tables.ginparse import is_missing
from mdtzoo.tables.papers import HIGHER_IS_BETTER, METRIC_LABELS, Row, TableSpec


@dataclass
class PaperTable:
    spec: TableSpec
    frame: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = ()


def same(a: Any, b: Any) -> bool:
    """Config values equal: both missing, numbers within 1e-9, else equal as strings (True == 'True')."""
    if is_missing(a) or is_missing(b):
        return is_missing(a) and is_missing(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def mismatches(config: Mapping[str, Any], match: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(column, run's value, row's value) for each column where the run differs from the row."""
    return [(k, config.get(k), v) for k, v in match.items() if not same(config.get(k), v)]


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _run_value(evals: pd.DataFrame, metric: str, row: Row, step: int | str) -> tuple[float, float] | None:
    """(value, step) of one run for one row, or None when the run has no such evaluation."""
    rows = evals[(evals["guided"] == row.guided) & evals[metric].notna()] if metric in evals else evals.iloc[:0]
    if step == "last":
        if rows.empty or evals["status"].iloc[0] != "done":
            return None
        rows = rows[rows["step"] == rows["step"].max()]
    else:
        rows = rows[rows["step"] == step]
    if rows.empty:
        return None
    return float(rows[metric].iloc[-1]), float(rows["step"].iloc[-1])


def _agreement(paper: pd.Series, ours: pd.Series, paper_metric: str, metric: str) -> float | None:
    """Spearman rank correlation, signed so that +1 means both order the rows from best to worst alike."""
    both = pd.concat([paper, ours], axis=1).dropna()
    if len(both) < 3 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return None
    rho = both.iloc[:, 0].rank().corr(both.iloc[:, 1].rank())
    flip = (paper_metric in HIGHER_IS_BETTER) != (metric in HIGHER_IS_BETTER)
    return -rho if flip else rho


def make_table(spec: TableSpec, collected: pd.DataFrame, metric: str | None = None,
               step: int | str | None = None, dataset: str | None = None) -> PaperTable:
    """Lay the collected runs out like ``spec``'s paper table (see the module docstring).

    metric: one metric (default: the spec's ``default_metrics``, else the paper's columns). step:
    None (the spec's ``default_step``, else each row's paper step), an int (every row at that
    step), or "last". dataset: keep runs of this dataset only (required when the runs span
    several datasets).
    """
    frame = collected if not collected.empty else pd.DataFrame(columns=["run", "status", "step", "guided", "dataset"])
    datasets = sorted({d for d in frame.get("dataset", pd.Series(dtype=object)).dropna().unique()})
    if dataset is not None:
        frame = frame[frame["dataset"] == dataset]
    elif len(datasets) > 1:
        raise ValueError(f"the runs use several datasets ({', '.join(datasets)}); pick one with --dataset")
    metrics = tuple(spec.default_metrics or spec.metrics) if metric is None else (metric,)
    step = spec.default_step if step is None else step
    runs = {name: group for name, group in frame.groupby("run", sort=True)}
    configs = {name: group.iloc[0].to_dict() for name, group in runs.items()}
    notes: list[str] = []
    matched: set[str] = set()
    columns: dict[str, list] = {}
    run_counts, used_steps, evidence = [], [], []
    for i, row in enumerate(spec.rows):
        names = [n for n, c in configs.items() if not mismatches(c, row.match)]
        matched.update(names)
        row_step = row.step if step is None else step
        values: dict[str, list[float]] = {m: [] for m in metrics}
        steps_seen: list[float] = []
        for name in names:
            for m in metrics:
                got = _run_value(runs[name], m, row, row_step)
                if got is not None:
                    values[m].append(got[0])
                    steps_seen.append(got[1])
        for m in metrics:
            paper_metric = m if m in spec.metrics else "fid"
            vals = pd.Series(values[m], dtype=float)
            paper = row.paper.get(paper_metric, float("nan"))
            ours = vals.mean() if len(vals) else float("nan")
            paper_column = columns.setdefault(f"{label(paper_metric)} paper", [])
            if len(paper_column) == i:  # several of our metrics beside the paper's FID: one FID column
                paper_column.append(paper)
            columns.setdefault(f"{label(m)} ours", []).append(ours)
            if paper_metric == m:
                columns.setdefault(f"{label(m)} diff", []).append(ours - paper)
            columns.setdefault(f"{label(m)} std", []).append(vals.std() if len(vals) > 1 else float("nan"))
        n_values = max((len(v) for v in values.values()), default=0)
        run_counts.append(f"{n_values}/{len(names)}")
        used_steps.append(_step_range(steps_seen))
        evidence.append((frozenset(names), tuple(sorted(steps_seen))))
        _note_missing(notes, row, names, runs, metrics, row_step)
    out = pd.DataFrame(columns, index=pd.MultiIndex.from_tuples([r.label for r in spec.rows], names=spec.index))
    if len(spec.index) == 1:
        out.index = out.index.get_level_values(0)
    out = out[[c for c in out.columns if not (c.endswith(" std") and out[c].isna().all())]]
    if not any(row.paper for row in spec.rows):  # a table of our own (docs/extending.md): no paper side
        out = out[[c for c in out.columns if not c.endswith((" paper", " diff"))]]
    if step == "last":
        out["our step"] = used_steps
    out["runs"] = run_counts
    _note_unmatched(notes, spec, configs, matched)
    caption = _caption(spec, frame, metrics, step)
    # Rows filled by the same runs (the baseline in every part of Table 5) count once.
    distinct = ~pd.Series([e if e[0] else (i,) for i, e in enumerate(evidence)]).duplicated().to_numpy()
    for m in metrics:
        paper_metric = m if m in spec.metrics else "fid"
        if f"{label(paper_metric)} paper" not in out:
            continue
        rho = _agreement(out[f"{label(paper_metric)} paper"][distinct], out[f"{label(m)} ours"][distinct],
                         paper_metric, m)
        if rho is not None:
            notes.append(f"Rank agreement of ours ({label(m)}) with the paper's {label(paper_metric)}: "
                         f"{rho:+.2f} (Spearman; +1 = same order from best to worst).")
    absent = [m for m in metrics if m not in frame or frame[m].isna().all()]
    if absent and not frame.empty:
        per_part = ("heldout_mse_t", "relation_acc_", "relation_score_")  # per-timestep / per-class breakdowns
        found = [c for c in metric_columns(frame) if frame[c].notna().any() and not c.startswith(per_part)]
        notes.append(f"No run has {', '.join(absent)}; metrics found: {', '.join(found) or 'none'} (--metric).")
    notes.extend(spec.notes)
    return PaperTable(spec, out, caption, notes, metrics)


def _plain(value) -> str:
    """50000.0 -> '50,000' (a column with gaps is float), '250' -> '250'."""
    if isinstance(value, (int, float)) and float(value).is_integer():
        return f"{int(value):,}"
    return str(value)


def _step_range(steps: Sequence[float]) -> str:
    if not steps:
        return "—"
    lo, hi = int(min(steps)), int(max(steps))
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def _note_missing(notes, row: Row, names, runs, metrics, step) -> None:
    for name in names:
        evals = runs[name]
        if any(_run_value(evals, m, row, step) is not None for m in metrics):
            continue
        status = evals["status"].iloc[0]
        have = sorted({int(s) for s in evals["step"].dropna()})
        shown = ", ".join(f"{s:,}" for s in have[-4:]) or "none"
        where = "no finished evaluation" if step == "last" else f"no {'guided ' if row.guided else ''}evaluation at step {step:,}"
        notes.append(f"{name} ({status}) matches '{' / '.join(row.label)}' but has {where} "
                     f"(evaluated steps: {shown}).")


def _note_unmatched(notes, spec: TableSpec, configs: Mapping[str, Mapping], matched: set) -> None:
    for name in sorted(set(configs) - matched):
        config = configs[name]
        best = min(spec.rows, key=lambda r: len(mismatches(config, r.match)))
        diff = mismatches(config, best.match)
        shown = ", ".join(f"{k}={ours!r} (row: {want!r})" for k, ours, want in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        notes.append(f"Unmatched: {name} (model {config.get('model')!r}) fits no row of {spec.name}; "
                     f"closest '{' / '.join(best.label)}' differs in {shown}{more}.")


def _caption(spec: TableSpec, frame: pd.DataFrame, metrics, step) -> str:
    parts = [spec.title]
    if step == "last":
        parts.append("Ours: each finished run's last evaluation.")
    elif step is not None:
        parts.append(f"Ours: at step {int(step):,}.")
    direction = [m for m in metrics if m not in spec.metrics]
    if direction:
        parts.append(f"Ours ({', '.join(label(m) for m in direction)}) is a different metric from the paper's FID: "
                     "shown beside it for direction only, without a difference.")
    else:
        parts.append("diff = ours - paper.")
    settings = []
    for key, name in (("eval.num_samples", "samples"), ("eval.sample_steps", "sampling steps")):
        if key in frame and frame[key].notna().any():
            values = sorted({_plain(v) for v in frame[key].dropna()}, key=str)
            settings.append(f"{name} " + "/".join(values))
    if settings:
        parts.append("Our evaluations: " + ", ".join(settings) + " (the paper: 50,000 samples, 250 steps).")
    return " ".join(parts)
