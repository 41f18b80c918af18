"""experiments/small/run_gpu.py: the plan (--dry-run) and the whole pipeline at toy size (--tiny) on a CPU.

The tiny run trains two points of small.sweep for 4 steps, evaluates both kept checkpoints (steps 2
and 4) of each, deletes the checkpoints, times one point alone, summarises, archives; run again,
it finds nothing to do. ~35 s on two cores.
"""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from mdtzoo.tables import collect
from mdtzoo.tables.small import speedup_table

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "experiments" / "small" / "run_gpu.py"
SWEEP = REPO / "experiments" / "small" / "small.sweep"


def drive(*args) -> subprocess.CompletedProcess:
    """The driver as the GPU job runs it: its own process, workers under it."""
    return subprocess.run([sys.executable, str(DRIVER), str(SWEEP), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def driver():
    """The driver module, for the calls that start no worker (cheaper in this process)."""
    spec = importlib.util.spec_from_file_location("run_gpu", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_the_plan_and_runs_nothing(tmp_path, driver, capsys, monkeypatch):
    root = tmp_path / "small"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert driver.main([str(SWEEP), "--root", str(root), "--gpus", "2", "--per-gpu", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "15 to run, 0 complete; 2 GPU(s) x 3 workers" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and ".gin" in line]
    assert len(listed) == 15 and listed[0] == "mdt_seed0" and listed[-1] == "mdt_loss_removed"
    # GPUs round-robin: 0, 1, 0, 1, ...
    assert "mdt_seed0          new      GPU 0" in out and "mdt_seed1          new      GPU 1" in out
    assert "mdt_no_relbias" in out and "models.mdt_xs2.rel_pos = 'none'" in out
    assert "then timed alone for 300 steps: mdt_seed0, dit_seed0" in out
    assert not root.exists()
    assert driver.main([str(SWEEP), "--root", str(root), "--only", "nothing*", "--dry-run"]) == 2
    assert "matches --only" in capsys.readouterr().err
    bad = [str(SWEEP), "--root", str(root), "--gin", "masking.random.ratio = 2.0", "--only", "mdt_seed0", "--dry-run"]
    assert driver.main(bad) == 2
    assert "mdt_seed0:" in capsys.readouterr().err
    assert driver.main([str(SWEEP), "--root", str(root), "--gpus", "3", "--dry-run"]) == 2
    assert "only 2 GPU(s) are visible (0,1)" in capsys.readouterr().err


def test_tiny_run_trains_evaluates_every_checkpoint_cleans_up_and_resumes(tmp_path, driver, capsys):
    root = tmp_path / "small"
    archive = tmp_path / "out" / "small.tar.gz"
    out = drive("--tiny", "--root", str(root), "--only", "mdt_seed0,dit_seed0", "--calibrate", "dit_seed0",
                "--archive", str(archive))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 to run, 0 complete; CPU, 2 workers" in out.stdout
    for name in ("mdt_seed0", "dit_seed0"):
        run = root / name
        assert (run / "DONE").read_text() == "step 4\n"
        assert not (run / "checkpoints").exists()                     # deleted once evaluated
        record = json.loads((run / "driver.json").read_text())
        assert record["complete"] and record["device"] == "cpu" and [e["step"] for e in record["evals"]] == [2, 4]
        for step in (2, 4):
            result = json.loads((run / "eval" / f"step_{step:08d}.json").read_text())
            assert result["settings"]["num_samples"] == 8 and result["settings"]["sample_steps"] == "2"
            assert 0.0 <= result["metrics"]["relation_acc"] <= 1.0 and 0.0 <= result["metrics"]["relation_score"] <= 1.0
            assert result["metrics"]["heldout_mse"] > 0
            assert (run / "eval" / f"step_{step:08d}.png").stat().st_size > 100
        heldout = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "heldout"]
        assert [r["step"] for r in heldout] == [2, 4]
    calibration = json.loads((root / "calibration.json").read_text())
    assert list(calibration) == ["dit_seed0"] and calibration["dit_seed0"]["sec_per_step"] > 0
    assert calibration["dit_seed0"]["steps"] == 4
    assert not (tmp_path / "small_calibration" / "dit_seed0" / "checkpoints").exists()
    summary = (root / "driver_summary.md").read_text()
    assert "| mdt_seed0 | complete | 2 | 4 |" in summary and "| dit_seed0 | complete | 2 | 4 |" in summary
    assert "finished: 2/2 points complete" in out.stdout

    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "small/mdt_seed0/eval/step_00000004.json" in names and "small/calibration.json" in names
    assert "small_calibration/dit_seed0/metrics.jsonl" in names and not any(n.endswith(".pt") for n in names)

    # The analysis reads what the driver wrote: the runs fill the small tables' rows.
    frame = collect([root])
    assert sorted(frame["run"].unique()) == ["dit_seed0", "mdt_seed0"]
    speed = speedup_table(frame, metrics=("relation_score",), axes=("steps", "gpu_seconds")).frame
    assert list(speed["MDT reached"].str.endswith("/1")) == [True, True]
    assert pd.notna(speed["threshold"]).all()

    again = [str(SWEEP), "--tiny", "--root", str(root), "--only", "mdt_seed0,dit_seed0", "--calibrate", "dit_seed0"]
    assert driver.main(again) == 0
    out = capsys.readouterr().out
    assert "0 to run, 2 complete" in out and "start " not in out and "finished: 2/2 points complete" in out


def test_deadline_stops_running_workers_and_starts_no_more(tmp_path, driver):
    """--deadline: running workers get SIGTERM (train() checkpoints, as on a preemption), pending ones
    never start; everything left counts as stopped (exit code 3) and the same command resumes it."""
    import time

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")  # a worker that would outlive the deadline
    fake.chmod(0o755)
    jobs = [{"mode": "run", "name": f"p{i}", "run_dir": str(tmp_path / f"p{i}"), "log": str(tmp_path / f"p{i}.log")}
            for i in range(3)]
    messages = []
    start = time.time()
    codes = driver.run_pool(jobs, [None], 1, str(fake), messages.append, deadline=start + 1.0)
    assert codes == {"p0": 3, "p1": 3, "p2": 3}
    assert time.time() - start < 30                                   # the sleeping worker was stopped
    assert sum(m.startswith("start ") for m in messages) == 1         # only one slot, one worker started
    assert any("deadline: stopping 1 running worker(s), 2 not started" in m for m in messages)


def test_a_deadline_already_past_is_refused(driver, capsys):
    with pytest.raises(SystemExit):
        driver.main([str(SWEEP), "--deadline", "-20", "--dry-run"])
    assert "--deadline must be a positive number of seconds; got -20" in capsys.readouterr().err
