"""experiments/paper, runs and debug: every file parses and builds, documents itself, and the files
cover every row of the paper's tables (checked against mdtzoo.tables.papers, so a missing row fails).

The row check goes through the tables' own matcher: a paper file's resolved config, read back as
a run directory's config.gin would be, must match its row and no row of another configuration.
"""

import re
from pathlib import Path

import gin
import pytest
import torch

from mdtzoo import config
from mdtzoo.tables import DEBUG_SUBSTITUTE, TABLES
from mdtzoo.tables.ginparse import config_columns, parse_gin_text
from mdtzoo.tables.pivot import mismatches

EXP = Path(__file__).resolve().parent.parent / "experiments"
PAPER_FILES = sorted(p.relative_to(EXP).as_posix() for p in (EXP / "paper").rglob("*.gin"))
ROWS = [(spec.name, row) for spec in TABLES.values() for row in spec.rows]
# The layout the sweeps (experiments/paper/<table>.sweep) point at; a row without its file fails.
EXPECTED = {
    "table1": {f"paper/table1/{m}.gin" for m in ("dit_s2", "mdt_s2", "dit_b2", "mdt_b2", "dit_xl2", "mdt_xl2")},
    "table3": {f"paper/table3/mask_ratio_0.{i}.gin" for i in range(1, 9)},
    "table4": {f"paper/table4/last{n}.gin" for n in (0, 1, 2, 4, 6)},
    "table5": {f"paper/table5/{n}.gin" for n in (
        "a_asymmetric", "a_symmetric", "b_side_interp", "b_no_interp", "c_shortcut", "c_no_shortcut",
        "d_full_masked", "d_full", "d_masked", "e_loss_all", "e_loss_removed", "f_side_blocks1", "f_side_blocks2",
        "f_side_blocks3", "g_interp_pos", "g_no_interp_pos", "h_learnable_pos", "h_fixed_pos", "i_relbias",
        "i_no_relbias")},
    "table2": {"paper/table2/sampling.gin", "paper/table2/sampling_cfg.gin", "paper/table2/sampling_cfg_dit.gin"},
}


def top_comment(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(l for l in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])


_RESOLVED: dict = {}


def resolved(path: str) -> str:
    if path not in _RESOLVED:
        _RESOLVED[path] = config.parse([EXP / path])
        gin.clear_config()
    return _RESOLVED[path]


def other_configs(spec, path: str) -> list:
    """Rows of ``spec`` trained by a different configuration than ``path`` (the baseline rows share one)."""
    return [r for r in spec.rows if resolved(r.config) != resolved(path)]


def columns_of(files, bindings=(), substitute=None) -> dict:
    """Config columns of the resolved config, exactly as collect() reads a run's config.gin."""
    text = config.parse([EXP / f for f in files], list(bindings))
    gin.clear_config()
    return config_columns(parse_gin_text(text), substitute)


def test_expected_layout_exists_and_every_row_points_into_it():
    assert set(PAPER_FILES) == set().union(*EXPECTED.values())
    for name, spec in TABLES.items():
        used = {r.config for r in spec.rows} | {r.sampling for r in spec.rows if r.sampling}
        expected = EXPECTED[name] | ({"paper/table1/mdt_xl2.gin", "paper/table1/dit_xl2.gin"} if name == "table2" else set())
        assert used == expected, name
    assert len(TABLES["table1"].rows) == 14 and len(TABLES["table2"].rows) == 8
    assert [len(TABLES[t].rows) for t in ("table3", "table4", "table5")] == [8, 5, 20]


@pytest.mark.parametrize("path", PAPER_FILES)
def test_paper_file_builds_and_documents_itself(path):
    config.parse([EXP / path])
    head = top_comment(EXP / path)
    assert re.search(r"\b\d+\.\d\d\b", head), f"{path}: no paper number in its top comment"
    assert "mdtzoo train experiments/paper/" in head and "--run-dir runs/" in head
    assert "datasets.latents.root=" in head  # the required knob of the run file
    if path.startswith("paper/table2/"):
        assert "mdtzoo sample" in head or "sample its" in head
        assert gin.query_parameter("samplers.ddpm.clip_denoised") is False
        return
    assert f"mdtzoo train experiments/{path}" in head
    assert gin.query_parameter("train.dataset") == "datasets.latents"
    assert gin.query_parameter("train.global_batch") == 256 and gin.query_parameter("train.lr") == 3e-4
    with torch.device("meta"):
        model = config.call_root(config.build)
    assert model.input_size == 32 and model.in_channels == 4 and model.num_classes == 1000


@pytest.mark.parametrize("table,row", ROWS, ids=[f"{t}-{r.name}" for t, r in ROWS])
def test_row_config_matches_its_row_only(table, row):
    spec = TABLES[table]
    cols = columns_of([row.config])
    assert not mismatches(cols, row.match), f"{row.config} does not match row {row.label}: {mismatches(cols, row.match)}"
    others = [r.name for r in other_configs(spec, row.config) if not mismatches(cols, r.match)]
    assert not others, f"{row.config} also matches rows {others}"
    assert cols["train.steps"] >= row.step
    number = f"{row.paper['fid']:.2f}"
    assert number in top_comment(EXP / (row.sampling or row.config)), f"paper FID {number} not in {row.config}"


def test_baseline_files_are_one_configuration():
    """The 50.26 rows all resolve to the same config, so one run directory serves them all."""
    files = [r.config for spec in TABLES.values() for r in spec.rows if r.paper.get("fid") == 50.26]
    assert len(files) == 11
    texts = {config.parse([EXP / f]) for f in files}
    gin.clear_config()
    assert len(texts) == 1


def test_sampling_files_set_the_papers_guidance():
    from mdtzoo.registry import GUIDANCE

    config.parse([EXP / "paper/table2/sampling_cfg.gin"])
    guide = GUIDANCE.build("power_cosine")  # built through gin: the file's bindings apply
    assert (guide.s, guide.power, guide.legacy_three_channels) == (3.8, 4.0, True)
    assert gin.query_parameter("%SAMPLE_STEPS") == "250" and gin.query_parameter("%NUM_SAMPLES") == 50000
    config.parse([EXP / "paper/table2/sampling_cfg_dit.gin"])
    guide = GUIDANCE.build("constant")
    assert (guide.s, guide.legacy_three_channels) == (1.5, True)
    gin.clear_config()


@pytest.mark.parametrize("name", ["imagenet256_latents", "relations32"])
def test_run_files_have_the_commonly_overridden_header(name):
    path = EXP / "runs" / f"{name}.gin"
    assert "Commonly overridden:" in top_comment(path)
    config.parse([path])
    assert gin.query_parameter("train.global_batch") == 256 and gin.query_parameter("train.optimizer") == "adamw"
    if name == "imagenet256_latents":
        assert gin.query_parameter("train.ema_decay") == 0.9999 and gin.query_parameter("train.weight_decay") == 0.0
        # the REQUIRED macro: a placeholder that names the binding to set
        assert gin.query_parameter("%LATENTS") == "REQUIRED-set-datasets.latents.root"
        cols = columns_of(["paper/table3/mask_ratio_0.5.gin"], ["datasets.latents.root = '/data/x'"])
        assert cols["datasets.latents.root"] == "/data/x"
    # a paper file followed by relations32.gin trains on the bundled data
    cols = columns_of(["paper/table3/mask_ratio_0.5.gin", "runs/relations32.gin"])
    assert cols["dataset"] == "relations" and cols["masking.random.ratio"] == 0.5 and cols["train.steps"] == 50_000


@pytest.mark.parametrize("table,row", [(t, r) for t, r in ROWS if r.debug is not None],
                         ids=[f"{t}-{r.name}" for t, r in ROWS if r.debug is not None])
def test_debug_analogue_builds_and_fills_its_row(table, row):
    spec = TABLES[table]
    config.parse([EXP / spec.debug_config], list(row.debug))
    assert gin.query_parameter("train.dataset") == "datasets.relations"
    assert gin.query_parameter("datasets.relations.image_size") == 16
    with torch.device("meta"):
        model = config.call_root(config.build, input_size=16, in_channels=3, num_classes=8)
    assert model.hidden_size == 128  # an XS model
    cols = columns_of([spec.debug_config], row.debug, DEBUG_SUBSTITUTE)
    assert not mismatches(cols, row.match), mismatches(cols, row.match)
    assert not [r.name for r in other_configs(spec, row.config) if not mismatches(cols, r.match)]


def test_every_debug_file_documents_its_commands():
    for path in sorted((EXP / "debug").glob("*.gin")):
        head = top_comment(path)
        assert "mdtzoo train experiments/debug/" in head, path
        if path.stem != "base":
            assert "mdtzoo table" in head and "--step last" in head, path
