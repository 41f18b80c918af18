"""`mdtzoo eval RUN_DIR` / evaluate_run: the run's step is recorded; results are idempotent."""

import json

import pytest

from mdtzoo import config
from mdtzoo.evaluation import evaluate_run, read_results
from mdtzoo.launch import cli
from mdtzoo.training import train


@pytest.fixture(scope="module")
def relations_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    config.parse([], [
        "build.model = @models.mdt_xs4", f"train.run_dir = '{run}'", "train.dataset = 'datasets.relations'",
        "datasets.relations.image_size = 16", "datasets.relations.length = 64", "datasets.relations.heldout_size = 16",
        "train.steps = 2", "train.global_batch = 8", "train.progress = False",
    ])
    train()
    return run


def test_evaluate_run_records_step_metrics_and_a_grid(relations_run):
    result = evaluate_run(relations_run, num_samples=16, sample_steps="3")
    assert result["step"] == 2 and result["checkpoint"] == "ckpt_00000002.pt"
    assert result["metric_names"] == ["heldout_loss", "relation_acc"]
    m = result["metrics"]
    assert m["heldout_mse"] > 0 and m["heldout_vb"] > 0
    assert 0.0 <= m["relation_acc"] <= 1.0
    assert {k for k in m if k.startswith("relation_acc_")} == {
        "relation_acc_face", "relation_acc_count_2", "relation_acc_count_3", "relation_acc_count_4",
        "relation_acc_colour_match", "relation_acc_mirror", "relation_acc_repeat", "relation_acc_evenly_spaced"}
    assert 0.0 <= m["relation_score"] <= 1.0 and "relation_score_face" in m
    assert (relations_run / "eval" / "step_00000002.png").is_file()
    assert read_results(relations_run) == [result]


def test_existing_results_are_reused_not_recomputed(relations_run):
    first = evaluate_run(relations_run, num_samples=16, sample_steps="3")
    path = relations_run / "eval" / "step_00000002.json"
    mtime = path.stat().st_mtime_ns
    assert evaluate_run(relations_run) == first and path.stat().st_mtime_ns == mtime
    assert evaluate_run(relations_run, metrics=["heldout_loss"]) == first


def test_heldout_loss_is_deterministic(relations_run):
    a = evaluate_run(relations_run, metrics=["heldout_loss"], force=True)
    b = evaluate_run(relations_run, metrics=["heldout_loss"], force=True)
    assert a["metrics"] == b["metrics"]


def test_errors_come_before_any_work(relations_run, tmp_path):
    with pytest.raises(ValueError, match="need a reference batch"):
        evaluate_run(relations_run, metrics=["fid"])
    with pytest.raises(KeyError, match="known metrics components"):
        evaluate_run(relations_run, metrics=["fidd"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="reference batch not found"):
        evaluate_run(relations_run, ref=tmp_path / "nope.npz")


def test_cli_run_mode(relations_run, capsys):
    assert cli.main(["eval", str(relations_run), "--metrics", "heldout_loss", "--force"]) == 0
    out = capsys.readouterr().out
    assert "heldout_mse" in out and "step_00000002.json" in out
    assert json.loads((relations_run / "eval" / "step_00000002.json").read_text())["step"] == 2


def test_in_run_evaluation_equals_evaluating_the_checkpoint_afterwards(tmp_path):
    """train.eval_every writes RUN/eval/step_X.json from the EMA weights in memory; evaluate_run
    on that step's checkpoint (force) recomputes the same numbers, so no checkpoint need be kept."""
    run = tmp_path / "run"
    bindings = [
        "build.model = @models.mdt_xs4", f"train.run_dir = '{run}'", "train.dataset = 'datasets.relations'",
        "datasets.relations.image_size = 16", "datasets.relations.length = 64", "datasets.relations.heldout_size = 16",
        "train.steps = 4", "train.global_batch = 8", "train.progress = False", "train.ckpt_every = 2",
        "train.keep_every = 2", "train.eval_every = 2", "train.eval_samples = 16", "train.eval_sample_steps = '3'",
    ]
    config.parse([], bindings)
    train()
    in_run = read_results(run)
    assert [r["step"] for r in in_run] == [2, 4] and all(r["checkpoint"] is None for r in in_run)
    assert (run / "eval" / "step_00000002.png").is_file()
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in logged if r["kind"] == "eval"] == [2, 4]
    for r in in_run:
        again = evaluate_run(run, checkpoint=run / "checkpoints" / f"ckpt_{r['step']:08d}.pt", num_samples=16,
                             sample_steps="3", force=True)
        assert again["metric_names"] == r["metric_names"] == ["heldout_loss", "relation_acc"]
        assert again["metrics"] == pytest.approx(r["metrics"], rel=1e-6, abs=1e-9)
        assert r["metrics"]["heldout_mse"] > 0


def test_in_run_evaluation_rejects_metrics_that_need_a_reference_batch(tmp_path):
    config.parse([], [
        "build.model = @models.mdt_xs4", f"train.run_dir = '{tmp_path / 'run'}'", "train.dataset = 'datasets.relations'",
        "datasets.relations.image_size = 16", "datasets.relations.length = 64", "train.steps = 2",
        "train.global_batch = 8", "train.progress = False", "train.eval_every = 1", "train.eval_metrics = ['fid']",
    ])
    with pytest.raises(ValueError, match="'fid' is not one: heldout_loss, relation_acc"):
        train()
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
