"""Sweeps without a cluster: the file format, validation, idempotency, status, profiles, the job.

The same code against a real SLURM cluster is in test_slurm.py (skipped when none is up).
"""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from mdtzoo import config
from mdtzoo.launch import cli, slurm, status
from mdtzoo.launch.sweep import load_sweep, make_sweep, slug, validate
from mdtzoo.registry import DATASETS
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training.objective import DiffusionObjective

from test_training import Toy

REPO = Path(__file__).resolve().parents[1]
TINY = [  # fixed bindings of a relations run that trains in seconds (16 px, 4 steps, batch 4)
    "datasets.relations.image_size = 16", "datasets.relations.length = 32", "datasets.relations.heldout_size = 8",
    "train.steps = 3", "train.global_batch = 4", "train.log_every = 1", "train.ckpt_every = 2",
    "train.heldout_every = 0", "train.progress = False",
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the file format ------------------------------------------------------------------------------------
def test_product_and_zip_expand_in_order_with_stable_readable_names(tmp_path):
    sweep = make_sweep({
        "gin": ["models/mdt_xs2.gin"],
        "bindings": ["train.dataset = 'datasets.relations'"],
        "product": {"masking.random.ratio": [0.3, 0.5], "train.lr": [1e-3, 1e30]},
        "zip": [{"build.model": ["@models.mdt_xs2", "@models.dit_xs2"], "train.passes": ["both", "full"]}],
    }, base=REPO / "experiments", name="grid", root=tmp_path / "runs")
    names = [p.name for p in sweep.points]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[:3] == ["ratio=0.3,lr=0.001,model=mdt_xs2,passes=both", "ratio=0.3,lr=0.001,model=dit_xs2,passes=full",
                         "ratio=0.3,lr=1e30,model=mdt_xs2,passes=both"]  # first axis slowest; zip = one axis
    p = sweep.points[1]
    assert p.gin_files == (str(REPO / "experiments" / "models" / "mdt_xs2.gin"),)
    assert p.bindings == ("train.dataset = 'datasets.relations'", "masking.random.ratio = 0.3", "train.lr = 0.001",
                          "build.model = @models.dit_xs2", "train.passes = 'full'",
                          f"train.run_dir = '{tmp_path / 'runs' / names[1]}'")
    assert p.run_dir == str(tmp_path / "runs" / names[1])
    assert all(isinstance(x, str) for q in sweep.points for x in (*q.gin_files, *q.bindings, q.run_dir))
    # Names come from the values only: the same grid in another file gives the same names.
    again = make_sweep({"product": {"masking.random.ratio": [0.3, 0.5], "train.lr": [1e-3, 1e30]},
                        "zip": {"build.model": ["@models.mdt_xs2", "@models.dit_xs2"], "train.passes": ["both", "full"]}},
                       name="grid", root=tmp_path / "runs")
    assert [q.name for q in again.points] == names


def test_labels_templates_files_bindings_and_named_zip_groups(tmp_path):
    sweep = make_sweep({
        "product": {"models.mdt_xs2.decode_layer": [0, 4], "interp.side.num_blocks": [1, 2]},
        "run_name": "last{decode_layer}_side{models.mdt_xs2.decode_layer}x{num_blocks}",
    }, name="t", root=tmp_path)
    assert [p.name for p in sweep.points] == ["last0_side0x1", "last0_side0x2", "last4_side4x1", "last4_side4x2"]
    # Keys ending alike keep enough of their path to differ.
    sweep = make_sweep({"product": {"a.ratio": [1], "b.ratio": [2, 3]}}, name="t", root=tmp_path)
    assert sweep.points[0].name == "a.ratio=1,b.ratio=2"
    # A gin-file axis names points by the file stem; a bindings axis by its keys' last parts.
    sweep = make_sweep({"zip": {"gin": ["models/mdt_xs2.gin", "models/dit_xs2.gin"],
                                "bindings": [["train.grad_clip = None"], ["train.lr = 0.1", "train.seed = 2"]]}},
                       base=REPO / "experiments", name="t", root=tmp_path)
    assert [p.name for p in sweep.points] == ["mdt_xs2,grad_clip=None", "dit_xs2,lr=0.1,seed=2"]
    assert sweep.points[1].bindings[:2] == ("train.lr = 0.1", "train.seed = 2")
    assert sweep.points[1].gin_files[-1].endswith("models/dit_xs2.gin")
    # name = [...] in a zip group stands for the group; an empty bindings list is the baseline.
    sweep = make_sweep({"zip": [{"name": ["baseline", "d_full"], "bindings": [[], ["train.passes = 'full'"]]}]},
                       name="t", root=tmp_path)
    assert [(p.name, p.bindings[:-1]) for p in sweep.points] == [("baseline", ()), ("d_full", ("train.passes = 'full'",))]
    assert make_sweep({}, name="t", root=tmp_path).points[0].name == "run"


def test_slugs_never_contain_a_slash_and_values_render_as_gin():
    assert slug("@models.mdt_xs2") == "mdt_xs2" and slug("@masking.block()") == "block"
    assert slug(1e-30) == "1e-30" and slug(1e30) == "1e30" and slug(0.5) == "0.5" and slug(True) == "True"
    assert slug("/data/imagenet 256/train") == "data_imagenet_256_train"
    assert slug([0.9, 0.999]) == "0.9_0.999" and slug("") == "_"
    sweep = make_sweep({"product": {"train.betas": [[0.9, 0.95]], "train.dataset": ["datasets.relations"],
                                    "train.compile": [False], "datasets.image_folder.root": ["/a/b"]}}, name="t", root="/r")
    p = sweep.points[0]
    assert "/" not in p.name and p.name == "betas=0.9_0.95,dataset=datasets.relations,compile=False,root=a_b"
    assert p.bindings[:4] == ("train.betas = [0.9, 0.95]", "train.dataset = 'datasets.relations'",
                              "train.compile = False", "datasets.image_folder.root = '/a/b'")


@pytest.mark.parametrize("data, message", [
    ({"grid": {"a.b": [1]}}, "unknown key"),
    ({"zip": {"a.b": [1, 2], "c.d": [1]}}, "equal length"),
    ({"product": {"a.b": [1, 1]}}, "twice"),
    ({"product": {"a.b": []}}, "non-empty list"),
    ({"product": {"ratio": [1]}}, "not a gin binding key"),
    ({"product": {"a.b": [1, 2]}, "run_name": "x"}, "both get the run name"),
    ({"product": {"a.b": [1]}, "run_name": "{nope}"}, "varying keys: a.b"),
    ({"gin": ["nowhere/missing.gin"]}, "'nowhere/missing.gin' not found"),
    ({"product": {"gin": ["models/missing.gin"]}}, "not found"),
    ({"eval": {"metric": ["x"]}}, "[eval] takes"),
    ({"name": "a/b"}, "one path component"),
])
def test_bad_sweep_files_are_refused_with_the_reason(data, message, tmp_path):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_sweep(data, base=REPO / "experiments", name=data.pop("name", "t"), root=tmp_path)


def test_toml_errors_name_the_file(tmp_path):
    bad = write(tmp_path / "bad.sweep", "gin = [\n")
    with pytest.raises(config.ConfigError, match="bad.sweep: not valid TOML"):
        load_sweep(bad)


def test_every_sweep_file_in_experiments_parses_and_validates(tmp_path):
    latents = _fake_latents(tmp_path / "latents", count=258)  # one global batch of 256 (the paper's), 2 held out
    extra = [f"datasets.latents.root = '{latents}'", "datasets.latents.heldout_size = 2"]
    files = sorted((REPO / "experiments").rglob("*.sweep"))
    assert {f.parent.name for f in files} >= {"debug", "paper"}
    for f in files:
        sweep = load_sweep(f, tmp_path / "runs" / f.stem, bindings=extra if "paper" in f.parts else ())
        assert sweep.points and validate(sweep.points, sweep.evaluation) == {}, f


def _fake_latents(root: Path, count: int = 4) -> Path:
    """A minimal ``mdtzoo extract`` output: ImageNet-256 latent shape, 1000 classes, zeros."""
    from mdtzoo.data.extract import write_shard
    from mdtzoo.data.latents import FORMAT

    root.mkdir(parents=True)
    meta = {"format": FORMAT, "count": count, "shard_size": count, "num_shards": 1, "latent_shape": [4, 32, 32],
            "dtype": "float16", "scale_factor": 0.18215, "vae": "test", "image_size": 256,
            "class_names": [str(i) for i in range(1000)], "dataset": {"name": "test", "root": None}}
    (root / "meta.json").write_text(json.dumps(meta))
    zeros = np.zeros((count, 2, 4, 32, 32), dtype=np.float16)
    write_shard(root, 0, 0, {"mean": zeros, "std": zeros, "label": np.arange(count, dtype=np.int64)})
    return root


# -- validation -----------------------------------------------------------------------------------------
def test_validation_reports_every_bad_point_at_once_and_submits_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    write(root / "taken" / "config.gin", "train.steps = 1\n")  # a run of another config in the way
    sweep_file = write(tmp_path / "bad.sweep", f"""
gin = ["{REPO}/experiments/demo/base.gin", "{REPO}/experiments/models/mdt_xs2.gin"]
bindings = {json.dumps(TINY)}
[[zip]]
name = ["good", "unknown_model", "no_data", "too_small", "taken", "bad_value"]
bindings = [[], ["build.model = @models.mdt_nope"], ["train.dataset = 'datasets.image_folder'",
  "datasets.image_folder.root = '{tmp_path}/missing'"], ["datasets.relations.image_size = 3"], [],
  ["masking.random.ratio = 1.5"]]
[eval]
metrics = ["heldout_loss", "relation_acc", "no_such_metric"]
""")
    sweep = load_sweep(sweep_file, root)
    problems = validate(sweep.points, sweep.evaluation)
    assert set(problems) == {"[eval]", "unknown_model", "no_data", "too_small", "taken", "bad_value"}
    assert "no_such_metric" in problems["[eval]"]
    assert "mdt_nope" in problems["unknown_model"] and "mdt_xs2" in problems["unknown_model"]  # known names listed
    assert "missing" in problems["no_data"] and "FileNotFoundError" in problems["no_data"]
    assert "different config" in problems["taken"]
    assert all("\n" not in p for p in problems.values())

    code, out, err = run_cli(capsys, "sweep", sweep_file, "--executor", "local", "--root", root)
    assert code == 2
    assert "5 of 6 points are invalid and so is [eval]; nothing was submitted" in err
    assert len([line for line in err.splitlines() if line.startswith("  ")]) == 6  # one line per problem
    assert sorted(p.name for p in root.iterdir()) == ["taken"]  # nothing written


def test_validation_checks_the_trainers_options_for_the_jobs_processes_and_devices(tmp_path, capsys):
    """train.* options a job cannot run are refused before submission, for the resources it asks
    for: the captured step (train.graph_step) on 2 GPUs or on none, or with a varying kept count; bf16
    weights (train.bf16_weights) on 2 GPUs, on none or with the Triton MLP; a
    global batch that does not split over the processes or is larger than the data; an unknown
    compile mode or optimizer; a masked pass for a DiT; an in-run metric that needs a reference."""
    sweep = make_sweep({"gin": ["demo/mdt.gin"], "bindings": TINY + ["train.global_batch = 4"],
                        "zip": [{"name": ["good", "graph", "jitter", "odd", "mode", "optim", "dit", "big", "fid", "bf16",
                                          "bf16mlp"],
                                 "bindings": [
                            [], ["train.graph_step = True"],
                            ["train.graph_step = True", "models.mdt_xs4.masking = @masking.random_jitter()"],
                            ["train.global_batch = 3"], ["train.compile = 'fast'"], ["train.optimizer = 'sgd'"],
                            ["build.model = @models.dit_xs2", "train.passes = 'both'"], ["train.global_batch = 64"],
                            ["train.eval_every = 2", "train.eval_metrics = ('fid',)"], ["train.bf16_weights = True"],
                            ["train.bf16_weights = True", "models.mdt_xs4.mlp_impl = 'triton'"]]}]},
                       base=REPO / "experiments", name="t", root=tmp_path / "runs")
    one_gpu = validate(sweep.points, world=1, gpus=True)
    assert set(one_gpu) == {"jitter", "mode", "optim", "dit", "big", "fid", "bf16mlp"}, one_gpu  # 3 splits over one
    assert "RandomJitterMasking" in one_gpu["jitter"] and "keeps a different number of tokens" in one_gpu["jitter"]
    assert "torch.compile mode" in one_gpu["mode"] and "'fast'" in one_gpu["mode"]
    assert "unknown optimizer 'sgd'; valid: adamw, adan" in one_gpu["optim"]
    assert "passes='both' needs a masked pass, but this model has no side-interpolator" in one_gpu["dit"]
    assert "the dataset has 32 items, fewer than one global batch of 64" in one_gpu["big"]
    assert "train.eval_metrics takes run metrics (no reference batch); 'fid' is not one" in one_gpu["fid"]
    assert "bf16_weights: they cannot use mlp_impl 'triton'" in one_gpu["bf16mlp"]
    two_gpus = validate(sweep.points, world=2, gpus=True)
    assert "graph_step: it runs on one process, and this run has 2" in two_gpus["graph"]
    assert "global batch 3 must split evenly over 2 processes" in two_gpus["odd"]
    assert "bf16_weights: they run on one process (DDP would all-reduce bfloat16 gradients), and this run has 2" in (
        two_gpus["bf16"])
    no_gpu = validate(sweep.points, world=1, gpus=False)
    assert "graph_step: it needs CUDA, and the device is cpu" in no_gpu["graph"]
    assert "bf16_weights: they need bf16 autocast, and the precision is 'fp32'" in no_gpu["bf16"]
    # the command asks for the resources' processes: 2 GPUs per node refuse the graph step, nothing submitted
    code, _, err = run_cli(capsys, "sweep", write(tmp_path / "g.sweep", f"""
gin = ["{REPO}/experiments/demo/mdt.gin"]
bindings = {json.dumps(TINY + ["train.graph_step = True"])}
"""), "--executor", "local", "--root", tmp_path / "r2", "--gpus-per-node", "2")
    assert code == 2 and "it runs on one process, and this run has 2" in err
    assert not (tmp_path / "r2").exists()


def test_validation_refuses_a_vae_for_data_that_already_holds_latents(tmp_path):
    latents = _fake_latents(tmp_path / "latents", count=8)
    sweep = make_sweep({"gin": ["demo/mdt.gin"], "bindings": [
        "train.dataset = 'datasets.latents'", f"datasets.latents.root = '{latents}'", "datasets.latents.heldout_size = 2",
        "train.global_batch = 4"], "zip": [{"name": ["plain", "vae"], "bindings": [[], ["train.vae = 'ema'"]]}]},
        base=REPO / "experiments", name="t", root=tmp_path / "runs")
    problems = validate(sweep.points)
    assert set(problems) == {"vae"}, problems
    assert "train.vae is set but 'datasets.latents' already holds latents; remove train.vae" in problems["vae"]


def test_validation_names_vae_weights_that_are_not_on_this_machine(tmp_path, monkeypatch):
    """train.vae (images encoded on the fly) and [eval] vae (samples decoded) are looked up in the
    HF cache or the directory given, from the file tree alone, before anything is submitted."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # (read from the environment at import)
    sweep = make_sweep({"gin": ["demo/mdt.gin"], "bindings": TINY, "zip": [{"name": ["plain", "ema", "dir"], "bindings": [
        [], ["train.vae = 'ema'"], [f"train.vae = '{tmp_path / 'no_vae'}'"]]}], "eval": {"vae": "mse"}},
        base=REPO / "experiments", name="t", root=tmp_path / "runs")
    problems = validate(sweep.points, sweep.evaluation)
    assert set(problems) == {"ema", "dir", "[eval]"}, problems
    assert "VAEWeightsNotFoundError: VAE weights for 'stabilityai/sd-vae-ft-ema' are not available offline" in problems["ema"]
    assert str(tmp_path / "hf" / "models--stabilityai--sd-vae-ft-ema") in problems["ema"]
    assert f"no VAE in {tmp_path / 'no_vae'}" in problems["dir"]
    assert "'stabilityai/sd-vae-ft-mse' are not available offline" in problems["[eval]"]


def test_a_run_dir_inside_another_run_is_refused(tmp_path):
    write(tmp_path / "outer" / "config.gin", "x\n")
    sweep = make_sweep({"gin": ["demo/mdt.gin"], "bindings": TINY}, base=REPO / "experiments", name="t",
                       root=tmp_path / "outer" / "sweep")
    assert "inside another run" in validate(sweep.points)["run"]


# -- idempotency and status -----------------------------------------------------------------------------
def _fake_run(path: Path, *, done=None, evaluated=None, failed=None, preempted_at=None, job=None, steps=10):
    write(path / "config.gin", f"train.steps = {steps}\n")
    records = [{"kind": "train", "step": s} for s in range(1, (done or preempted_at or 0) + 1)]
    if preempted_at:
        records.append({"kind": "preempted", "step": preempted_at})
        write(path / "checkpoints" / f"ckpt_{preempted_at:08d}.pt", "")
    write(path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if done:
        write(path / "DONE", f"step {done}\n")
    if evaluated:
        write(path / "eval" / f"step_{evaluated:08d}.json", json.dumps(
            {"step": evaluated, "metrics": {"heldout_mse": 0.123456, "relation_acc": 0.5, "relation_acc_face": 1.0}}))
    if failed:
        write(path / "FAILED", failed)
    if job:
        write(path / ".job", json.dumps({"executor": "slurm", "job_id": job, "user": "root", "stderr": ""}))


def test_point_states_from_run_dirs_and_the_scheduler(tmp_path):
    _fake_run(tmp_path / "done", done=10, evaluated=10)
    _fake_run(tmp_path / "trained", done=10)
    _fake_run(tmp_path / "failed", failed="NonFiniteLossError: loss is nan at step 3\n\ntraceback...\nline")
    _fake_run(tmp_path / "preempted", preempted_at=4)
    _fake_run(tmp_path / "running", preempted_at=4, job="7_1")
    _fake_run(tmp_path / "requeued", preempted_at=4, job="7_2")
    _fake_run(tmp_path / "cancelled", job="7_3")
    (tmp_path / "fresh").mkdir()
    states = {"7_1": ("RUNNING", "None"), "7_2": ("PENDING", "BeginTime"), "7_3": ("CANCELLED", "0:0")}
    got = {d.name: status.point_status(d.name, str(d), slurm.read_job(d), states) for d in sorted(tmp_path.iterdir())}
    assert {k: v.state for k, v in got.items()} == {
        "done": "done", "trained": "trained", "failed": "failed", "preempted": "preempted", "running": "running",
        "requeued": "pending", "cancelled": "failed", "fresh": "not started"}
    assert [k for k, v in got.items() if v.complete] == ["done"]  # what a sweep skips ...
    assert sorted(k for k, v in got.items() if v.active) == ["requeued", "running"]  # ... and does not duplicate
    assert (got["done"].step, got["done"].total) == (10, 10) and (got["running"].step, got["running"].total) == (4, 10)
    assert got["failed"].message.startswith("NonFiniteLossError: loss is nan at step 3")
    assert "requeued (BeginTime)" in got["requeued"].message and "CANCELLED" in got["cancelled"].message
    # Without a scheduler a recorded SLURM job is 'submitted': neither resubmitted nor called finished.
    assert status.point_status("r", str(tmp_path / "running"), slurm.read_job(tmp_path / "running"), None).state == "submitted"
    # Evaluation not asked for: DONE is enough.
    assert status.point_status("t", str(tmp_path / "trained"), None, {}, evaluate=False).state == "done"

    table = status.render(list(got.values()))
    lines = table.splitlines()
    assert lines[0].split() == ["point", "state", "step", "job", "eval"]
    assert lines[2].split() == ["done", "done", "10/10", "-", "heldout_mse=0.1235", "relation_acc=0.5"]  # no per-class
    assert "failed: NonFiniteLossError: loss is nan at step 3 | traceback... | line" in table
    assert "2 failed, 1 done, 1 not started, 1 preempted, 1 pending, 1 running, 1 trained" in table


def test_scheduler_states_parse_squeue_then_sacct(monkeypatch):
    calls = []

    def fake_run(cmd):
        calls.append(cmd[0])
        if cmd[0] == "squeue":
            return "12_0|RUNNING|None\n12_1|PENDING|BeginTime\n99|RUNNING|None\n"
        return "12_2|CANCELLED by 0|0:0\n12_3|COMPLETED|0:0\n"

    monkeypatch.setattr(status, "_run", fake_run)
    monkeypatch.setattr(status.shutil, "which", lambda name: f"/usr/bin/{name}")
    jobs = [{"executor": "slurm", "job_id": f"12_{i}", "user": "root"} for i in range(4)]
    states = status.scheduler_states(jobs)
    assert states["12_0"] == ("RUNNING", "None") and states["12_1"] == ("PENDING", "BeginTime")
    assert states["12_2"][0] == "CANCELLED" and states["12_3"][0] == "COMPLETED" and calls == ["squeue", "sacct"]
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    assert status.scheduler_states(jobs) is None  # no SLURM here: the caller degrades


def test_dry_run_skips_finished_and_queued_points_and_status_reads_the_root(tmp_path, capsys, monkeypatch):
    sweep_file = write(tmp_path / "s.sweep", f"""
gin = ["{REPO}/experiments/demo/mdt.gin"]
bindings = {json.dumps(TINY)}
[product]
"masking.random.ratio" = [0.2, 0.3, 0.4]
[eval]
metrics = ["heldout_loss"]
""")
    root = tmp_path / "runs"
    sweep = load_sweep(sweep_file, root)
    config.parse(sweep.points[0].gin_files, sweep.points[0].bindings)  # a finished run of exactly this config
    write(root / "ratio=0.2" / "config.gin", config.config_str())
    _fake_run(root / "ratio=0.2", done=3, evaluated=3, steps=3)
    write(root / "ratio=0.2" / "config.gin", config.config_str())
    write(root / "ratio=0.3" / ".job", json.dumps({"executor": "slurm", "job_id": "5_1", "user": "root"}))
    monkeypatch.setattr(status, "scheduler_states", lambda jobs: {"5_1": ("RUNNING", "None")})
    code, out, _ = run_cli(capsys, "sweep", sweep_file, "--executor", "slurm", "--root", root, "--dry-run",
                           "--profile", "local_ci", "--time", "5")
    assert code == 0
    assert "skip ratio=0.2: done" in out and "skip ratio=0.3: running (job 5_1)" in out
    assert "1 to run, 1 done, 1 queued or running" in out and "  ratio=0.4: mdt.gin" in out
    assert "tasks_per_node=1" in out and "gpus_per_node=1" in out and "timeout_min=5" in out
    assert not (root / "ratio=0.4").exists() and not list(root.glob("sweep_*.json"))  # dry run: nothing written

    status.write_manifest(root, sweep)
    code, out, _ = run_cli(capsys, "status", root)
    assert code == 0 and "ratio=0.2  done" in out and "ratio=0.3  running" in out and "ratio=0.4  not started" in out


# -- profiles and resources ------------------------------------------------------------------------------
def test_profiles_load_and_flags_override_them():
    a100 = slurm.load_profile("a100")
    assert a100["partition"] == "a100" and a100["gpus_per_node"] == 8 and a100["constraint"] == "a100"
    assert slurm.load_profile("h100")["constraint"] == "h100"
    res = slurm.resources(a100, {"partition": "preempt", "time": "4:00:00", "gpus_per_node": None, "account": "lab"})
    assert res["partition"] == "preempt" and res["gpus_per_node"] == 8 and res["account"] == "lab"
    params = slurm.executor_parameters("slurm", res, "mdtzoo-x")
    assert params["tasks_per_node"] == params["gpus_per_node"] == 8  # one DDP process per GPU
    assert params["timeout_min"] == 240 and params["slurm_partition"] == "preempt" and params["slurm_mem"] == "0"
    assert params["slurm_signal_delay_s"] == 180 and "slurm_qos" not in params  # empty settings are not sent
    ci = slurm.resources(slurm.load_profile("local_ci"), {})
    assert slurm.executor_parameters("slurm", ci, "x")["slurm_partition"] == "debug"
    local = slurm.executor_parameters("local", slurm.resources({}, {}), "x")
    assert local["tasks_per_node"] == 1 and "gpus_per_node" not in local and "slurm_partition" not in local
    assert slurm.load_profile(str(REPO / "slurm" / "a100.toml")) == a100


@pytest.mark.parametrize("text, minutes", [("90", 90), ("4:00:00", 240), ("2-12:00:00", 3600), ("1-2", 1560),
                                           ("30:30", 31), ("0:0:1", 1)])
def test_slurm_time_formats(text, minutes):
    assert slurm.minutes(text) == minutes


def test_bad_profiles_and_flags_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="known profiles: a100, h100, local_ci"):
        slurm.load_profile("nope")
    with pytest.raises(config.ConfigError, match="unknown setting 'gpus'"):
        slurm.load_profile(str(write(tmp_path / "p.toml", "gpus = 2\n")))
    with pytest.raises(config.ConfigError, match="gpus_per_node must be int"):
        slurm.load_profile(str(write(tmp_path / "q.toml", "gpus_per_node = '2'\n")))
    with pytest.raises(config.ConfigError, match="not a SLURM time"):
        slurm.resources({}, {"time": "two hours"})
    with pytest.raises(config.ConfigError, match="mem must look like"):
        slurm.resources({}, {"mem": "lots"})
    with pytest.raises(config.ConfigError, match="nodes must be 1"):
        slurm.executor_parameters("local", slurm.resources({}, {"nodes": 2}), "x")


# -- the job, in this process -------------------------------------------------------------------------------
@pytest.fixture
def toy():
    with DATASETS.temporary("toy", Toy):
        yield


def _toy_job(tmp_path, name, evaluation=None, **train):
    gin_file = write(tmp_path / "toy.gin", "include 'models/mdt_xs2.gin'\ntrain.dataset = 'datasets.toy'\n")
    settings = {"steps": 6, "global_batch": 8, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 100, "log_every": 1,
                "progress": False, **train}
    run_dir = str(tmp_path / name)
    bindings = [f"train.{k} = {v!r}" for k, v in settings.items()] + [f"train.run_dir = {run_dir!r}"]
    return slurm.SweepJob([str(gin_file)], bindings, run_dir, evaluation)


class _FakeSubmitit(slurm.SignalHandler):
    """Stands in for submitit's handler: records the requeue instead of calling scontrol."""

    def __init__(self):  # noqa: D107  (no job environment needed)
        self.requeued = []

    def checkpoint_and_try_requeue(self, signum, frame=None):
        self.requeued.append(self.job.checkpoint())


def test_preemption_checkpoints_requeues_the_same_strings_and_resumes_exactly(toy, tmp_path, monkeypatch):
    reference = _toy_job(tmp_path, "reference")
    assert reference() == {"status": "done", "step": 6, "run_dir": reference.run_dir}

    job = _toy_job(tmp_path, "preempted")
    fake = _FakeSubmitit()
    fake.job = job
    usr2 = slurm.JobEnvironment._usr_sig()
    original_handler = signal.signal(usr2, fake.checkpoint_and_try_requeue)
    forward = DiffusionObjective.forward

    def preempt_during_step_3(self, x0, y, step, *args, **kwargs):
        if step == 2:
            os.kill(os.getpid(), usr2)  # what SLURM sends signal_delay_s before the end
        return forward(self, x0, y, step, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "forward", preempt_during_step_3)
    try:
        result = job()
    finally:
        signal.signal(usr2, original_handler)
        monkeypatch.setattr(DiffusionObjective, "forward", forward)
    assert result["status"] == "preempted" and result["step"] == 3
    run = Path(job.run_dir)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000003.pt"] and not (run / "DONE").exists()
    (delayed,) = fake.requeued  # submitit requeues what checkpoint() returns: the same strings
    again = delayed.function
    assert isinstance(again, slurm.SweepJob) and again is not job
    assert (again.gin_files, again.bindings, again.run_dir) == (job.gin_files, job.bindings, job.run_dir)
    assert delayed.args == () and delayed.kwargs == {}

    assert again()["status"] == "done"  # the requeued job resumes from step 3
    final = ckpt.load(run / "checkpoints" / "ckpt_00000006.pt")
    ref = ckpt.load(Path(reference.run_dir) / "checkpoints" / "ckpt_00000006.pt")
    for part in ("model", "ema"):
        for k in ref[part]:
            assert torch.equal(final[part][k], ref[part][k]), (part, k)
    kinds = [json.loads(line)["kind"] for line in open(run / "metrics.jsonl")]
    assert kinds.count("preempted") == 1 and kinds[-1] == "train"


def test_a_job_that_raises_records_its_error_in_the_run_dir(toy, tmp_path):
    class Unreadable(Toy):  # an error met mid-run, after the run dir exists (a config error is refused earlier)
        def __getitem__(self, i):
            raise OSError(f"item {i} is unreadable")

    job = _toy_job(tmp_path, "bad", dataset="datasets.unreadable")
    with DATASETS.temporary("unreadable", Unreadable), pytest.raises(OSError, match="is unreadable"):
        job()
    failed = (Path(job.run_dir) / "FAILED").read_text()
    assert failed.startswith("OSError: item ") and "is unreadable" in failed and "File \"" in failed  # + the frames
    st = status.point_status("bad", job.run_dir, None, {})
    assert st.state == "failed" and "is unreadable" in st.message


def test_a_finished_run_is_only_evaluated_again(toy, tmp_path, monkeypatch):
    job = _toy_job(tmp_path, "r", evaluation={"metrics": ["heldout_loss"]}, steps=2)
    first = job()
    assert first["status"] == "done" and set(first["eval"]) == {"heldout_mse", "heldout_vb"}
    (Path(job.run_dir) / "eval" / "step_00000002.json").unlink()
    import mdtzoo.training

    monkeypatch.setattr(mdtzoo.training, "train", lambda: pytest.fail("a finished run was trained again"))
    assert job()["eval"] == first["eval"]  # DONE: no training, the evaluation is redone identically


# -- a local sweep, end to end (subprocesses through submitit's LocalExecutor) -------------------------------
def test_local_sweep_runs_every_point_then_skips_them(tmp_path, capsys):
    sweep_file = write(tmp_path / "two.sweep", f"""
gin = ["{REPO}/experiments/demo/base.gin"]
bindings = {json.dumps(TINY)}
[[zip]]
gin = ["{REPO}/experiments/models/mdt_xs2.gin", "{REPO}/experiments/models/dit_xs2.gin"]
[eval]
metrics = ["heldout_loss", "relation_acc"]
num_samples = 8
sample_steps = 2
""")
    root = tmp_path / "runs"
    code, out, err = run_cli(capsys, "sweep", sweep_file, "--executor", "local", "--root", root,
                             "--array-parallelism", "2", "--time", "10")
    assert code == 0, out + err
    for name in ("mdt_xs2", "dit_xs2"):
        run = root / name
        assert (run / "DONE").read_text() == "step 3\n"
        result = json.loads((run / "eval" / "step_00000003.json").read_text())
        assert result["settings"]["num_samples"] == 8 and 0.0 <= result["metrics"]["relation_acc"] <= 1.0
        assert result["metrics"]["heldout_mse"] > 0
        assert json.loads((run / ".job").read_text())["executor"] == "local"
    assert "mdt_xs2  done   3/3" in out and "2 done" in out
    code, out, _ = run_cli(capsys, "sweep", sweep_file, "--executor", "local", "--root", root)
    assert code == 0 and "0 to run, 2 done" in out  # nothing runs twice
