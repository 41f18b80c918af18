"""Run directories -> one long pandas DataFrame (the arrow `eval results -> tables.collect()`).

Reads only files (SPEC section 7: the run directory is the unit of truth):

    RUN/config.gin, RUN/operative_config.gin   gin text; operative values win, config.gin fills in
    RUN/metrics.jsonl                          {"kind": "train"|"heldout"|"preempted", "step", ...}
    RUN/eval/step_XXXXXXXX*.json               {"step", "checkpoint", "metrics": {...}, "settings": {...}}
    RUN/DONE, RUN/FAILED                       markers

``collect(paths)`` returns one row per (run, evaluated step, evaluation settings): columns
``run``, ``run_dir``, ``status``, ``step``, every config column (mdtzoo.tables.ginparse), the
evaluation settings as ``eval.<key>`` plus ``guided`` (bool), and every metric (``fid``,
``sfid``, ``is``, ``precision``, ``recall``, ``heldout_mse``, ``heldout_vb``, ``relation_acc`` ...).
Held-out losses from metrics.jsonl join the evaluation rows of their step. A run without any
evaluation still gets one row (step NaN), so tables can show it as a missing cell.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from mdtzoo.tables.ginparse import DERIVED_COLUMNS, config_columns, is_missing, parse_gin_text

RUN_MARKERS = ("config.gin", "operative_config.gin", "metrics.jsonl")
STATUSES = ("done", "running", "partial", "failed")
# ADM's evaluator says "inception_score"; the tables say "is".
METRIC_ALIASES = {"inception_score": "is"}
EVAL_GLOB = "step_*.json"
# A run without DONE/FAILED whose log has not grown for this long is not running any more
# (killed, or preempted and not yet requeued): 'partial'.
STALE_SECONDS = 3600.0
META_COLUMNS = ("run", "run_dir", "status", "step", "guided")


def find_runs(paths: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, run dir) for each path that is a run directory or a folder holding run directories.

    Names are paths relative to the folder given (``mask_ratio_0.5``, ``seed1/last4``); a run
    given directly is named by its folder name. Raises FileNotFoundError for a missing path.
    """
    found: list[tuple[str, Path]] = []
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory (give run directories or folders holding them)")
        if _is_run(root):
            found.append((root.resolve().name, root))
            continue
        for folder, dirs, _ in os.walk(root):
            here = Path(folder)
            if _is_run(here):
                found.append((here.relative_to(root).as_posix(), here))
                dirs.clear()  # checkpoints/, samples/, eval/ hold no runs
            else:
                dirs.sort()
    names = [n for n, _ in found]
    return [(str(p) if names.count(n) > 1 else n, p) for n, p in found]


def _is_run(path: Path) -> bool:
    return any((path / m).is_file() for m in RUN_MARKERS)


def run_status(run_dir: Path, now: float | None = None) -> str:
    """'done' (DONE), 'failed' (FAILED), 'partial' (stopped early: preempted or stale log), 'running'."""
    if (run_dir / "DONE").is_file():
        return "done"
    if (run_dir / "FAILED").is_file():
        return "failed"
    log = run_dir / "metrics.jsonl"
    records = read_jsonl(log)
    if records and records[-1].get("kind") == "preempted":
        return "partial"
    latest = max((p.stat().st_mtime for p in (log, run_dir / "config.gin") if p.is_file()), default=0.0)
    return "partial" if (now or time.time()) - latest > STALE_SECONDS else "running"


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines; a truncated last line (a run killed mid-write) is skipped, not fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}: skipping a line that is not JSON: {line[:80]!r}")
    return records


def read_config(run_dir: Path) -> dict:
    """Bindings of config.gin overlaid with operative_config.gin (the values the run really used)."""
    bindings: dict = {}
    for name in ("config.gin", "operative_config.gin"):
        path = run_dir / name
        if path.is_file():
            bindings.update(parse_gin_text(path.read_text()))
    return bindings


def read_evals(run_dir: Path) -> list[dict]:
    """Flat records of RUN/eval/step_*.json: step, metrics (aliased), settings as ``eval.<key>``."""
    out = []
    for path in sorted((run_dir / "eval").glob(EVAL_GLOB)):
        try:
            data = json.loads(path.read_text())
            record = {"step": int(data["step"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path}: skipping an unreadable evaluation ({e})")
            continue
        for key, value in (data.get("metrics") or {}).items():
            record[METRIC_ALIASES.get(key, key)] = value
        for key, value in (data.get("settings") or {}).items():
            record[f"eval.{key}"] = value
        record["eval.file"] = path.name
        out.append(record)
    return out


def is_guided(record: Mapping) -> bool:
    """Classifier-free guidance was on: a guidance other than 'none', or a scale other than 1."""
    guidance = record.get("eval.guidance")
    if not is_missing(guidance) and str(guidance).lower() not in ("none", "false", ""):
        return True
    scale = record.get("eval.cfg_scale")
    return not is_missing(scale) and isinstance(scale, (int, float)) and float(scale) != 1.0


def run_rows(name: str, run_dir: Path, substitute: Mapping[str, str] | None = None) -> list[dict]:
    """The rows of one run (see the module docstring)."""
    base = {"run": name, "run_dir": str(run_dir), "status": run_status(run_dir)}
    base.update(config_columns(read_config(run_dir), substitute))
    heldout: dict[int, dict] = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r.get("kind") == "heldout" and "step" in r:
            heldout[int(r["step"])] = {k: v for k, v in r.items() if k not in ("kind", "step", "time")}
    rows = []
    for record in read_evals(run_dir):
        record["guided"] = is_guided(record)
        # The evaluation's own numbers win over the training log's for the same metric.
        rows.append({**base, **heldout.get(record["step"], {}), **record})
    evaluated = {r["step"] for r in rows}
    for step, metrics in sorted(heldout.items()):
        if step not in evaluated:
            rows.append({**base, "step": step, "guided": False, **metrics})
    return rows or [{**base, "step": float("nan"), "guided": False}]


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns of a collected frame (neither bookkeeping, nor config, nor eval settings)."""
    return [c for c in frame.columns if c not in META_COLUMNS and c not in DERIVED_COLUMNS and "." not in c]


def at_horizon(frame: pd.DataFrame, upto: int) -> pd.DataFrame:
    """The runs as if every one had been trained for ``upto`` steps: rows after it are dropped, and
    a run with a row at ``upto`` counts as done (it got there, even if it went on or was stopped
    later); a run that stopped before keeps its status, so tables still leave it out."""
    if upto < 1:
        raise ValueError(f"the horizon must be a step >= 1; got {upto}")
    reached = set(frame.loc[frame["step"] == upto, "run"])
    out = frame[~(frame["step"] > upto)].copy()  # NaN steps (runs with nothing) stay
    out.loc[out["run"].isin(reached), "status"] = "done"
    return out.reset_index(drop=True)


def collect(paths: Iterable[str | os.PathLike], substitute: Mapping[str, str] | None = None,
            upto: int | None = None) -> pd.DataFrame:
    """Long DataFrame of every run under ``paths`` (one row per run x evaluated step x settings).

    substitute: model renames applied before matching ({'mdt_xs2': 'mdt_s2'}); the original
    name stays in the ``build.model`` column. upto: compare at a common horizon (:func:`at_horizon`).
    """
    rows = [row for name, run_dir in find_runs(paths) for row in run_rows(name, run_dir, substitute)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    front = ["run", "run_dir", "status", "step"]
    frame = frame[front + [c for c in frame.columns if c not in front]]
    frame = frame.sort_values(["run", "step"], kind="stable", na_position="last").reset_index(drop=True)
    return at_horizon(frame, upto) if upto is not None else frame
