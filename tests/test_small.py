"""experiments/small (issue 8) and its analysis: the sweep's points fill the right rows, training time
from logs, the steps-to-threshold speed-up on curves with closed-form answers, the small tables.

Fake run directories hold the real resolved config of experiments/small/*.gin (config.gin, as
train() writes it) with hand-written metrics.jsonl and eval JSONs.
"""

import json
import math
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import pytest

from mdtzoo import config
from mdtzoo.launch import cli
from mdtzoo.launch.sweep import load_sweep
from mdtzoo.tables import collect, make_table, plot_curves
from mdtzoo.tables.ginparse import config_columns, parse_gin_text
from mdtzoo.tables.pivot import mismatches
from mdtzoo.tables.small import (SMALL_TABLE1, SMALL_TABLE3, SMALL_TABLE5, SMALL_TABLES, class_table, first_crossing,
                                 mean_std, report, speedup_table)
from mdtzoo.tables.timing import seconds_at, solo_seconds_per_step, train_seconds

EXP = Path(__file__).resolve().parent.parent / "experiments"
SWEEP = EXP / "small" / "small.sweep"
_TEXT: dict = {}


def config_text(gin_file: str, bindings=()) -> str:
    key = (gin_file, tuple(bindings))
    if key not in _TEXT:
        _TEXT[key] = config.parse([EXP / "small" / gin_file], list(bindings))
        gin.clear_config()
    return _TEXT[key]


def make_run(root: Path, name: str, gin_file: str, bindings=(), evals=(), train=(), status="done") -> Path:
    """evals: (step, metrics) pairs -> eval/step_*.json; train: (step, img_per_sec) log windows."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.gin").write_text(config_text(gin_file, bindings))
    lines = [{"kind": "train", "step": s, "loss": 1.0, "img_per_sec": ips, "world": 1} for s, ips in train]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for step, metrics in evals:
        (run / "eval" / f"step_{step:08d}.json").write_text(json.dumps(
            {"step": step, "checkpoint": f"ckpt_{step:08d}.pt", "metrics": metrics,
             "settings": {"num_samples": 512, "sample_steps": "100", "guidance": "none", "cfg_scale": None}}))
    if status == "done":
        (run / "DONE").write_text(f"step {max([s for s, _ in evals] + [0])}\n")
    return run


EVAL_STEPS = list(range(400, 4001, 400))
SEED_OFFSET = {0: 0.0, 1: 0.01, 2: -0.01}


@pytest.fixture
def linear_runs(tmp_path):
    """DiT: acc = s/10000 + offset(seed); MDT: acc = s/5000 + offset(seed); evaluated every 400 steps to 4000.

    DiT's finals are 0.40, 0.41, 0.39: threshold 0.40, which DiT's mean curve reaches at step 4000, and
    MDT's seeds at 5000 (0.40 - offset) = 2000, 1950, 2050 steps: ratios 0.5, 0.4875, 0.5125."""
    root = tmp_path / "small"
    for seed, offset in SEED_OFFSET.items():
        extra = [f"train.seed = {seed}"] if seed else []
        for model, slope, gin_file in (("dit", 1e-4, "dit.gin"), ("mdt", 2e-4, "mdt.gin")):
            evals = [(s, {"relation_acc": s * slope + offset, "relation_score": 0.5 + s * slope / 2,
                          "relation_acc_face": s * slope, "relation_score_face": 0.6}) for s in EVAL_STEPS]
            make_run(root, f"{model}_seed{seed}", gin_file, extra, evals, train=[(s, 25600.0) for s in range(50, 4001, 50)])
    # Timed alone: DiT 0.01 s/step, MDT 0.025 s/step (experiments/small/run_gpu.py writes this file).
    (root / "calibration.json").write_text(json.dumps({"dit_seed0": {"sec_per_step": 0.01},
                                                       "mdt_seed0": {"sec_per_step": 0.025}}))
    return root


# ------------------------------------------------------------------------------ the sweep and its rows
def test_sweep_points_fill_exactly_their_rows():
    sweep = load_sweep(SWEEP, "/tmp/small-root")
    names = [p.name for p in sweep.points]
    assert len(names) == 15 and names[:6] == ["mdt_seed0", "mdt_seed1", "mdt_seed2", "dit_seed0", "dit_seed1", "dit_seed2"]
    assert sweep.evaluation == {"metrics": ["heldout_loss", "relation_acc"], "num_samples": 256, "sample_steps": "50",
                                "seed": 0}
    expected = {  # point -> the rows (table, row name) it must fill, and no other
        "mdt_seed0": {("small_table1", "mdt"), ("small_table3", "mask_ratio_0.3")} |
                     {("small_table5", n) for n in ("b_side_interp", "c_shortcut", "d_full_masked", "e_loss_all", "i_relbias")},
        "dit_seed1": {("small_table1", "dit")},
        "mdt_ratio0.1": {("small_table3", "mask_ratio_0.1")}, "mdt_ratio0.7": {("small_table3", "mask_ratio_0.7")},
        "mdt_no_relbias": {("small_table5", "i_no_relbias")}, "mdt_no_interp": {("small_table5", "b_no_interp")},
        "mdt_no_shortcut": {("small_table5", "c_no_shortcut")}, "mdt_full_only": {("small_table5", "d_full")},
        "mdt_masked_only": {("small_table5", "d_masked")}, "mdt_loss_removed": {("small_table5", "e_loss_removed")},
    }
    for point in sweep.points:
        if point.name not in expected:
            continue
        text = config.parse(point.gin_files, point.bindings)
        cols = config_columns(parse_gin_text(text))
        filled = {(t, r.name) for t, spec in SMALL_TABLES.items() for r in spec.rows if not mismatches(cols, r.match)}
        assert filled == expected[point.name], point.name
        assert gin.query_parameter("datasets.relations.image_size") == 32
        assert cols["train.keep_every"] == cols["train.heldout_every"] == cols["train.ckpt_every"] == 300
    gin.clear_config()


def test_in_run_evaluation_uses_the_sweeps_eval_settings():
    """base.gin's in-run oracle evaluation (train.eval_*) and the sweep's [eval] must not drift apart:
    run_gpu.py reuses the trainer's results only because they were made with the same settings."""
    sweep = load_sweep(SWEEP, "/tmp/small-root")
    cols = config_columns(parse_gin_text(config.parse([EXP / "small" / "mdt.gin"])))
    assert cols["train.eval_samples"] == sweep.evaluation["num_samples"] == 256
    assert str(cols["train.eval_sample_steps"]) == str(sweep.evaluation["sample_steps"]) == "50"
    assert cols["train.eval_every"] == cols["train.heldout_every"] == 300
    gin.clear_config()


def test_base_gin_steps_and_interval_are_one_binding_each():
    text = config.parse([EXP / "small" / "mdt.gin"], ["train.steps = 8000", "EVAL_EVERY = 800"])
    assert gin.query_parameter("train.steps") == 8000
    cols = config_columns(parse_gin_text(text))
    assert (cols["train.keep_every"], cols["train.heldout_every"], cols["train.ckpt_every"]) == (800, 800, 800)
    assert cols["model"] == "mdt_xs2" and cols["train.global_batch"] == 128 and cols["masking.random.ratio"] == 0.3
    gin.clear_config()


# ------------------------------------------------------------------------------ training time
def test_train_seconds_charges_windows_after_pauses_at_the_median(tmp_path):
    # 50-step windows of 0.5 s (128 x 50 / 12800); the first (start-up) takes 5 s, the one after the
    # held-out loss at step 300 (EVAL_EVERY) takes 2.5 s: 16 windows of training = 8 s, 14.5 s as logged.
    rates = {50: 1280.0, 350: 2560.0}
    run = make_run(tmp_path, "r", "mdt.gin", train=[(s, rates.get(s, 12800.0)) for s in range(50, 801, 50)])
    steps, seconds = train_seconds(run)
    assert steps[0] == 0 and steps[-1] == 800 and seconds[0] == 0
    assert seconds[-1] == pytest.approx(8.0)
    np.testing.assert_allclose(seconds[:3], [0.0, 0.5, 1.0])
    assert train_seconds(run, correct=False)[1][-1] == pytest.approx(14.5)
    np.testing.assert_allclose(seconds_at(run, [400, 800, 1000]), [4.0, 8.0, np.nan])
    np.testing.assert_allclose(seconds_at(run, [400, 800], rate=0.5), [200.0, 400.0])


def test_solo_rate_comes_from_the_sweep_roots_calibration(linear_runs):
    assert solo_seconds_per_step(linear_runs / "mdt_seed0") == 0.025
    assert solo_seconds_per_step(linear_runs / "mdt_seed1") is None
    (linear_runs / "calibration.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert solo_seconds_per_step(linear_runs / "mdt_seed0") is None


# ------------------------------------------------------------------------------ steps to threshold
def test_first_crossing_interpolates_and_says_how():
    x, y = [100, 200, 300, 400], [0.1, 0.3, 0.5, 0.4]
    c = first_crossing(x, y, 0.4)
    assert c.how == "reached" and c.x == pytest.approx(250.0)
    assert first_crossing(x, y, 0.05).how == "at first evaluation" and first_crossing(x, y, 0.05).x == 100
    assert first_crossing(x, y, 0.05).text(lambda v: f"{v:,.0f}") == "≤ 100"
    miss = first_crossing(x, y, 0.6)
    assert not miss.reached and math.isnan(miss.x) and miss.text() == "not reached"
    # lower is better (a loss): first at or below 0.35, between (2, 0.5) and (3, 0.2)
    down = first_crossing([1, 2, 3], [0.9, 0.5, 0.2], 0.35, higher_is_better=False)
    assert down.x == pytest.approx(2.5)
    # the threshold equals the last value up to rounding: reached there, not "not reached"
    assert first_crossing([1, 2], [0.0, 0.1 + 0.2], 0.3).x == pytest.approx(2.0)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = mean_std([float("nan"), 4.0])
    assert mean == 4.0 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([]))


def test_speedup_on_linear_curves(linear_runs):
    rep = speedup_table(collect([linear_runs]))
    f = rep.frame
    assert list(f.index) == [("relation acc.", "steps"), ("relation acc.", "GPU-seconds"),
                             ("relation score", "steps"), ("relation score", "GPU-seconds")]
    acc = f.loc[("relation acc.", "steps")]
    assert acc["threshold"] == pytest.approx(0.40) and acc["threshold std"] == pytest.approx(0.01)
    assert acc["DiT (mean)"] == pytest.approx(4000.0)
    assert acc["MDT reached"] == "3/3"
    assert acc["MDT mean"] == pytest.approx(2000.0) and acc["MDT std"] == pytest.approx(50.0)
    assert acc["ratio mean"] == pytest.approx(0.5) and acc["ratio std"] == pytest.approx(0.0125)
    assert acc["ratio of means"] == pytest.approx(0.5) and acc["MDT (mean)"] == pytest.approx(2000.0)
    # per seed: DiT seed 1 (+0.01) reaches 0.40 at 3,900, seed 2 (-0.01) never
    assert acc["DiT seeds"] == "s0 4,000 · s1 3,900 · s2 not reached"
    assert acc["MDT seeds"] == "s0 2,000 · s1 1,950 · s2 2,050"
    # GPU-seconds: the solo rates of calibration.json, shared by each configuration's seeds
    sec = f.loc[("relation acc.", "GPU-seconds")]
    assert sec["DiT (mean)"] == pytest.approx(40.0) and sec["MDT mean"] == pytest.approx(50.0)
    assert sec["ratio mean"] == pytest.approx(1.25) and sec["ratio std"] == pytest.approx(0.03125)
    # the graded score has no seed offsets: DiT's mean ends at 0.70 = threshold at 4000; MDT at 2000
    score = f.loc[("relation score", "steps")]
    assert score["threshold"] == pytest.approx(0.70) and score["ratio of means"] == pytest.approx(0.5)
    assert "≤ 0.5" in rep.caption


def test_speedup_says_not_reached_and_first_evaluation(tmp_path):
    root = tmp_path / "small"
    def acc(*values):
        return [(400 * (i + 1), {"relation_acc": v}) for i, v in enumerate(values)]

    make_run(root, "dit_seed0", "dit.gin", [], acc(0.1, 0.5))
    make_run(root, "dit_seed1", "dit.gin", ["train.seed = 1"], acc(0.1, 0.7))
    make_run(root, "mdt_seed0", "mdt.gin", [], acc(0.65, 0.9))                     # at the first evaluation
    make_run(root, "mdt_seed1", "mdt.gin", ["train.seed = 1"], acc(0.2, 0.55))     # never 0.6
    rep = speedup_table(collect([root]), metrics=("relation_acc",), axes=("steps",))
    row = rep.frame.iloc[0]
    assert row["threshold"] == pytest.approx(0.6)
    assert row["DiT (mean)"] == pytest.approx(800.0)        # the mean curve 0.1 -> 0.6
    assert row["MDT seeds"] == "s0 ≤ 400 · s1 not reached" and row["MDT reached"] == "1/2"
    assert row["ratio mean"] == pytest.approx(0.5) and math.isnan(row["ratio std"])
    assert "1 MDT-XS/2 seed(s) never reached it (ratio > 1.00" in row["note"] and "≤" in row["note"]


# ------------------------------------------------------------------------------ tables
def test_small_tables_lay_out_means_and_seeds(linear_runs):
    make_run(linear_runs, "mdt_ratio0.5", "mdt.gin", ["masking.random.ratio = 0.5"],
             [(4000, {"relation_acc": 0.7, "relation_score": 0.9, "heldout_mse": 0.05})])
    make_run(linear_runs, "mdt_masked_only", "mdt.gin", ["train.passes = 'masked'"],
             [(4000, {"relation_acc": 0.1, "relation_score": 0.3})])
    frame = collect([linear_runs])
    t1 = make_table(SMALL_TABLE1, frame)
    assert list(t1.frame.index) == ["DiT-XS/2", "MDT-XS/2"]
    assert list(t1.frame.columns) == ["FID paper", "relation acc. ours", "relation acc. std", "relation score ours",
                                      "relation score std", "held-out MSE ours", "our step", "runs"]
    assert t1.frame["held-out MSE ours"].isna().all()   # these fake runs log no held-out loss
    assert t1.frame.loc["MDT-XS/2", "relation acc. ours"] == pytest.approx(0.8)      # finals 0.8, 0.81, 0.79
    assert t1.frame.loc["MDT-XS/2", "relation acc. std"] == pytest.approx(0.01)
    assert t1.frame.loc["DiT-XS/2", "FID paper"] == 68.40 and t1.frame.loc["DiT-XS/2", "runs"] == "3/3"
    assert t1.frame.loc["DiT-XS/2", "our step"] == "4,000"
    t3 = make_table(SMALL_TABLE3, frame).frame
    assert list(t3.index) == ["0.1", "0.3", "0.5", "0.7"] and list(t3["FID paper"]) == [51.60, 50.26, 51.57, 52.90]
    assert t3.loc["0.5", "relation acc. ours"] == 0.7 and t3.loc["0.3", "runs"] == "3/3"
    assert t3.loc["0.1", "runs"] == "0/0" and math.isnan(t3.loc["0.1", "relation acc. ours"])
    t5 = make_table(SMALL_TABLE5, frame).frame
    assert len(t5) == 11 and t5.loc[("(d) latent type", "Masked"), "FID paper"] == 76.63
    assert t5.loc[("(d) latent type", "Masked"), "relation acc. ours"] == 0.1
    assert t5.loc[("(d) latent type", "Full+Masked"), "relation acc. ours"] == pytest.approx(0.8)
    classes = class_table(frame).frame
    assert classes.index[0] == "overall" and "face" in classes.index and len(classes) == 9
    assert classes.loc["face", "exact MDT-XS/2"] == pytest.approx(0.8) and classes.loc["face", "graded DiT-XS/2"] == 0.6
    assert classes.loc["overall", "graded MDT-XS/2"] == pytest.approx(0.9)


def test_cli_writes_every_small_table_and_the_fig1_plot(linear_runs, tmp_path, capsys):
    out = tmp_path / "results"
    assert cli.main(["table", "small", str(linear_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Small Table 3" in printed and "Learning speed" in printed and "Unmatched" not in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"small_table{i}.{e}" for i in (1, 3, 5) for e in ("csv", "md", "tex")] +
                           ["small_speedup.csv", "small_speedup.md", "small_classes.csv", "small_classes.md"])
    speed = pd.read_csv(out / "small_speedup.csv")
    assert speed.loc[0, "ratio mean"] == pytest.approx(0.5) and speed.loc[0, "Metric"] == "relation acc."
    assert cli.main(["table", "small_table3", str(linear_runs), "--metric", "relation_score", "--out", ""]) == 0
    assert "| 0.3 | 50.26 | 0.9000 |" in capsys.readouterr().out

    png = tmp_path / "fig1.png"
    fig = plot_curves([linear_runs], metric="relation_acc,relation_score", x="steps,gpu_seconds",
                      runs="mdt_seed*,dit_seed*", out=png)
    assert png.is_file() and len(fig.axes) == 4
    seconds_ax = fig.axes[1]
    assert seconds_ax.get_xlabel() == "GPU-seconds of training (timed alone on a GPU)"
    mdt = next(line for line in seconds_ax.get_lines() if line.get_label().startswith("mdt_xs2"))
    np.testing.assert_allclose(mdt.get_xdata(), np.array(EVAL_STEPS) * 0.025)
    np.testing.assert_allclose(mdt.get_ydata(), np.array(EVAL_STEPS) * 2e-4)
    assert cli.main(["plot", "curves", str(linear_runs), "--runs", "dit_*", "--metric", "relation_acc",
                     "--x", "gpu_seconds", "--out", str(tmp_path / "d.png")]) == 0
    assert "1 configuration per panel" in capsys.readouterr().out


def test_report_rejects_unknown_names(linear_runs):
    with pytest.raises(ValueError, match="unknown small table"):
        report("small_table9", collect([linear_runs]))


def test_horizon_compares_runs_stopped_at_different_steps(linear_runs):
    """--upto: DiT at 2,000 steps (acc 0.2 +- offsets), its seeds stopped later count as done; MDT reaches
    0.2 at 1,000 (ratio 0.5); a run stopped before the horizon stays out; the closed forms of linear_runs."""
    import shutil

    from mdtzoo.tables.collect import at_horizon

    for name in ("dit_seed0", "mdt_seed2"):
        (linear_runs / name / "DONE").unlink()       # stopped (deadline), evaluated to 4,000 anyway
    short = linear_runs / "mdt_seed1"
    for path in (short / "eval").glob("step_*.json"):
        if int(path.stem[5:]) > 1600:
            path.unlink()                             # stopped before the horizon
    (short / "DONE").unlink()
    frame = collect([linear_runs], upto=2000)
    assert frame["step"].max() == 2000
    status = frame.groupby("run")["status"].first()
    assert status["dit_seed0"] == "done" and status["mdt_seed2"] == "done" and status["mdt_seed1"] != "done"
    acc = speedup_table(frame).frame.loc[("relation acc.", "steps")]
    assert acc["threshold"] == pytest.approx(0.20) and acc["DiT (mean)"] == pytest.approx(2000.0)
    assert acc["MDT seeds"] == "s0 1,000 · s2 1,050" and acc["MDT reached"] == "2/2"
    assert acc["ratio of means"] == pytest.approx(0.5125)  # the mean curve of seeds 0 and 2 (offset -0.005)
    assert len(at_horizon(collect([linear_runs]), 4000)) == len(collect([linear_runs]))
    with pytest.raises(ValueError, match="horizon must be a step >= 1"):
        at_horizon(frame, 0)
    shutil.rmtree(short)


def test_the_committed_runs_rebuild_the_published_tables(tmp_path):
    """docs/results/small/runs.tar.gz (the measured runs) -> `mdtzoo table small --upto 2100` gives
    the committed CSVs exactly: the published numbers are what the code computes from the data."""
    import tarfile

    from mdtzoo.tables.small import report

    docs = Path(__file__).resolve().parent.parent / "docs" / "results" / "small"
    with tarfile.open(docs / "runs.tar.gz") as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    report("small", collect([tmp_path / "small"], upto=2100), out=tmp_path / "out")
    for name in ("small_table1", "small_table3", "small_table5", "small_speedup", "small_classes"):
        assert (tmp_path / "out" / f"{name}.csv").read_text() == (docs / f"{name}.csv").read_text(), name
