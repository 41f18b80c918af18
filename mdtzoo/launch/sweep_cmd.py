"""``mdtzoo sweep FILE --executor {slurm,local,debug}`` and ``mdtzoo status SWEEP_FILE_OR_ROOT``.

    mdtzoo sweep experiments/paper/table3_mask_ratio.sweep --executor slurm --profile a100
    mdtzoo sweep experiments/debug/tiny.sweep --executor local --root /tmp/tiny
    mdtzoo status experiments/paper/table3_mask_ratio.sweep      # or: mdtzoo status runs/table3

``sweep`` validates every point first (gin, data, model on the meta device, run dirs) and
submits nothing if any point is bad; then it skips finished points and points whose job is
queued or running, and submits the rest (a SLURM job array; local runs wait here).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mdtzoo import config as cfg

RESOURCE_FLAGS = (  # flag, type, help; each overrides the profile's setting of the same name
    ("--partition", str, "SLURM partition"),
    ("--gpus-per-node", int, "GPUs per node; one task (DDP process) per GPU"),
    ("--nodes", int, "nodes per job"),
    ("--time", str, "time limit per job: minutes, H:MM:SS or D-HH:MM:SS"),
    ("--array-parallelism", int, "at most this many points run at once (SLURM arrays, local runs)"),
    ("--cpus-per-task", int, "CPUs per task"),
    ("--mem", str, "memory per node, e.g. 64G"),
    ("--account", str, "SLURM account"),
    ("--constraint", str, "node feature, e.g. a100 or h100"),
    ("--qos", str, "quality of service"),
    ("--signal-delay-s", int, "seconds between the preemption/time-out signal and the kill"),
)


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="validate a sweep file's grid, then run its points (SLURM, local, debug)")
    p.add_argument("sweep", help="a .sweep file (TOML; see docs/slurm.md)")
    p.add_argument("--executor", required=True, choices=("slurm", "local", "debug"),
                   help="slurm: a job array; local: subprocesses here, waiting; debug: in this process (pdb)")
    p.add_argument("--profile", help="cluster profile: slurm/NAME.toml or a path (flags override it)")
    for flag, kind, text in RESOURCE_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--root", help="folder for the points' run dirs (default: runs/<sweep name>)")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING",
                   help="extra binding for every point, e.g. \"datasets.latents.root='/data/latents'\"")
    p.add_argument("--dry-run", action="store_true", help="validate and show what would be submitted; submit nothing")
    p.add_argument("--wait", action="store_true", help="slurm: wait until no point is queued or running")
    p.set_defaults(fn=run_sweep)

    p = sub.add_parser("status", help="state of every point of a sweep: run dirs plus the scheduler")
    p.add_argument("target", help="a .sweep file or a sweep's root folder (runs/<sweep name>)")
    p.add_argument("--root", help="with a sweep file: the --root it was submitted with")
    p.set_defaults(fn=run_status)


def run_sweep(args) -> int:
    from mdtzoo.launch import slurm, status
    from mdtzoo.launch.sweep import load_sweep, validate

    sweep = load_sweep(args.sweep, args.root, args.gin)
    flags = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
             for flag, _, _ in RESOURCE_FLAGS}
    res = slurm.resources(slurm.load_profile(args.profile), flags)
    params = slurm.executor_parameters(args.executor, res, f"mdtzoo-{sweep.name}")

    print(f"sweep {sweep.name}: {len(sweep.points)} points under {sweep.root}; validating ...", flush=True)
    import torch

    # a job's processes and devices: one task per GPU; the debug executor runs in this process, seeing its GPUs
    gpus = res["gpus_per_node"] > 0 or (args.executor == "debug" and torch.cuda.is_available())
    problems = validate(sweep.points, sweep.evaluation, world=res["nodes"] * max(1, res["gpus_per_node"]), gpus=gpus)
    if problems:
        listing = "\n".join(f"  {name}: {problem}" for name, problem in problems.items())
        bad = len([name for name in problems if name != "[eval]"])
        what = f"{bad} of {len(sweep.points)} points are invalid" + (" and so is [eval]" if "[eval]" in problems else "")
        raise cfg.ConfigError(f"{what}; nothing was submitted:\n{listing}")

    statuses, _ = status.sweep_status(sweep.points, evaluate=bool(sweep.evaluation))
    todo = [p for p, s in zip(sweep.points, statuses) if not (s.complete or s.active)]
    skipped = {s.name: s for s in statuses if s.complete or s.active}
    for name, s in skipped.items():
        print(f"  skip {name}: {s.state}" + (f" (job {s.job})" if s.active and s.job else ""))
    print(f"{len(todo)} to run, {sum(s.complete for s in statuses)} done, "
          f"{sum(s.active for s in statuses)} queued or running")
    if args.dry_run:
        print(f"executor {args.executor}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        for p in todo:
            print(f"  {p.name}: {' '.join(Path(f).name for f in p.gin_files)} {'; '.join(p.bindings)}")
        return 0
    if not todo:
        return 0

    root = Path(sweep.root)
    root.mkdir(parents=True, exist_ok=True)
    status.write_manifest(root, sweep)
    jobs = slurm.submit(todo, sweep.evaluation, args.executor, res, root / ".submitit", f"mdtzoo-{sweep.name}")
    if args.executor == "slurm":
        first = str(jobs[0].job_id).split("_")[0]
        print(f"submitted {len(jobs)} job(s) as SLURM job {first}; follow with: mdtzoo status {root}")
        if not args.wait:
            return 0
        while True:
            statuses, _ = status.sweep_status(sweep.points, evaluate=bool(sweep.evaluation))
            if not any(s.active for s in statuses):
                break
            time.sleep(5)
    statuses, reachable = status.sweep_status(sweep.points, evaluate=bool(sweep.evaluation))
    print(status.render(statuses, reachable))
    return 0 if all(s.complete for s in statuses) else 1


def run_status(args) -> int:
    from mdtzoo.launch import status
    from mdtzoo.launch.sweep import load_sweep

    target = Path(args.target)
    if target.is_file():
        sweep = load_sweep(target, args.root)
        points, evaluate = sweep.points, bool(sweep.evaluation)
        print(f"sweep {sweep.name}: {sweep.root}")
    else:
        points, evaluate = status.read_root(target)
        print(f"sweep folder {target.resolve()}")
    statuses, reachable = status.sweep_status(points, evaluate)
    print(status.render(statuses, reachable))
    sys.stdout.flush()
    return 0
