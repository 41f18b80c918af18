"""Run a sweep on the GPUs of one machine, several points per GPU; evaluate every kept checkpoint;
delete the checkpoints; time some points alone; summarise (issue 8, docs/results.md).

    python experiments/small/run_gpu.py experiments/small/small.sweep --gpus 1 --per-gpu 4
    python experiments/small/run_gpu.py experiments/small/small.sweep --dry-run          # the plan, nothing run
    python experiments/small/run_gpu.py experiments/small/small.sweep --tiny             # CPU, ~2 min: plumbing
    python experiments/small/run_gpu.py experiments/small/small.sweep --gin "train.steps = 8000" \
        --gin "EVAL_EVERY = 800" --archive $OUT/small.tar.gz                              # longer runs
    python experiments/small/run_gpu.py experiments/small/small.sweep --deadline 3300 --archive a.tgz  # in a 1 h slot

Per point, one worker process (this file, ``--worker``) with ``CUDA_VISIBLE_DEVICES`` set to its
GPU, GPUs taken round-robin, at most gpus x per-gpu workers at a time. A worker trains the point
(train() resumes a stopped run and is skipped for a DONE one), evaluates every checkpoint in
RUN/checkpoints that has no RUN/eval/step_XXXXXXXX.json yet (the sweep's [eval] settings: oracle
relation accuracy, held-out loss, a PNG grid), deletes the checkpoints (they are too big to move)
and writes RUN/driver.json ("complete": true, wall times, GPU). A complete point is skipped, so the
same command again finishes whatever is left.

Then, with the GPUs idle, the points matching --calibrate are trained again alone on one GPU for
--calibrate-steps steps (in ROOT_calibration/, no evaluation): ROOT/calibration.json holds their
seconds per step, which `mdtzoo table small` and `mdtzoo plot curves --x gpu_seconds` use as the
GPU-seconds of their configuration (mdtzoo.tables.timing): the logged steps of runs that shared a
GPU are slower than one GPU alone gives. Last, a summary table (also ROOT/driver_summary.md), and
--archive packs ROOT and its calibration without checkpoints into one .tar.gz.

Only the standard library and mdtzoo are imported here (no submitit); workers import torch.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without installing mdtzoo

# --tiny: the same grid at toy size, so the whole pipeline runs on a CPU in a minute or two.
TINY_BINDINGS = (
    "datasets.relations.length = 64", "datasets.relations.heldout_size = 16", "train.steps = 4",
    "train.global_batch = 8", "EVAL_EVERY = 2", "train.compile = False", "train.log_every = 1", "train.warmup_steps = 0",
    "train.heldout_items = 16", "train.num_workers = 0", "train.precision = 'fp32'",
    "train.eval_samples = 8", "train.eval_sample_steps = '2'",  # = TINY_EVAL, for the in-run evaluation
    "train.heldout_timesteps = 2", "metrics.heldout_loss.num_timesteps = 2",  # it dominates a tiny CPU run
)
TINY_EVAL = {"num_samples": 8, "sample_steps": "2"}
TINY_CALIBRATION_STEPS = 4
DRIVER_FILE = "driver.json"
WORKER_LOG = "driver.log"


# ---------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> int:
    """One point: train, evaluate every checkpoint, delete the checkpoints (or time it alone)."""
    import gin
    import torch

    from mdtzoo import config as cfg
    from mdtzoo.training import checkpoint as ckpt
    from mdtzoo.training import train
    from mdtzoo.training.rundir import RunDir, write_text

    run = RunDir(spec["run_dir"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    previous = read_json(run.path / DRIVER_FILE)   # an earlier attempt that trained, then stopped
    record = {"name": spec["name"], "mode": spec["mode"], "host": socket.gethostname(), "device": device,
              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "per_gpu": spec["per_gpu"], "complete": False,
              "attempts": previous.get("attempts", 0) + 1, "train_wall_s": previous.get("train_wall_s")}
    if not run.is_done():
        start = time.time()
        cfg.parse(spec["gin_files"], spec["bindings"])
        result = cfg.call_root(train)
        gin.clear_config()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the GPU is shared: give the training's cached blocks back
        if result["status"] != "done":
            print(f"training stopped: {result}", flush=True)
            return 3
        record["train_wall_s"] = round(time.time() - start, 1)
        write_text(run.path / DRIVER_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")

    if spec["mode"] == "calibrate":
        record["sec_per_step"], record["img_per_sec"], record["steps"] = solo_rate(run.metrics)
    else:
        from mdtzoo.evaluation import evaluate_run, result_path

        evaluation = dict(spec["evaluation"])
        record["evals"] = []
        start = time.time()
        for step, path in ckpt.list_checkpoints(run.checkpoints):
            t0 = time.time()
            guidance = evaluation.get("guidance", "none"), evaluation.get("cfg_scale")
            fresh = not result_path(run.path, step, *guidance).is_file()
            out = evaluate_run(run.path, checkpoint=path, **evaluation)
            record["evals"].append({"step": step, "seconds": round(time.time() - t0, 1), "fresh": fresh,
                                    "relation_acc": out["metrics"].get("relation_acc"),
                                    "relation_score": out["metrics"].get("relation_score")})
            print(f"evaluated step {step}: {json.dumps(record['evals'][-1])}", flush=True)
        record["eval_wall_s"] = round(time.time() - start, 1)
    if not spec["keep_checkpoints"]:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    record["complete"] = True
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_text(run.path / DRIVER_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return 0


def solo_rate(metrics_path: Path) -> tuple[float, float, int]:
    """(seconds per step, img/s, steps) of a calibration run: the median img/s of its logged windows
    after the first (the first also holds the start-up)."""
    from mdtzoo.tables.collect import read_config, read_jsonl

    records = [r for r in read_jsonl(metrics_path) if r.get("kind") == "train" and r.get("img_per_sec")]
    rates = sorted(r["img_per_sec"] for r in (records[1:] or records))
    img_per_sec = rates[len(rates) // 2]
    global_batch = float(read_config(metrics_path.parent).get("train.global_batch", 256))
    return round(global_batch / img_per_sec, 6), round(img_per_sec, 1), int(records[-1]["step"])


# ---------------------------------------------------------------------------------------- driver
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_complete(run_dir: str | Path) -> bool:
    return bool(read_json(Path(run_dir) / DRIVER_FILE).get("complete"))


def point_state(run_dir: str) -> str:
    run = Path(run_dir)
    if is_complete(run):
        return "complete"
    if (run / "DONE").is_file():
        return "trained"
    return "partial" if (run / "metrics.jsonl").is_file() else "new"


def select(points, patterns: str | None):
    if not patterns:
        return list(points)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]


def gpu_ids(gpus: int) -> list[str]:
    """The device ids of the first ``gpus`` GPUs this process may use (honours CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    if ids is None and shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        ids = [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.splitlines()))]
    if ids is None:
        print("run_gpu.py: warning: no nvidia-smi and no CUDA_VISIBLE_DEVICES; assuming GPUs 0..N-1", file=sys.stderr)
        ids = [str(i) for i in range(gpus)]
    if gpus > len(ids):
        raise ValueError(f"--gpus {gpus}, but only {len(ids)} GPU(s) are visible ({','.join(ids) or 'none'})")
    return ids[:gpus]


def worker_env(gpu: str | None, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _stop(running: dict) -> None:
    """SIGTERM every running worker (train() checkpoints after its current step), then wait."""
    for _, proc, _, _ in running.values():
        proc.terminate()
    for _, proc, _, handle in running.values():
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        handle.close()


def run_pool(jobs: list[dict], slots: list, threads: int, python: str, log,
             deadline: float | None = None) -> dict[str, int]:
    """Run worker specs, one per free slot (a GPU index or None), in order; {name: exit code}.

    At ``deadline`` (a time.time() value) the running workers are stopped as on a preemption
    (their runs resume later) and the pending ones are not started; both count as exit code 3.
    """
    pending, running, codes = list(jobs), {}, {}
    try:
        while pending or running:
            if deadline is not None and time.time() > deadline:
                log(f"deadline: stopping {len(running)} running worker(s), {len(pending)} not started; "
                    "the same command resumes them")
                _stop(running)
                codes.update({job["name"]: 3 for job, *_ in running.values()})
                codes.update({job["name"]: 3 for job in pending})
                return codes
            for i, gpu in enumerate(slots):
                if i in running or not pending:
                    continue
                job = dict(pending.pop(0), per_gpu=sum(s == gpu for s in slots))
                logfile = Path(job["log"])
                logfile.parent.mkdir(parents=True, exist_ok=True)
                handle = open(logfile, "a")
                proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                                        stdout=handle, stderr=subprocess.STDOUT, env=worker_env(gpu, threads),
                                        cwd=str(REPO))
                running[i] = (job, proc, time.time(), handle)
                log(f"start {job['name']} ({job['mode']}) on {'GPU ' + str(gpu) if gpu is not None else 'CPU'}")
            time.sleep(0.5)
            for i, (job, proc, t0, handle) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                codes[job["name"]] = proc.returncode
                del running[i]
                what = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; log {job['log']})"
                log(f"{what}: {job['name']} after {time.time() - t0:.0f} s" + _tail(job, proc.returncode))
    except KeyboardInterrupt:
        log("interrupted: asking the running workers to checkpoint and stop")
        _stop(running)
        raise
    return codes


def _tail(job: dict, code: int) -> str:
    if code == 0:
        record = read_json(Path(job["run_dir"]) / DRIVER_FILE)
        if job["mode"] == "calibrate":
            return f" ({record.get('sec_per_step')} s/step alone on {record.get('device')})"
        last = (record.get("evals") or [{}])[-1]
        return (f" (train {record.get('train_wall_s')} s, eval {record.get('eval_wall_s')} s; last step "
                f"{last.get('step')}: relation_acc {last.get('relation_acc')}, score {last.get('relation_score')})")
    lines = Path(job["log"]).read_text(errors="replace").strip().splitlines() if Path(job["log"]).is_file() else []
    return "\n    " + "\n    ".join(lines[-5:])


def calibration_jobs(points, root: Path, steps: int, patterns: str, keep: bool) -> list[dict]:
    """Solo timing runs of the points matching ``patterns`` that calibration.json does not have yet."""
    from mdtzoo.tables.timing import read_calibration

    done = read_calibration(root)
    folder = root.parent / f"{root.name}_calibration"
    jobs = []
    for p in select(points, patterns):
        if p.name in done:
            continue
        run_dir = folder / p.name
        bindings = [b for b in p.bindings if not b.startswith("train.run_dir")] + [
            f"train.steps = {steps}", "train.heldout_every = 0", "train.sample_every = 0", "train.eval_every = 0",
            f"train.ckpt_every = {steps}", "train.keep_every = 0", f"train.log_every = {max(1, steps // 10)}",
            f"train.run_dir = {str(run_dir)!r}"]
        jobs.append({"mode": "calibrate", "name": p.name, "gin_files": list(p.gin_files), "bindings": bindings,
                     "run_dir": str(run_dir), "evaluation": {}, "keep_checkpoints": keep,
                     "log": str(run_dir / WORKER_LOG)})
    return jobs


def merge_calibration(root: Path, jobs: list[dict]) -> None:
    from mdtzoo.tables.timing import CALIBRATION, read_calibration

    data = read_calibration(root)
    root.mkdir(parents=True, exist_ok=True)  # a machine that ran only the timing runs has no grid yet
    for job in jobs:
        record = read_json(Path(job["run_dir"]) / DRIVER_FILE)
        if record.get("complete") and record.get("sec_per_step"):
            data[job["name"]] = {k: record[k] for k in ("sec_per_step", "img_per_sec", "steps", "device", "finished")}
    if data:
        (root / CALIBRATION).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def summary(points, root: Path) -> str:
    """A Markdown table of the points: state, last evaluation, training and evaluation times."""
    import math

    from mdtzoo.evaluation import read_results
    from mdtzoo.tables.render import markdown_table
    from mdtzoo.tables.timing import read_calibration, train_seconds

    import pandas as pd

    calibration = read_calibration(root)
    rows = []
    for p in points:
        run = Path(p.run_dir)
        record = read_json(run / DRIVER_FILE)
        results = read_results(run) if run.is_dir() else []
        last = results[-1] if results else {"metrics": {}}
        steps, seconds = train_seconds(run) if (run / "metrics.jsonl").is_file() else ([0], [0.0])
        solo = calibration.get(p.name, {}).get("sec_per_step")
        rows.append({"point": p.name, "state": point_state(p.run_dir), "evals": len(results),
                     "step": last.get("step", math.nan), "relation_acc": last["metrics"].get("relation_acc", math.nan),
                     "relation_score": last["metrics"].get("relation_score", math.nan),
                     "heldout_mse": last["metrics"].get("heldout_mse", math.nan),
                     "train s (logged)": float(seconds[-1]), "s/step alone": solo if solo else math.nan,
                     "train wall s": record.get("train_wall_s", math.nan),
                     "eval wall s": record.get("eval_wall_s", math.nan)})
    frame = pd.DataFrame(rows).set_index("point")
    return markdown_table(frame, floatfmt=lambda v: "—" if isinstance(v, float) and math.isnan(v) else
                          (f"{v:.4g}" if isinstance(v, float) else str(v)))


def archive(path: Path, root: Path) -> None:
    """ROOT and ROOT_calibration as one .tar.gz, without checkpoints."""
    def no_checkpoints(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        return None if "checkpoints" in parts or info.name.endswith(".pt") else info

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for folder in (root, root.parent / f"{root.name}_calibration"):
            if folder.is_dir():
                tar.add(folder, arcname=folder.name, filter=no_checkpoints)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("sweep", nargs="?", help="a .sweep file (experiments/small/small.sweep)")
    parser.add_argument("--root", help="folder of the run dirs (default: the sweep's root; --tiny: runs/small_tiny)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use, 0..N-1 (default 1; --tiny: 0 = CPU)")
    parser.add_argument("--per-gpu", type=int, default=None, help="workers per GPU at once (default 4; CPU: 2)")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING", help="extra binding for every point")
    parser.add_argument("--only", metavar="PATTERNS", help="points whose names match these shell patterns ('mdt_seed*,dit_*')")
    parser.add_argument("--calibrate", default="mdt_seed0,dit_seed0", metavar="PATTERNS",
                        help="points to time alone on a GPU afterwards (default mdt_seed0,dit_seed0; 'none': skip)")
    parser.add_argument("--calibrate-steps", type=int, default=None, help="steps of a timing run (default 300)")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only the timing runs (--calibrate), e.g. on a machine of its own; no grid")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU, a minute or two): tests the pipeline")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    parser.add_argument("--keep-checkpoints", action="store_true", help="do not delete RUN/checkpoints after evaluating")
    parser.add_argument("--archive", metavar="TAR_GZ", help="pack ROOT (and its calibration) without checkpoints here")
    parser.add_argument("--deadline", type=float, metavar="SECONDS",
                        help="stop the workers this long after the start (as on a preemption: they resume on the "
                             "next call), skip calibration, then summarise and archive what is there")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if not args.sweep:
        parser.error("give a sweep file")
    if args.deadline is not None and args.deadline <= 0:
        parser.error(f"--deadline must be a positive number of seconds; got {args.deadline:g}")

    from mdtzoo.config import ConfigError
    from mdtzoo.launch.sweep import load_sweep, validate

    gpus = args.gpus if args.gpus is not None else (0 if args.tiny else 1)
    per_gpu = args.per_gpu or (4 if gpus else 2)
    bindings = (list(TINY_BINDINGS) if args.tiny else []) + list(args.gin)
    root = args.root or ("runs/small_tiny" if args.tiny else None)
    calibrate_steps = args.calibrate_steps or (TINY_CALIBRATION_STEPS if args.tiny else 300)
    started = time.time()

    def log(message: str) -> None:
        elapsed = int(time.time() - started)
        print(f"[{elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] {message}", flush=True)

    try:
        sweep = load_sweep(args.sweep, root, bindings)
    except ConfigError as e:
        print(f"run_gpu.py: error: {e}", file=sys.stderr)
        return 2
    evaluation = {**sweep.evaluation, **(TINY_EVAL if args.tiny and sweep.evaluation else {})}
    points = select(sweep.points, args.only)
    if not points:
        print(f"run_gpu.py: error: no point of {args.sweep} matches --only {args.only!r}", file=sys.stderr)
        return 2
    root_path = Path(sweep.root)
    log(f"sweep {sweep.name}: {len(points)} of {len(sweep.points)} points under {root_path}; validating ...")
    problems = validate(points, evaluation)
    if problems:
        print("run_gpu.py: error: invalid points, nothing was run:\n" +
              "\n".join(f"  {name}: {problem}" for name, problem in problems.items()), file=sys.stderr)
        return 2
    try:
        ids = gpu_ids(gpus) if gpus else []
    except ValueError as e:
        print(f"run_gpu.py: error: {e}", file=sys.stderr)
        return 2
    slots = [g for _ in range(per_gpu) for g in ids] if gpus else [None] * per_gpu
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    states = {p.name: point_state(p.run_dir) for p in points}
    jobs = [{"mode": "run", "name": p.name, "gin_files": list(p.gin_files), "bindings": list(p.bindings),
             "run_dir": p.run_dir, "evaluation": evaluation, "keep_checkpoints": args.keep_checkpoints,
             "log": str(Path(p.run_dir) / WORKER_LOG)} for p in points
            if states[p.name] != "complete" and not args.calibrate_only]
    where = f"{gpus} GPU(s) x {per_gpu} workers" if gpus else f"CPU, {per_gpu} workers"
    log(("calibration only; " if args.calibrate_only else f"{len(jobs)} to run, {len(points) - len(jobs)} complete; ")
        + f"{where}, {threads} thread(s) each; "
        f"evaluation: {json.dumps(evaluation)}")
    if args.dry_run:
        common = [b for b in bindings if all(b in job["bindings"] for job in jobs)]
        print(f"  every point: {'; '.join(common) or '(no extra bindings)'}")
        for i, job in enumerate(jobs):
            gpu = slots[i % len(slots)]
            own = [b for b in job["bindings"] if b not in common]
            print(f"  {job['name']:<18} {states[job['name']]:<8} {'GPU ' + str(gpu) if gpu is not None else 'CPU'}  "
                  f"{' '.join(Path(f).name for f in job['gin_files'])}  {'; '.join(own)}")
        if args.calibrate != "none":
            cal = calibration_jobs(points, root_path, calibrate_steps, args.calibrate, True)
            print(f"  then timed alone for {calibrate_steps} steps: {', '.join(j['name'] for j in cal) or 'nothing new'}")
        return 0

    deadline = started + args.deadline if args.deadline else None
    try:
        codes = run_pool(jobs, slots, threads, sys.executable, log, deadline)
    except KeyboardInterrupt:
        log("stopped; the same command resumes")
        return 130
    if args.calibrate != "none" and not (deadline and time.time() > deadline):
        cal = calibration_jobs(points, root_path, calibrate_steps, args.calibrate, args.keep_checkpoints)
        if cal:
            log(f"timing {len(cal)} point(s) alone on a GPU for {calibrate_steps} steps")
            codes.update({f"calibrate {k}": v for k, v in
                          run_pool(cal, ids or [None], (os.cpu_count() or 1), sys.executable, log).items()})
            merge_calibration(root_path, cal)
    table = summary(points, root_path)
    (root_path / "driver_summary.md").write_text(table)
    print(table)
    if args.archive:
        archive(Path(args.archive), root_path)
        log(f"wrote {args.archive}")
    failed = [name for name, code in codes.items() if code != 0]
    incomplete = [p.name for p in points if not is_complete(p.run_dir)]
    log(f"finished: {len(points) - len(incomplete)}/{len(points)} points complete"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if not failed and (args.calibrate_only or not incomplete) else 1


if __name__ == "__main__":
    sys.exit(main())
