"""Sweeps on a real SLURM cluster: the local test cluster of ``bash slurm/ci_up.sh`` (.ci/run starts it).

Skipped unless ``sinfo`` answers and the cluster is that test cluster (ClusterName=localci), so
``python -m pytest -q`` never submits to a real cluster from a login node. Every job trains a tiny
model on the CPU (the cluster's GPUs are fake), evaluates it, and the tests read the run dirs.
"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import torch

from mdtzoo.launch import cli, slurm, status
from mdtzoo.launch.sweep import load_sweep
from mdtzoo.training import checkpoint as ckpt


def _test_cluster() -> str | None:
    """None when the local test cluster is up, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM here (sinfo/sbatch not on PATH); `bash slurm/ci_up.sh` starts a local test cluster"
    try:
        if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0:
            return "sinfo fails: no SLURM cluster reachable; `bash slurm/ci_up.sh` starts one"
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM does not answer: {e}"
    name = re.search(r"ClusterName\s*=\s*(\S+)", conf)
    if not name or name.group(1) != "localci":
        return f"cluster {name.group(1) if name else '?'!r} is not the local test cluster of slurm/ci_up.sh"
    return None


SKIP = _test_cluster()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "experiments" / "debug" / "tiny.sweep"
SMALL = [  # a relations run that trains in a few seconds on one CPU thread
    "datasets.relations.image_size = 16", "datasets.relations.length = 32", "datasets.relations.heldout_size = 8",
    "train.global_batch = 4", "train.log_every = 1", "train.heldout_every = 0", "train.progress = False",
]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def wait_for(sweep, timeout=180.0):
    """Poll until no point is queued or running; returns the final statuses by name."""
    deadline = time.time() + timeout
    while True:
        statuses, reachable = status.sweep_status(sweep.points, bool(sweep.evaluation))
        assert reachable
        if not any(s.active for s in statuses):
            return {s.name: s for s in statuses}
        assert time.time() < deadline, status.render(statuses)
        time.sleep(1)


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def weights(run_dir, step) -> dict:
    return ckpt.load(Path(run_dir) / "checkpoints" / f"ckpt_{step:08d}.pt")


def sacct_jobs() -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "now-1days"], capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """experiments/debug/tiny.sweep (MDT-XS/2 at two mask ratios, DiT-XS/2) run through SLURM once."""
    root = tmp_path_factory.mktemp("slurm") / "tiny"
    code = cli.main(["sweep", str(TINY_SWEEP), "--executor", "slurm", "--profile", "local_ci", "--root", str(root)])
    assert code == 0
    sweep = load_sweep(TINY_SWEEP, root)
    return sweep, wait_for(sweep)


def test_debug_sweep_trains_evaluates_and_tabulates_through_slurm(tiny, tmp_path, capsys):
    sweep, states = tiny
    assert {n: s.state for n, s in states.items()} == {p.name: "done" for p in sweep.points}
    jobs = [slurm.read_job(p.run_dir)["job_id"] for p in sweep.points]
    assert len({j.split("_")[0] for j in jobs}) == 1 and sorted(j.split("_")[1] for j in jobs) == ["0", "1", "2"]
    for p in sweep.points:  # one array task per point, each trained to the end and evaluated
        assert (Path(p.run_dir) / "DONE").read_text() == "step 4\n"
        result = json.loads((Path(p.run_dir) / "eval" / "step_00000004.json").read_text())
        assert result["settings"]["num_samples"] == 16 and result["settings"]["sample_steps"] == "5"
        assert 0.0 <= result["metrics"]["relation_acc"] <= 1.0 and 0.0 < result["metrics"]["heldout_mse"] < 2.0
    dit = weights(sweep.points[2].run_dir, 4)
    assert dit["world"] == 1 and "interp.mask_token" not in dit["model"]  # the DiT point built a DiT

    code, out, _ = run_cli(capsys, "status", sweep.root)
    assert code == 0 and "3 done" in out and re.search(r"mdt_xs2,ratio=0.5 +done +4/4 +\d+_1 +heldout_mse=", out)

    # The paper-table path: run dirs -> mdtzoo table (the debug analogue of Table 3).
    code, out, err = run_cli(capsys, "table", "table3", sweep.root, "--metric", "heldout_mse", "--step", "last",
                             "--substitute", "mdt_xs2=mdt_s2", "--out", tmp_path)
    assert code == 0, err
    for p, ratio in zip(sweep.points[:2], ("0.3", "0.5")):
        mse = json.loads((Path(p.run_dir) / "eval" / "step_00000004.json").read_text())["metrics"]["heldout_mse"]
        assert re.search(rf"\| {ratio} \| [\d.]+ \| {mse:.4f} \| 4 \| 1/1 \|", out), out


def test_resubmitting_a_finished_sweep_submits_nothing(tiny, capsys):
    sweep, _ = tiny
    before = sacct_jobs()
    mtimes = {p.name: (Path(p.run_dir) / "DONE").stat().st_mtime_ns for p in sweep.points}
    code, out, _ = run_cli(capsys, "sweep", TINY_SWEEP, "--executor", "slurm", "--profile", "local_ci",
                           "--root", sweep.root)
    assert code == 0 and "0 to run, 3 done, 0 queued or running" in out and "submitted" not in out
    assert sacct_jobs() == before
    assert {p.name: (Path(p.run_dir) / "DONE").stat().st_mtime_ns for p in sweep.points} == mtimes


def test_the_local_executor_gives_the_same_results(tiny, tmp_path, capsys):
    sweep, _ = tiny
    code, out, err = run_cli(capsys, "sweep", TINY_SWEEP, "--executor", "local", "--root", tmp_path,
                             "--array-parallelism", "2", "--cpus-per-task", "1")
    assert code == 0, out + err
    local = load_sweep(TINY_SWEEP, tmp_path)
    for on_slurm, here in zip(sweep.points, local.points):
        a = json.loads((Path(on_slurm.run_dir) / "eval" / "step_00000004.json").read_text())
        b = json.loads((Path(here.run_dir) / "eval" / "step_00000004.json").read_text())
        assert a["metrics"] == b["metrics"] and a["settings"] == b["settings"]
        wa, wb = weights(on_slurm.run_dir, 4), weights(here.run_dir, 4)
        assert all(torch.equal(wa["ema"][k], wb["ema"][k]) for k in wa["ema"])


def test_a_preempted_job_requeues_and_finishes_with_the_uninterrupted_weights(tmp_path):
    sweep_file = write_sweep(tmp_path / "pre.sweep", f"""
gin = ["{REPO}/experiments/demo/base.gin", "{REPO}/experiments/models/mdt_xs2.gin"]
bindings = {json.dumps(SMALL + ["train.steps = 16", "train.ckpt_every = 100"])}
[[zip]]
name = ["interrupted", "reference"]
bindings = [[], []]
[eval]
enabled = false
""")
    root = tmp_path / "runs"
    assert cli.main(["sweep", str(sweep_file), "--executor", "slurm", "--profile", "local_ci", "--root", str(root)]) == 0
    sweep = load_sweep(sweep_file, root)
    run = Path(sweep.points[0].run_dir)
    job_id = slurm.read_job(run)["job_id"]
    deadline = time.time() + 90
    while len([line for line in _lines(run / "metrics.jsonl") if '"train"' in line]) < 3:
        assert time.time() < deadline, "the job never started training"
        time.sleep(0.2)
    # What SLURM does to a preempted job: SIGTERM, then submitit's USR2.
    submitit.SlurmJob(folder=root / ".submitit" / "%j", job_id=job_id)._interrupt()
    seen = set()
    deadline = time.time() + 120
    while True:
        st = status.sweep_status(sweep.points, evaluate=False)[0][0]
        seen.add(st.state)
        if not st.active:
            break
        assert time.time() < deadline, st
        time.sleep(0.5)
    assert st.state == "done" and "pending" in seen  # requeued, waited, ran again
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in info
    records = [json.loads(line) for line in _lines(run / "metrics.jsonl")]
    (stop,) = [r["step"] for r in records if r["kind"] == "preempted"]
    assert 3 <= stop < 16 and (run / "checkpoints" / f"ckpt_{stop:08d}.pt").is_file()  # saved on the signal
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 17))
    final, reference = weights(run, 16), weights(sweep.points[1].run_dir, 16)
    for part in ("model", "ema"):
        assert all(torch.equal(final[part][k], reference[part][k]) for k in reference[part]), part


def test_failing_points_report_their_errors_while_the_others_finish(tmp_path, capsys):
    images = tmp_path / "images"  # files that are not images: the job meets them mid-run, after validation
    images.mkdir()
    for i in range(8):
        (images / f"cat_{i}.png").write_bytes(b"not a png")
    corrupt = ["train.dataset = 'datasets.image_folder'", f"datasets.image_folder.root = '{images}'",
               "datasets.image_folder.image_size = 16", "datasets.image_folder.heldout_size = 2"]
    sweep_file = write_sweep(tmp_path / "fail.sweep", f"""
gin = ["{REPO}/experiments/demo/base.gin", "{REPO}/experiments/models/dit_xs2.gin"]
bindings = {json.dumps(SMALL + ["train.steps = 3", "train.ckpt_every = 2", "train.warmup_steps = 0"])}
[[zip]]
name = ["ok", "nan", "bad_image"]
bindings = [[], ["train.lr = 1e30"], {json.dumps(corrupt)}]
[eval]
metrics = ["heldout_loss"]
""")
    root = tmp_path / "runs"
    assert cli.main(["sweep", str(sweep_file), "--executor", "slurm", "--profile", "local_ci", "--root", str(root)]) == 0
    states = wait_for(load_sweep(sweep_file, root))
    assert {n: s.state for n, s in states.items()} == {"ok": "done", "nan": "failed", "bad_image": "failed"}
    code, out, _ = run_cli(capsys, "status", root)
    assert code == 0 and "1 done, 2 failed" in out
    assert re.search(r"^nan: failed: loss is (nan|inf) at step 2; stopped", out, re.MULTILINE), out
    # (gin re-raises the CorruptImageError as its base class, ValueError, with the message)
    assert re.search(r"^bad_image: failed: \w*Error: corrupt image .*cat_\d\.png", out, re.MULTILINE), out
    assert "corrupt image" in Path(slurm.read_job(root / "bad_image")["stderr"]).read_text()


def test_an_impossible_request_fails_at_submission(tmp_path, capsys):
    before = sacct_jobs()
    code, out, err = run_cli(capsys, "sweep", TINY_SWEEP, "--executor", "slurm", "--profile", "local_ci",
                             "--root", tmp_path, "--gpus-per-node", "64",
                             "--gin", "train.global_batch = 64")  # (a batch that splits over 64 processes)
    assert code == 2
    assert "the scheduler refused the sweep (64 GPUs and 64 tasks per node" in err and "nothing was submitted" in err
    assert re.search(r"sbatch: error: .*(More processors requested than permitted|node configuration is not available)", err)
    assert not list(tmp_path.glob("*/.job")) and sacct_jobs() == before


def test_one_job_trains_with_ddp_over_its_tasks_like_a_single_process(tiny, tmp_path):
    """--gpus-per-node 2 -> 2 tasks in one job, ranks from SLURM through submitit, DDP (gloo on the CPU)."""
    sweep, _ = tiny
    single = sweep.points[0]
    sweep_file = write_sweep(tmp_path / "ddp.sweep", f"""
gin = {json.dumps(list(single.gin_files))}
bindings = {json.dumps(list(single.bindings[:-1]))}
run_name = "ddp"
[eval]
metrics = ["heldout_loss"]
""")
    root = tmp_path / "runs"
    assert cli.main(["sweep", str(sweep_file), "--executor", "slurm", "--profile", "local_ci", "--root", str(root),
                     "--gpus-per-node", "2"]) == 0
    states = wait_for(load_sweep(sweep_file, root))
    assert states["ddp"].state == "done"
    a, b = weights(single.run_dir, 4), weights(root / "ddp", 4)
    assert (a["world"], b["world"]) == (1, 2)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    logs = sorted(Path(slurm.read_job(root / "ddp")["stdout"]).parent.glob("*_log.out"))
    assert len(logs) == 2  # two tasks ran the job; rank 0 alone evaluated
    assert len(list((root / "ddp" / "eval").glob("*.json"))) == 1


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []
