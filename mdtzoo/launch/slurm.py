"""Running sweep points with submitit: cluster profiles, the job, submission.

    res = resources(load_profile("a100"), {"time": "24:00:00"})     # slurm/a100.toml + flags
    jobs = submit(points, sweep.evaluation, "slurm", res, folder="runs/table3/.submitit")

Only strings (gin files, bindings, run dir) and plain evaluation settings travel to a job;
:class:`SweepJob` parses gin inside the job, trains, then evaluates. It is
``Checkpointable``: on submitit's preemption/time-out signal (USR2, ``signal_delay_s``
before the end) it asks train() to checkpoint after the current step (train() listens to
SIGUSR1/SIGTERM), then hands itself - the same strings - back to submitit, which requeues
the job; the requeued job resumes exactly from the run dir's last checkpoint.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import shutil
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import submitit
from submitit.core.job_environment import JobEnvironment, SignalHandler
from submitit.core.utils import DelayedSubmission
from submitit.helpers import Checkpointable

from mdtzoo import config as cfg
from mdtzoo.training.rundir import RunDir, write_text

EXECUTORS = ("slurm", "local", "debug")
PROFILE_KEYS = {  # key: type; the meaning of each is in docs/slurm.md
    "partition": str, "gpus_per_node": int, "nodes": int, "cpus_per_task": int, "mem": str, "time": str,
    "account": str, "constraint": str, "qos": str, "array_parallelism": int, "signal_delay_s": int,
    "setup": list,
}
DEFAULTS = {"gpus_per_node": 0, "nodes": 1, "time": "60", "signal_delay_s": 120}
PARALLELISM = {"slurm": 64, "local": 1, "debug": 1}   # array_parallelism when neither profile nor flag sets it
REPO_PROFILES = Path(__file__).resolve().parents[2] / "slurm"
JOB_FILE = ".job"
CPUS_ENV = "MDTZOO_CPUS_PER_TASK"   # threads per task of local jobs (SLURM sets SLURM_CPUS_PER_TASK)


# -- profiles and resources ------------------------------------------------------------------------
def find_profile(name: str) -> Path:
    """``slurm/NAME.toml`` (current folder first, then the repository's), or a path to a .toml."""
    folders = (Path.cwd() / "slurm", REPO_PROFILES)
    if name.endswith(".toml") or os.sep in name:
        candidates = [Path(name)]
    else:
        candidates = [d / f"{name}.toml" for d in folders]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.toml")})
    raise cfg.ConfigError(f"cluster profile {name!r} not found; known profiles: {', '.join(known) or '(none)'}")


def load_profile(name: str | None) -> dict:
    """A profile's settings (``{}`` for None), checked: unknown keys and wrong types name the file."""
    if name is None:
        return {}
    path = find_profile(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise cfg.ConfigError(f"{path}: not valid TOML: {e}") from None
    return check_resources(data, str(path))


def check_resources(data: dict, where: str) -> dict:
    out = {}
    for key, value in data.items():
        if key not in PROFILE_KEYS:
            raise cfg.ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(PROFILE_KEYS)}")
        kind = PROFILE_KEYS[key]
        if key == "time" and isinstance(value, int):
            value = str(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise cfg.ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        out[key] = value
    if "time" in out:
        minutes(out["time"])
    if "mem" in out and not re.fullmatch(r"\d+[KMGT]?", out["mem"]):
        raise cfg.ConfigError(f"{where}: mem must look like 64G, 500M or 0 (all of a node's memory); got {out['mem']!r}")
    for key in ("gpus_per_node", "nodes", "cpus_per_task", "array_parallelism", "signal_delay_s"):
        if key in out and out[key] < (0 if key == "gpus_per_node" else 1):
            raise cfg.ConfigError(f"{where}: {key} must be positive, got {out[key]}")
    return out


def resources(profile: dict, overrides: dict) -> dict:
    """Defaults < profile < command-line flags (None flags are ignored)."""
    flags = check_resources({k: v for k, v in overrides.items() if v is not None}, "command line")
    return {**DEFAULTS, **profile, **flags}


def minutes(value: str | int) -> int:
    """A SLURM time limit ('90', '4:00:00', '2-12:00:00', 'MM:SS') in whole minutes."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise cfg.ConfigError(f"time {value!r} is not a SLURM time (minutes, H:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        total = days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    elif c is not None:  # H:M:S
        total = a * 60 + b + c / 60
    elif b is not None:  # M:S
        total = a + b / 60
    else:
        total = a
    return max(1, math.ceil(total))


def executor_parameters(kind: str, res: dict, job_name: str) -> dict:
    """submitit parameters: one task per GPU (DDP inside the job), at least one task."""
    gpus = res["gpus_per_node"]
    params: dict[str, Any] = {"timeout_min": minutes(res["time"]), "tasks_per_node": max(1, gpus), "name": job_name}
    if gpus:
        params["gpus_per_node"] = gpus
    if kind == "slurm":
        params["nodes"] = res["nodes"]
        params["slurm_signal_delay_s"] = res["signal_delay_s"]
        params["slurm_array_parallelism"] = res.get("array_parallelism", PARALLELISM[kind])
        if "cpus_per_task" in res:
            params["cpus_per_task"] = res["cpus_per_task"]
        for key in ("partition", "mem", "account", "constraint", "qos", "setup"):
            if res.get(key) not in (None, ""):
                params[f"slurm_{key}"] = res[key]
    elif res["nodes"] > 1:
        raise cfg.ConfigError(f"--executor {kind} runs on this machine: nodes must be 1, got {res['nodes']}")
    return params


# -- the job ---------------------------------------------------------------------------------------------
class _Interrupted(BaseException):
    """Preemption arrived outside train()'s loop (nothing unsaved): stop now and requeue."""


class SweepJob(Checkpointable):
    """Train one sweep point, then evaluate it. Built from strings only; gin is parsed in the job.

    gin_files, bindings: what ``mdtzoo train`` would get (bindings include ``train.run_dir``);
    evaluation: keyword arguments of ``mdtzoo.evaluation.evaluate_run`` ({} = do not evaluate).
    """

    def __init__(self, gin_files: Sequence[str], bindings: Sequence[str], run_dir: str, evaluation: dict | None = None):
        self.gin_files = [str(f) for f in gin_files]
        self.bindings = [str(b) for b in bindings]
        self.run_dir = str(run_dir)
        self.evaluation = dict(evaluation or {})

    def __call__(self) -> dict:
        started = time.time()
        _export_ranks()
        _limit_threads()
        usr_sig = JobEnvironment._usr_sig()
        requeue = signal.getsignal(usr_sig)
        if not isinstance(getattr(requeue, "__self__", None), SignalHandler):
            requeue = None  # not inside a submitit job (debug executor, tests)
        else:
            signal.signal(usr_sig, _checkpoint_in_train)
        try:
            result = run_point(self.gin_files, self.bindings, self.run_dir, self.evaluation)
        except _Interrupted:
            result = {"status": "preempted", "run_dir": self.run_dir}
        except Exception as error:
            _record_failure(self.run_dir, error, started)
            raise
        if result["status"] == "preempted" and requeue is not None:
            requeue(usr_sig, None)  # calls checkpoint(), requeues and exits (raises when out of requeues)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The same strings again: the requeued job resumes from the run dir's last checkpoint."""
        return DelayedSubmission(SweepJob(self.gin_files, self.bindings, self.run_dir, self.evaluation))

    def __repr__(self) -> str:
        return f"SweepJob(run_dir={self.run_dir!r})"


def run_point(gin_files: Sequence[str], bindings: Sequence[str], run_dir: str, evaluation: dict) -> dict:
    """Train (unless DONE) and evaluate one point in this process; the job's body."""
    from mdtzoo.training import distributed as dist_util
    from mdtzoo.training import train

    run = RunDir(run_dir)
    info = dist_util.env_info()
    if not run.is_done():
        cfg.parse(gin_files, bindings)
        result = cfg.call_root(train)
        if result["status"] != "done":
            return result
    dist_util.teardown()
    out = {"status": "done", "step": done_step(run), "run_dir": str(run_dir)}
    if evaluation and info.is_main:
        from mdtzoo.evaluation import evaluate_run

        run.failed.unlink(missing_ok=True)
        out["eval"] = evaluate_run(run_dir, **evaluation)["metrics"]
    return out


def done_step(run: RunDir) -> int | None:
    m = re.search(r"step (\d+)", run.done.read_text()) if run.is_done() else None
    return int(m.group(1)) if m else None


def _checkpoint_in_train(signum, frame) -> None:
    """submitit's preemption/time-out signal: inside train()'s loop, ask it to checkpoint after this
    step (it listens to SIGUSR1); outside the loop nothing is unsaved, so stop at once."""
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler):
        handler(signum, frame)
    else:
        raise _Interrupted()


def _export_ranks() -> None:
    """torchrun-style RANK / WORLD_SIZE / MASTER_* from submitit's view of the job (SLURM or local tasks)."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return
    if env.num_tasks > 1 and "WORLD_SIZE" not in os.environ:
        port = 20000 + int(re.sub(r"\D", "", env.job_id) or 0) % 20000
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def _limit_threads() -> None:
    """CPU threads = the CPUs given to this task. Without cgroups torch takes every core of the node,
    and oversubscribed OpenMP threads spin: 16x slower measured with 3 jobs on 2 cores."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get(CPUS_ENV)
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))


def _record_failure(run_dir: str, error: BaseException, started: float) -> None:
    """RUN/FAILED with the error, unless train() already wrote one during this attempt (rank 0 only)."""
    from mdtzoo.training.distributed import env_info

    run = RunDir(run_dir)
    if not env_info().is_main or not run.path.is_dir():
        return
    if run.failed.is_file() and run.failed.stat().st_mtime >= started:
        return
    tb = "".join(traceback.format_exception(error)[-6:])
    run.mark_failed(f"{type(error).__name__}: {error}\n\n{tb}".rstrip())


# -- submission ------------------------------------------------------------------------------------------
class SubmissionError(ValueError):
    """The scheduler refused the jobs (nothing was submitted); the message has its reason."""


def make_executor(kind: str, folder: str | os.PathLike, res: dict, job_name: str):
    if kind not in EXECUTORS:
        raise cfg.ConfigError(f"unknown executor {kind!r}; known: {', '.join(EXECUTORS)}")
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise cfg.ConfigError("--executor slurm: no SLURM here (sbatch is not on PATH); use --executor local")
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=kind)
    executor.update_parameters(**executor_parameters(kind, res, job_name))
    return executor


def submit(points, evaluation: dict, kind: str, res: dict, folder: str | os.PathLike, job_name: str) -> list:
    """Submit one job per point (a SLURM job array); record each job in RUN/.job. Returns the jobs.

    Local jobs run at most ``array_parallelism`` at a time and this call waits for them; debug
    jobs run one after the other in this process.
    """
    executor = make_executor(kind, folder, res, job_name)
    jobs_for = [SweepJob(p.gin_files, p.bindings, p.run_dir, evaluation) for p in points]
    if kind == "slurm":
        try:
            with executor.batch():
                jobs = [executor.submit(job) for job in jobs_for]
        except Exception as e:  # noqa: BLE001  (sbatch's refusal comes back as several exception types)
            asked = ", ".join(f"{k.removeprefix('slurm_')}={v}" for k, v in executor_parameters(kind, res, job_name).items()
                              if k not in ("name", "slurm_setup", "gpus_per_node", "tasks_per_node"))
            raise SubmissionError(
                f"the scheduler refused the sweep ({res['gpus_per_node']} GPUs and {max(1, res['gpus_per_node'])} tasks "
                f"per node, {asked}); nothing was submitted:\n{_sbatch_reason(e)}") from None
        for p, job in zip(points, jobs):
            record_job(p.run_dir, kind, job)
        return jobs
    parallel = res.get("array_parallelism", PARALLELISM[kind])
    threads = res.get("cpus_per_task") or max(1, (os.cpu_count() or 1) // (parallel * max(1, res["gpus_per_node"])))
    jobs = []
    with _environ(**({CPUS_ENV: str(threads)} if kind == "local" else {})):  # local jobs inherit it
        for p, job_fn in zip(points, jobs_for):
            while kind == "local" and sum(not j.done() for j in jobs) >= parallel:
                time.sleep(0.5)
            job = executor.submit(job_fn)
            if kind == "local":
                record_job(p.run_dir, kind, job)
            else:
                job.result()  # runs it now, in this process; an error opens pdb (submitit's debug executor)
            jobs.append(job)
        while not all(j.done() for j in jobs):
            time.sleep(0.5)
    return jobs


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sbatch_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "error" in line.lower() or "sbatch" in line.lower()]
    return "\n".join(lines[-3:]) or str(error)


def record_job(run_dir: str, kind: str, job) -> None:
    """RUN/.job: which job runs this point, where its logs are (read by ``mdtzoo status``)."""
    record = {"executor": kind, "job_id": str(job.job_id), "user": getpass.getuser(), "host": socket.gethostname(),
              "submitted": round(time.time(), 3), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    write_text(Path(run_dir) / JOB_FILE, json.dumps(record, indent=1) + "\n")


def read_job(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / JOB_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
