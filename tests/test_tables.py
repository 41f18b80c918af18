"""mdtzoo.tables: run dirs -> long DataFrame -> paper tables (numbers of SPEC section 5), files, curves, CLI.

Fake run directories hold the *real* resolved config of a paper gin file (config.gin) and the
real operative config of building its model, plus hand-written metrics.jsonl and eval JSONs.
"""

import inspect
import json
import time
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import pytest
import torch

from mdtzoo import config
from mdtzoo.launch import cli
from mdtzoo.tables import TABLES, collect, make_table, plot_curves, run_status, write_table
from mdtzoo.tables import ginparse
from mdtzoo.tables.curves import gpu_hours
from mdtzoo.tables.ginparse import config_columns, parse_gin_text
from mdtzoo.tables.render import latex_escape, markdown_table

EXP = Path(__file__).resolve().parent.parent / "experiments"
ADM = ("fid", "sfid", "is", "precision", "recall")

# SPEC section 5, written out independently of papers.py: a wrong number there fails here.
SPEC_T1 = {("DiT-S/2", "400"): 68.40, ("MDT-S/2", "300"): 57.01, ("MDT-S/2", "400"): 53.46,
           ("MDT-S/2", "2000"): 44.14, ("MDT-S/2", "3500"): 41.37, ("DiT-B/2", "400"): 43.47,
           ("MDT-B/2", "400"): 34.33, ("MDT-B/2", "3500"): 20.45, ("DiT-XL/2", "400"): 19.47,
           ("DiT-XL/2", "2352"): 10.67, ("DiT-XL/2", "7000"): 9.62, ("MDT-XL/2", "400"): 16.42,
           ("MDT-XL/2", "1300"): 9.60, ("MDT-XL/2", "3500"): 6.65}
SPEC_T2 = {("MDT-XL/2", "2500"): (7.41, 4.95, 121.22, 0.72, 0.64), ("MDT-XL/2", "3500"): (6.46, 4.92, 131.70, 0.72, 0.63),
           ("MDT-XL/2", "6500"): (6.23, 5.23, 143.02, 0.71, 0.65), ("MDT-XL/2-G", "2500"): (2.15, 4.52, 249.27, 0.82, 0.58),
           ("MDT-XL/2-G", "3500"): (2.02, 4.46, 263.77, 0.82, 0.60), ("MDT-XL/2-G", "6500"): (1.79, 4.57, 283.01, 0.81, 0.61),
           ("DiT-XL/2-G", "7000"): (2.27, 4.60, 278.24, 0.83, 0.57)}
SPEC_T3 = dict(zip(["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"],
                   [51.60, 51.44, 50.26, 50.88, 51.57, 53.20, 52.90, 53.73]))
SPEC_T4 = dict(zip(["Last0", "Last1", "Last2", "Last4", "Last6"], [51.05, 50.96, 50.26, 51.67, 52.64]))
SPEC_T5 = {"a_asymmetric": 50.26, "a_symmetric": 51.56, "b_side_interp": 50.26, "b_no_interp": 51.60,
           "c_shortcut": 50.26, "c_no_shortcut": 50.91, "d_full_masked": 50.26, "d_full": 52.30, "d_masked": 76.63,
           "e_loss_all": 50.26, "e_loss_removed": 58.35, "f_side_blocks1": 50.26, "f_side_blocks2": 51.77,
           "f_side_blocks3": 51.96, "g_interp_pos": 50.26, "g_no_interp_pos": 51.58, "h_learnable_pos": 50.26,
           "h_fixed_pos": 50.80, "i_relbias": 50.26, "i_no_relbias": 53.56}

_CONFIGS: dict = {}


def resolved(gin_file: str, bindings=()) -> tuple[str, str]:
    """(config.gin, operative_config.gin) text as a real run of this file would write them."""
    key = (gin_file, tuple(bindings))
    if key not in _CONFIGS:
        text = config.parse([EXP / gin_file], list(bindings))
        # train() is not called here; add what its operative section would say about the run.
        train = {"passes": "auto", "masked_loss_on": "all", "seed": 0}
        for key in train:
            try:
                train[key] = gin.query_parameter(f"train.{key}")
            except ValueError:
                pass
        with torch.device("meta"):
            config.call_root(config.build)
        operative = config.config_str(operative=True)
        operative += "".join(f"train.{k} = {v!r}\n" for k, v in train.items())
        _CONFIGS[key] = (text, operative)
        gin.clear_config()
    return _CONFIGS[key]


def make_run(root: Path, name: str, gin_file: str, bindings=(), evals=(), heldout=(), status="done",
             img_per_sec=1000.0, log_every=100) -> Path:
    """A fake run dir. evals: (step, metrics, settings) triples; heldout: (step, heldout_mse) pairs."""
    run = root / name
    run.mkdir(parents=True)
    text, operative = resolved(gin_file, bindings)
    (run / "config.gin").write_text(text)
    (run / "operative_config.gin").write_text(operative)
    last = max([s for s, *_ in evals] + [s for s, _ in heldout] + [0])
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s, "img_per_sec": img_per_sec, "time": 1e9 + s}
             for s in range(log_every, last + 1, log_every)]
    lines += [{"kind": "heldout", "step": s, "heldout_mse": v, "heldout_vb": v / 10, "time": 1e9 + s} for s, v in heldout]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(lines, key=lambda r: r["step"])))
    for i, (step, metrics, settings) in enumerate(evals):
        suffix = "_cfg" if settings.get("guidance", "none") != "none" else ""
        path = run / "eval" / f"step_{step:08d}{suffix}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"step": step, "checkpoint": f"ckpt_{step:08d}.pt", "metrics": metrics,
                                    "settings": {"num_samples": 50000, "sample_steps": "250", **settings}}))
    if status == "done":
        (run / "DONE").write_text(f"step {last}\n")
    elif status == "failed":
        (run / "FAILED").write_text("loss is nan at step 7\n")
    return run


def adm(fid, sfid=10.0, is_=27.0, p=0.45, r=0.60, key="is"):
    return {"fid": fid, "sfid": sfid, key: is_, "precision": p, "recall": r}


@pytest.fixture
def table3_runs(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "baseline/seed0", "paper/table3/mask_ratio_0.3.gin", ["train.seed = 0"],
             evals=[(600_000, adm(50.0, key="inception_score"), {})], heldout=[(300_000, 0.2), (600_000, 0.1)])
    make_run(root, "baseline/seed1", "paper/table3/mask_ratio_0.3.gin", ["train.seed = 1"],
             evals=[(600_000, adm(51.0), {})], heldout=[(600_000, 0.3)])
    make_run(root, "table3/mask_ratio_0.5", "paper/table3/mask_ratio_0.5.gin", evals=[(600_000, adm(52.5), {})])
    make_run(root, "table3/mask_ratio_0.8", "paper/table3/mask_ratio_0.8.gin", heldout=[(10_000, 0.5)], status="failed")
    make_run(root, "table4/last4", "paper/table4/last4.gin", evals=[(600_000, adm(55.0), {})])
    return root


# ------------------------------------------------------------------------------ parsing and collect
def test_parse_gin_text_handles_gins_printout():
    text = """# Macros:
# ======
LATENTS = \\
    ('REQUIRED-'
     'set')
ROOT = %LATENTS

# Parameters for datasets.relations:
datasets.relations.classes = \\
    ('face',
     'count_2')
datasets.latents.root = %ROOT
build.model = @models.mdt_s2
models.mdt_s2.interp = @interp.none
models.mdt_s2.masking = @masking.block()
masking.block.ratio = 0.5
train.grad_clip = None
train.betas = [0.9, 0.99]
"""
    b = parse_gin_text(text)
    assert b["datasets.relations.classes"] == ("face", "count_2")
    assert b["datasets.latents.root"] == "REQUIRED-set"
    assert b["build.model"] == "@models.mdt_s2" and b["masking.block.ratio"] == 0.5
    assert b["train.grad_clip"] is None and b["train.betas"] == (0.9, 0.99)
    assert "LATENTS" not in b
    cols = config_columns(b)
    assert (cols["model"], cols["family"], cols["size"], cols["patch"]) == ("mdt_s2", "mdt", "s", 2)
    assert cols["interp"] == "none" and cols["masking"] == "block" and cols["decode_layer"] == 2
    assert cols["train.passes"] == "both"  # 'auto' with an interpolator
    assert config_columns({"build.model": "@models.dit_xl2"})["train.passes"] == "full"
    assert config_columns({"build.model": "@models.mdtv2_s2"})["decode_layer"] == 6
    assert config_columns({"build.model": "@models.mdt_xs2"}, {"mdt_xs2": "mdt_s2"})["model"] == "mdt_s2"


def test_mirrored_defaults_agree_with_the_code():
    from mdtzoo.interp import side as side_mod
    from mdtzoo.masking.random import RandomMasking
    from mdtzoo.models import presets
    from mdtzoo.models.transformer import DiffusionTransformer
    from mdtzoo.training.loop import train

    assert ginparse.FAMILY_DEFAULTS == {f: {k: v for k, v in d.items()} for f, d in presets.FAMILIES.items()}
    assert ginparse.V2_DECODE_LAYER == presets.V2_DECODE_LAYER
    sig = inspect.signature(DiffusionTransformer.__init__).parameters
    assert all(sig[k].default == v for k, v in ginparse.TRANSFORMER_DEFAULTS.items())
    assert set(ginparse.MODEL_OPTIONS) <= set(sig)
    for fn, name in ((side_mod.side, "interp.side"), (side_mod.none, "interp.none"), (RandomMasking, "masking.random")):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in ginparse.COMPONENT_DEFAULTS[name]} == ginparse.COMPONENT_DEFAULTS[name]
    params = inspect.signature(train).parameters
    assert all(params[k.split(".")[1]].default == v for k, v in ginparse.TRAIN_DEFAULTS.items())


def test_collect_reads_configs_metrics_and_status(table3_runs):
    df = collect([table3_runs])
    assert set(df["run"]) == {"baseline/seed0", "baseline/seed1", "table3/mask_ratio_0.5", "table3/mask_ratio_0.8",
                              "table4/last4"}
    s0 = df[df["run"] == "baseline/seed0"].set_index("step")
    assert list(s0.index) == [300_000, 600_000]  # one row per evaluated step: heldout-only 300k, eval 600k
    assert s0.loc[600_000, "fid"] == 50.0 and s0.loc[600_000, "is"] == 27.0  # inception_score -> is
    assert s0.loc[600_000, "heldout_mse"] == 0.1 and s0.loc[300_000, "heldout_mse"] == 0.2
    assert np.isnan(s0.loc[300_000, "fid"])
    assert s0.loc[600_000, "eval.num_samples"] == 50000 and not s0.loc[600_000, "guided"]
    first = df.drop_duplicates("run").set_index("run")
    assert first.loc["table3/mask_ratio_0.5", "masking.random.ratio"] == 0.5
    assert first.loc["baseline/seed1", "train.seed"] == 1
    assert first.loc["table4/last4", "decode_layer"] == 4 and first.loc["baseline/seed0", "decode_layer"] == 2
    assert (first["model"] == "mdt_s2").all() and (first["train.passes"] == "both").all()
    assert (first["dataset"] == "latents").all() and (first["train.steps"] == 600_000).all()
    assert first.loc["table3/mask_ratio_0.8", "status"] == "failed"
    assert first.loc["baseline/seed0", "status"] == "done"


def test_run_status(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.gin").write_text("train.steps = 10\n")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 5}) + "\n")
    assert run_status(run) == "running"
    assert run_status(run, now=time.time() + 7200) == "partial"  # the log stopped growing an hour ago
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "preempted", "step": 5}) + "\n{truncated")
    with pytest.warns(UserWarning, match="not JSON"):
        assert run_status(run) == "partial"
    (run / "FAILED").write_text("x")
    assert run_status(run) == "failed"
    (run / "DONE").write_text("step 10")
    assert run_status(run) == "done"


# ------------------------------------------------------------------------------ paper tables
@pytest.mark.parametrize("name,spec_values", [("table1", SPEC_T1), ("table3", SPEC_T3), ("table4", SPEC_T4)])
def test_paper_fid_numbers_are_the_specs(name, spec_values):
    table = make_table(TABLES[name], pd.DataFrame())  # no runs: the paper's column, ours all missing
    fids = table.frame["FID paper"]
    assert {k: round(v, 2) for k, v in fids.items()} == spec_values
    assert table.frame["FID ours"].isna().all() and (table.frame["runs"] == "0/0").all()


def test_table2_and_table5_numbers_are_the_specs():
    t2 = TABLES["table2"]
    for key, values in SPEC_T2.items():
        row = next(r for r in t2.rows if r.label == key)
        assert tuple(row.paper[m] for m in ADM) == values
        assert row.guided == key[0].endswith("-G")
    assert {r.name: r.paper["fid"] for r in TABLES["table5"].rows} == SPEC_T5


def test_table3_pivot_means_seeds_and_shows_missing(table3_runs):
    table = make_table(TABLES["table3"], collect([table3_runs]))
    f = table.frame
    assert list(f.index) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"]
    assert list(f.columns[:3]) == ["FID paper", "FID ours", "FID diff"]
    assert [c.split()[0] for c in f.columns if c.endswith(" paper")] == ["FID", "sFID", "IS", "Prec.", "Rec."]
    assert f.loc["0.3", "FID ours"] == pytest.approx(50.5)  # mean of seeds 50.0 and 51.0
    assert f.loc["0.3", "FID std"] == pytest.approx(np.std([50.0, 51.0], ddof=1))
    assert f.loc["0.3", "FID diff"] == pytest.approx(50.5 - 50.26)
    assert f.loc["0.5", "FID diff"] == pytest.approx(52.5 - 51.57)
    assert f.loc["0.5", "sFID paper"] == 9.92 and f.loc["0.5", "IS ours"] == 27.0
    assert f.loc["0.3", "runs"] == "2/2" and f.loc["0.8", "runs"] == "0/1" and f.loc["0.1", "runs"] == "0/0"
    assert np.isnan(f.loc["0.8", "FID ours"]) and np.isnan(f.loc["0.1", "FID diff"])
    notes = "\n".join(table.notes)
    assert "table3/mask_ratio_0.8 (failed) matches '0.8' but has no evaluation at step 600,000" in notes
    assert "Unmatched: table4/last4" in notes and "decode_layer=4 (row: 2)" in notes
    assert "diff = ours - paper" in table.caption


def test_table4_and_table5_match_rows_by_config(table3_runs, tmp_path):
    root = tmp_path / "more"
    make_run(root, "a_symmetric", "paper/table5/a_symmetric.gin", evals=[(600_000, {"fid": 52.0}, {})])
    make_run(root, "d_masked", "paper/table5/d_masked.gin", evals=[(600_000, {"fid": 70.0}, {})])
    make_run(root, "b_no_interp", "paper/table5/b_no_interp.gin", evals=[(600_000, {"fid": 53.0}, {})])
    make_run(root, "running", "paper/table5/i_no_relbias.gin", evals=[(300_000, {"fid": 60.0}, {})], status="running")
    df = collect([table3_runs, root])
    t5 = make_table(TABLES["table5"], df).frame
    baseline = [r.label for r in TABLES["table5"].rows if r.paper["fid"] == 50.26]
    assert len(baseline) == 9 and all(t5.loc[label, "FID ours"] == pytest.approx(50.5) for label in baseline)
    assert t5.loc[("(a) asymmetric structure", "×"), "FID ours"] == 52.0
    assert t5.loc[("(d) latent type", "Masked"), "FID diff"] == pytest.approx(70.0 - 76.63)
    assert t5.loc[("(b) side-interpolator", "×"), "FID ours"] == 53.0
    assert np.isnan(t5.loc[("(i) relative pos. bias", "×"), "FID ours"])
    assert t5.loc[("(i) relative pos. bias", "×"), "runs"] == "0/1"
    t4 = make_table(TABLES["table4"], df).frame
    assert t4.loc["Last4", "FID ours"] == 55.0 and t4.loc["Last2", "FID ours"] == pytest.approx(50.5)
    # an explicit step reaches the running run's intermediate evaluation
    t5_300k = make_table(TABLES["table5"], df, metric="fid", step=300_000).frame
    assert t5_300k.loc[("(i) relative pos. bias", "×"), "FID ours"] == 60.0


def test_table1_and_table2_read_steps_and_guidance(tmp_path):
    root = tmp_path / "t1"
    make_run(root, "mdt_xl2", "paper/table1/mdt_xl2.gin", status="running",
             evals=[(400_000, adm(17.0), {}), (2_500_000, adm(7.0), {}),
                    (2_500_000, adm(2.0, is_=250.0), {"guidance": "power_cosine", "cfg_scale": 3.8})])
    make_run(root, "dit_s2", "paper/table1/dit_s2.gin", evals=[(400_000, {"fid": 70.0}, {})])
    df = collect([root])
    t1 = make_table(TABLES["table1"], df).frame
    assert t1.loc[("MDT-XL/2", "400"), "FID ours"] == 17.0
    assert t1.loc[("DiT-S/2", "400"), "FID diff"] == pytest.approx(70.0 - 68.40)
    assert np.isnan(t1.loc[("MDT-XL/2", "1300"), "FID ours"]) and t1.loc[("MDT-XL/2", "1300"), "runs"] == "0/1"
    assert np.isnan(t1.loc[("MDT-S/2", "400"), "FID ours"])  # a DiT run never fills an MDT row
    t2 = make_table(TABLES["table2"], df).frame
    assert t2.loc[("MDT-XL/2", "2500"), "FID ours"] == 7.0
    assert t2.loc[("MDT-XL/2-G", "2500"), "FID ours"] == 2.0
    assert t2.loc[("MDT-XL/2-G", "2500"), "IS diff"] == pytest.approx(250.0 - 249.27)
    assert np.isnan(t2.loc[("MDT-XL/2-G", "6500"), "FID ours"])


def test_other_metric_is_shown_for_direction(tmp_path):
    root = tmp_path / "rel"
    for ratio, acc in ((0.1, 0.75), (0.3, 0.9), (0.5, 0.7), (0.8, 0.2)):
        make_run(root, f"r{ratio}", "paper/table3/mask_ratio_0.3.gin",
                 ["masking.random.ratio = %s" % ratio] + [f"{b}" for b in _relations()],
                 evals=[(20_000, {"relation_acc": acc, "heldout_mse": 1 - acc}, {"num_samples": 128})])
    df = collect([root])
    table = make_table(TABLES["table3"], df, metric="relation_acc", step="last")
    f = table.frame
    assert list(f.columns) == ["FID paper", "relation acc. ours", "our step", "runs"]
    assert f.loc["0.3", "relation acc. ours"] == 0.9 and f.loc["0.3", "our step"] == "20,000"
    assert "direction only" in table.caption and "samples 128" in table.caption
    # best to worst: paper FID 0.3, 0.5, 0.1, 0.8; our accuracy 0.3, 0.1, 0.5, 0.8 (one swap)
    assert any("Rank agreement" in n and "+0.80" in n for n in table.notes)
    with pytest.raises(ValueError, match="several datasets"):
        make_table(TABLES["table3"], pd.concat([df, df.assign(dataset="latents", run="x")]))


def _relations():
    return ["train.dataset = 'datasets.relations'", "datasets.relations.image_size = 16"]


def test_debug_runs_fill_paper_rows_with_substitution(tmp_path):
    root = tmp_path / "debug"
    make_run(root, "mdt", "debug/table1.gin", evals=[(6, {"heldout_mse": 0.98}, {})])
    make_run(root, "dit", "debug/table1.gin", ["build.model = @models.dit_xs2"], evals=[(6, {"heldout_mse": 0.96}, {})])
    plain = make_table(TABLES["table1"], collect([root]), metric="heldout_mse", step="last")
    assert plain.frame["held-out MSE ours"].isna().all() and sum("Unmatched" in n for n in plain.notes) == 2
    f = make_table(TABLES["table1"], collect([root], {"mdt_xs2": "mdt_s2", "dit_xs2": "dit_s2"}),
                   metric="heldout_mse", step="last").frame
    assert f.loc[("MDT-S/2", "300"), "held-out MSE ours"] == 0.98 and f.loc[("DiT-S/2", "400"), "held-out MSE ours"] == 0.96


# ------------------------------------------------------------------------------ files and CLI
def test_csv_markdown_latex_written_and_parse_back(table3_runs, tmp_path):
    table = make_table(TABLES["table3"], collect([table3_runs]))
    paths = write_table(table, tmp_path / "out")
    back = pd.read_csv(paths["csv"])
    assert list(back.columns) == ["Mask ratio"] + list(table.frame.columns)
    assert back["Mask ratio"].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    np.testing.assert_allclose(back["FID ours"], table.frame["FID ours"].to_numpy(), equal_nan=True)
    md = paths["md"].read_text()
    assert "| Mask ratio | FID paper | FID ours | FID diff |" in md
    assert "| 0.3 | 50.26 | 50.50 | 0.2400 |" in md and "| 0.1 | 51.60 | — | — |" in md
    assert "- Unmatched: table4/last4" in md
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}{lrrrr" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert tex.count(r"\\") == 9 and r"0.3 & 50.26 & 50.50 & 0.2400" in tex
    assert r"table4/last4" in tex and "--" in tex
    assert latex_escape("a_b & 50% ✓ ×") == r"a\_b \& 50\% \checkmark{} $\times$"


def test_markdown_table_is_the_demos():
    from mdtzoo import demo

    df = pd.DataFrame({"fid": [1.23456, float("nan")], "n": [1, 2]}, index=pd.Index(["mdt", "dit"], name="model"))
    assert demo.markdown_table is markdown_table
    assert markdown_table(df) == "| model | fid | n |\n|---|---|---|\n| mdt | 1.235 | 1 |\n| dit | — | 2 |\n"


def test_cli_table_end_to_end(table3_runs, tmp_path, capsys):
    out = tmp_path / "tables"
    assert cli.main(["table", "table3", str(table3_runs / "baseline"), str(table3_runs / "table3"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.3 | 50.26 | 50.50 |" in printed and f"wrote {out / 'table3_fid_sfid_is_precision_recall.csv'}" in printed
    assert (out / "table3_fid_sfid_is_precision_recall.tex").is_file()
    assert cli.main(["table", "table3", str(table3_runs), "--metric", "heldout_mse", "--step", "last", "--out", ""]) == 0
    assert "held-out MSE ours" in capsys.readouterr().out
    assert cli.main(["table", "table3", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["table", "table3", str(table3_runs), "--step", "soon"]) == 2
    assert "--step wants" in capsys.readouterr().err


# ------------------------------------------------------------------------------ curves
def test_plot_curves_one_line_per_config_with_seed_bands(tmp_path, capsys):
    root = tmp_path / "curves"
    for seed, offset in ((0, 0.0), (1, 0.1)):
        make_run(root, f"mdt_s{seed}", "paper/table3/mask_ratio_0.3.gin", [f"train.seed = {seed}"],
                 heldout=[(100, 0.9 + offset), (200, 0.5 + offset)], img_per_sec=512.0)
    make_run(root, "mdt_r05", "paper/table3/mask_ratio_0.5.gin", heldout=[(100, 0.8), (200, 0.6)])
    make_run(root, "dit", "paper/table1/dit_s2.gin", heldout=[(100, 1.0), (200, 0.7)], img_per_sec=2048.0)
    png = tmp_path / "fig1.png"
    fig = plot_curves([root], metric="heldout_mse", x="both", gpus=8, out=png)
    assert png.is_file() and png.stat().st_size > 1000
    steps_ax, hours_ax = fig.axes
    assert len(steps_ax.get_lines()) == 3 and len(hours_ax.get_lines()) == 3
    labels = [l.get_label() for l in steps_ax.get_lines()]
    assert "mdt_s2 masking.random.ratio=0.3 (n=2)" in labels and "dit_s2" in labels
    mean = next(l for l in steps_ax.get_lines() if "(n=2)" in l.get_label())
    np.testing.assert_allclose(mean.get_ydata(), [0.95, 0.55])
    assert len(steps_ax.collections) == 1  # the +- std band of the two seeds
    # 100 steps x 256 images / 512 img/s = 50 s per window, x 8 GPUs
    np.testing.assert_allclose(mean.get_xdata(), [100, 200])
    hours = next(l for l in hours_ax.get_lines() if "(n=2)" in l.get_label()).get_xdata()
    np.testing.assert_allclose(hours, [50 * 8 / 3600, 100 * 8 / 3600])
    steps, h = gpu_hours(root / "dit", 256, gpus=1)
    np.testing.assert_allclose(h, [0.0, 12.5 / 3600, 25 / 3600])
    assert cli.main(["plot", "curves", str(root), "--x", "steps", "--out", str(tmp_path / "s.png")]) == 0
    assert "3 configurations per panel" in capsys.readouterr().out
    assert cli.main(["plot", "curves", str(root), "--metric", "fid"]) == 2
    assert "metrics found: heldout_mse" in capsys.readouterr().err


def test_a_table_of_our_own_as_docs_extending_shows(tmp_path):
    """docs/extending.md's recipe, with the built-in block masking standing in for a new strategy."""
    from mdtzoo.tables import DEBUG_SUBSTITUTE, Row, TableSpec
    from mdtzoo.tables.papers import mdt

    root = tmp_path / "zoo"
    make_run(root, "random_0.5", "debug/table3.gin", ["masking.random.ratio = 0.5"], evals=[(6, {"heldout_mse": 0.9}, {})])
    make_run(root, "block_0.5", "debug/table3.gin", ["models.mdt_xs2.masking = @masking.block()", "masking.block.ratio = 0.5"],
             evals=[(6, {"heldout_mse": 0.8}, {})])
    rows = tuple(Row((m, str(r)), f"{m}_{r}", mdt("mdt_s2", masking=m, **{f"masking.{m}.ratio": r}), {}, "debug/table3.gin", 0)
                 for m in ("random", "block") for r in (0.3, 0.5))
    spec = TableSpec("masking", "Block vs random masking.", ("Masking", "Ratio"), ("heldout_mse",), rows)
    table = make_table(spec, collect([root], DEBUG_SUBSTITUTE), step="last")
    assert list(table.frame.columns) == ["held-out MSE ours", "our step", "runs"]
    assert table.frame.loc[("block", "0.5"), "held-out MSE ours"] == 0.8
    assert table.frame.loc[("random", "0.5"), "held-out MSE ours"] == 0.9
    assert table.frame.loc[("block", "0.3"), "runs"] == "0/0"
    paper = make_table(TABLES["table3"], collect([root], DEBUG_SUBSTITUTE), metric="heldout_mse", step="last")
    assert paper.frame.loc["0.5", "held-out MSE ours"] == 0.9
    assert any("Unmatched: block_0.5" in n and "masking='block' (row: 'random')" in n for n in paper.notes)
