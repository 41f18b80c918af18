"""Where each point of a sweep stands: its run dir (DONE, FAILED, metrics, eval) plus the scheduler.

    statuses = sweep_status(points, evaluate=True)      # one squeue + one sacct call for all
    print(render(statuses))

States: ``done`` (DONE and evaluated), ``trained`` (DONE, evaluation missing), ``running``,
``pending`` (queued or requeued), ``failed`` (RUN/FAILED, or the job ended badly: the last lines
of its error), ``preempted`` (stopped at a checkpoint, no job queued), ``stopped`` (progress, no
job alive, no error recorded), ``submitted`` (a job is recorded but the scheduler can't be
asked), ``not started``. Without SLURM the run dirs alone decide.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mdtzoo.launch import slurm
from mdtzoo.launch.sweep import Point
from mdtzoo.training.rundir import RunDir

MANIFEST = "sweep_{name}.json"   # ROOT/sweep_<name>.json: a sweep's points (status works from ROOT)
TAIL_LINES = 3
# Problems worth showing from a job's stderr, most telling first.
_ERROR_LINE = re.compile(r"(Error|Exception|error:|Killed|CANCELLED|DUE TO TIME LIMIT|oom)", re.IGNORECASE)


@dataclass
class PointStatus:
    name: str
    run_dir: str
    state: str
    step: int | None = None
    total: int | None = None
    job: str = ""
    eval: dict = field(default_factory=dict)
    message: str = ""

    @property
    def complete(self) -> bool:
        """Nothing left to do for this point: a sweep skips it."""
        return self.state == "done"

    @property
    def active(self) -> bool:
        """A job for this point is queued or running: a sweep does not submit another."""
        return self.state in ("pending", "running", "submitted")


def sweep_status(points: Sequence[Point], evaluate: bool = True) -> tuple[list[PointStatus], bool]:
    """(status per point, whether the scheduler answered)."""
    jobs = {p.run_dir: slurm.read_job(p.run_dir) for p in points}
    states = scheduler_states([j for j in jobs.values() if j])
    return [point_status(p.name, p.run_dir, jobs[p.run_dir], states, evaluate) for p in points], states is not None


def point_status(name: str, run_dir: str, job: dict | None, states: dict | None, evaluate: bool = True) -> PointStatus:
    run = RunDir(run_dir)
    step, total = progress(run)
    st = PointStatus(name, str(run_dir), "not started", step, total, job["job_id"] if job else "")
    results = _eval_results(run)
    if results:
        st.eval = results[-1]["metrics"]
    sched_state, reason = (states or {}).get(st.job, ("", "")) if job else ("", "")
    if sched_state in ACTIVE:
        st.state = ACTIVE[sched_state]
        st.message = f"requeued ({reason})" if reason == "BeginTime" else (reason if reason not in ("None", "") else "")
        return st
    if run.is_done():
        final = slurm.done_step(run)
        st.step = final if final is not None else st.step
        st.total = st.total or st.step
        evaluated = any(r.get("step") == final for r in results)
        st.state = "done" if (evaluated or not evaluate) else "trained"
        if st.state == "trained":
            st.message = "not evaluated yet; `mdtzoo sweep` again evaluates it"
        if run.failed.is_file():  # evaluation failed after training finished
            st.state, st.message = "failed", _tail(run.failed.read_text())
        return st
    if run.failed.is_file():
        st.state, st.message = "failed", _tail(run.failed.read_text())
        return st
    if job and sched_state.startswith(ENDED_BADLY):
        st.state = "failed"
        st.message = f"{sched_state}: " + (_log_tail(job.get("stderr")) or "no error in the job's log")
        return st
    if job and states is None and job.get("executor") == "slurm":
        st.state, st.message = "submitted", "the scheduler can't be asked (no squeue here)"
        return st
    if _last_kind(run) == "preempted":
        st.state, st.message = "preempted", "stopped at a checkpoint; `mdtzoo sweep` again resumes it"
    elif run.latest_checkpoint() is not None or step:
        st.state = "stopped"
        st.message = (f"job {st.job} ended ({sched_state or 'unknown state'}) " if job else "") + \
            "without DONE; `mdtzoo sweep` again resumes it"
        log = _log_tail(job.get("stderr")) if job else ""
        if log:
            st.message += f": {log}"
    elif job:
        st.state = "failed" if sched_state else "submitted"
        st.message = _log_tail(job.get("stderr")) or (f"job ended: {sched_state}" if sched_state else "")
    return st


def progress(run: RunDir) -> tuple[int | None, int | None]:
    """(last logged training step, train.steps of the run's config)."""
    step = None
    for record in reversed(_tail_records(run.metrics)):
        if "step" in record:
            step = int(record["step"])
            break
    if step is None and run.latest_checkpoint() is not None:
        step = int(re.search(r"(\d+)", run.latest_checkpoint().name).group(1))
    total = None
    if run.config.is_file():
        m = re.search(r"^train\.steps = (\d+)", run.config.read_text(), re.MULTILINE)
        total = int(m.group(1)) if m else 1000  # train()'s default
    return step, total


def _tail_records(path: Path, size: int = 8192) -> list[dict]:
    """The JSON records in the last ``size`` bytes of metrics.jsonl (long runs log thousands)."""
    if not path.is_file():
        return []
    length = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, length - size))
        lines = f.read().decode(errors="replace").splitlines()
    if length > size:
        lines = lines[1:]  # probably cut
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _last_kind(run: RunDir) -> str | None:
    records = _tail_records(run.metrics)
    return records[-1].get("kind") if records else None


def _eval_results(run: RunDir) -> list[dict]:
    folder = run.path / "eval"
    out = []
    for path in sorted(folder.glob("step_*.json")) if folder.is_dir() else ():
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return out


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # The first line of an error record says what happened; the last ones where.
    picked = [lines[0]] + [line for line in lines[-n + 1:] if line != lines[0]] if n > 1 else lines[:1]
    return " | ".join(picked)


def _log_tail(path: str | None, n: int = TAIL_LINES) -> str:
    """The last error lines of a job's stderr (submitit logs the traceback there)."""
    if not path or not Path(path).is_file():
        return ""
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.search(line) and not line.startswith("File ")]
    return " | ".join((errors or lines)[-n:])


# -- the scheduler's view ---------------------------------------------------------------------------------
ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
          "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
          "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
ENDED_BADLY = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED")


def scheduler_states(jobs: Sequence[dict]) -> dict[str, tuple[str, str]] | None:
    """{job id: (SLURM state, reason)} for the given RUN/.job records; None when SLURM can't be asked.

    squeue (one line per array task) for live jobs, sacct for ended ones; local jobs by process.
    """
    out: dict[str, tuple[str, str]] = {}
    for job in jobs:
        if job.get("executor") == "local" and job.get("host") == socket.gethostname():
            out[job["job_id"]] = (("RUNNING" if _local_alive(job["job_id"]) else "ENDED"), "")
    slurm_jobs = [j for j in jobs if j.get("executor") == "slurm"]
    if not slurm_jobs:
        return out
    if shutil.which("squeue") is None:
        return None
    users = ",".join(sorted({j.get("user") or getpass.getuser() for j in slurm_jobs}))
    live = _run(["squeue", "-h", "-r", "-u", users, "-o", "%i|%T|%r"])
    if live is None:
        return None
    for line in live.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    ended = [j["job_id"] for j in slurm_jobs if j["job_id"] not in out]
    if ended and shutil.which("sacct"):
        text = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(ended)]) or ""
        for line in text.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0] in ended:
                out[parts[0]] = (parts[1].split()[0], parts[2] if len(parts) > 2 else "")
    return out


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _local_alive(job_id: str) -> bool:
    try:
        return b"submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


# -- rendering -------------------------------------------------------------------------------------------
def render(statuses: Sequence[PointStatus], scheduler: bool = True) -> str:
    """A plain-text table, one line per point, then one line per problem."""
    rows = [("point", "state", "step", "job", "eval")]
    for s in statuses:
        step = f"{s.step if s.step is not None else '-'}/{s.total if s.total is not None else '?'}"
        rows.append((s.name, s.state, step, s.job or "-", summarise_eval(s.eval)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()) +
                 ("" if scheduler else "  (no SLURM scheduler reachable: states from the run dirs only)"))
    notes = [s for s in statuses if s.message]
    for s in notes:
        lines.append(f"{s.name}: {s.state}: {s.message}"[:400])
    return "\n".join(lines)


def summarise_eval(metrics: dict, limit: int = 3) -> str:
    """Headline metrics (per-class breakdowns like relation_acc_face hidden), 4 significant digits."""
    if not metrics:
        return "-"
    keys = [k for k in metrics if not any(k != o and k.startswith(o + "_") for o in metrics)]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys[:limit])


# -- what a status command looks at ---------------------------------------------------------------------
def write_manifest(root: str | os.PathLike, sweep) -> Path:
    from mdtzoo.training.rundir import write_text

    path = Path(root) / MANIFEST.format(name=sweep.name)
    data = {"name": sweep.name, "sweep_file": sweep.path, "evaluate": bool(sweep.evaluation),
            "points": [p.as_dict() for p in sweep.points]}
    write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def read_root(root: str | os.PathLike) -> tuple[list[Point], bool]:
    """The points under a sweep root: from its manifests (ROOT/sweep_*.json: every sweep submitted
    there, e.g. table1 and table2 share runs), else every subfolder that is a run dir."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is neither a sweep file nor a sweep folder")
    points: dict[str, Point] = {}
    evaluate = True
    for manifest in sorted(root.glob(MANIFEST.format(name="*"))):
        data = json.loads(manifest.read_text())
        evaluate = evaluate and data.get("evaluate", True)
        for p in data["points"]:
            points.setdefault(p["run_dir"], Point(p["name"], tuple(p["gin_files"]), tuple(p["bindings"]), p["run_dir"]))
    if points:
        return list(points.values()), evaluate
    markers = ("config.gin", slurm.JOB_FILE, "DONE")
    runs = sorted(d for d in root.iterdir() if d.is_dir() and any((d / f).exists() for f in markers))
    if not runs:
        raise FileNotFoundError(f"{root} holds no run dirs (folders with config.gin) and no sweep_*.json")
    return [Point(d.name, (), (), str(d)) for d in runs], True
