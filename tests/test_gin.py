"""Gin files and the CLI: every file in experiments/ parses and builds; errors are clear."""

from pathlib import Path

import gin
import pytest
import torch

from mdtzoo import config
from mdtzoo.launch import cli
from mdtzoo.models import count_parameters
from mdtzoo.registry import MODELS

ROOT = Path(__file__).resolve().parent.parent
GIN_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").rglob("*.gin"))


def build_meta():
    with torch.device("meta"):
        return config.call_root(config.build)


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses_and_builds(path):
    config.parse([ROOT / path])
    try:
        gin.query_parameter("build.model")
        fragment = False
    except ValueError:  # a fragment of shared defaults, included by others; it names no model
        fragment = True
    if fragment:
        with pytest.raises(config.ConfigError, match="build.model"):
            build_meta()
        return
    model = build_meta()
    assert count_parameters(model) > 0
    # the preset the config names is the one built (its size and patch)
    preset = gin.query_parameter("build.model").selector.split(".")[-1]
    defaults = MODELS.get(preset).defaults
    assert (len(model.blocks), model.hidden_size, model.patch_size) == (
        defaults["depth"], defaults["hidden_size"], defaults["patch_size"])


def test_ablation_files_change_what_they_say():
    def built(path, *bindings):
        config.parse([ROOT / path], bindings)
        return build_meta()

    base = built("experiments/models/mdt_s2.gin")
    assert built("experiments/models/ablations/mdt_s2_last4.gin").decode_layer == 4
    assert built("experiments/models/ablations/mdt_s2_symmetric.gin").symmetric
    assert not built("experiments/models/ablations/mdt_s2_no_shortcut.gin").interp.shortcut
    assert len(built("experiments/models/ablations/mdt_s2_side_blocks3.gin").interp.blocks) == 3
    assert len(built("experiments/models/ablations/mdt_s2_no_interp.gin").interp.blocks) == 0
    assert built("experiments/models/ablations/mdt_s2_no_interp_pos.gin").interp.pos_embed is None
    assert not built("experiments/models/ablations/mdt_s2_fixed_pos.gin").pos_embed.weight.requires_grad
    assert base.pos_embed.weight.requires_grad
    assert built("experiments/models/ablations/mdt_s2_no_relbias.gin").blocks[0].attn.rel_pos_bias is None
    assert type(built("experiments/models/ablations/mdt_s2_block_masking.gin").masking).__name__ == "BlockMasking"
    # command-line bindings win over the file
    assert built("experiments/models/mdt_s2.gin", "masking.random.ratio = 0.5").masking.ratio == 0.5
    assert built("experiments/models/mdt_s2.gin", "build.input_size = 64").grid == (32, 32)


def test_resolved_config_uses_qualified_names():
    text = config.parse([ROOT / "experiments/models/mdt_s2.gin"])
    assert "masking.random.ratio = 0.3" in text
    assert "interp.side.num_blocks = 1" in text
    assert "build.model = @models.mdt_s2" in text


def test_unknown_component_lists_known_names():
    with pytest.raises(config.ConfigError) as info:
        config.parse([], ["masking.randm.ratio = 0.5"])
    assert "known masking components: block, none, random, random_jitter" in str(info.value)
    with pytest.raises(config.ConfigError, match="families masking, interp"):
        config.parse([], ["maskng.random.ratio = 0.5"])


def test_bad_bindings_name_the_problem():
    with pytest.raises(config.ConfigError, match="Unable to parse"):
        config.parse([], ["masking.random.ratio = "])
    with pytest.raises(config.ConfigError, match="doesn't have a parameter named 'ratoi'"):
        config.parse([], ["masking.random.ratoi = 0.5"])
    with pytest.raises(config.ConfigError, match="gin file not found"):
        config.parse(["experiments/models/nope.gin"])


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_list(capsys):
    code, out, _ = run_cli(capsys, "list", "masking")
    assert code == 0
    assert "masking.random" in out and "masking.block" in out and "interp.side" not in out
    code, _, err = run_cli(capsys, "list", "nope")
    assert code == 2 and "known families" in err


def test_cli_build_dry_run(capsys):
    code, out, _ = run_cli(capsys, "build", str(ROOT / "experiments/models/mdt_xl2.gin"), "--dry-run")
    assert code == 0
    assert "build.model = @models.mdt_xl2" in out
    assert "parameters: 699,778,144" in out
    assert "inference path: 675,856,416" in out
    assert "28 blocks (encoder 26, decoder 2)" in out


def test_cli_build_errors_are_one_message(capsys):
    path = str(ROOT / "experiments/models/mdt_s2.gin")
    code, _, err = run_cli(capsys, "build", path, "--dry-run", "--gin", "models.mdt_s2.masking = 'blok'")
    assert code == 2 and "known masking components" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "build", path, "--dry-run", "--gin", "build.input_size = 31")
    assert code == 2 and "not divisible by patch size 2" in err
    code, _, err = run_cli(capsys, "build", str(ROOT / "experiments/models/base.gin"), "--dry-run")
    assert code == 2 and "build.model" in err


def test_cli_build_runs_a_forward_pass(capsys):
    code, out, _ = run_cli(capsys, "build", str(ROOT / "experiments/models/mdt_s8.gin"), "--gin", "build.input_size = 16")
    assert code == 0 and "(2, 4, 16, 16) -> (2, 8, 16, 16)" in out


def test_readme_component_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    table = cli.component_table()
    assert table in readme, "README's component table is stale: run `mdtzoo list --markdown` and paste it"
    gin.clear_config()


def test_a_runs_folder_in_the_working_directory_does_not_break_includes(tmp_path, monkeypatch):
    """`include 'runs/...gin'` with a runs/ folder in the cwd (where users keep their runs):
    gin's package reader took runs/ for a Python package and raised TypeError."""
    from mdtzoo import config

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = config.parse([config.EXPERIMENTS_DIR / "paper" / "table3" / "mask_ratio_0.3.gin"])
    assert "datasets.latents.root" in text and "masking.random.ratio = 0.3" in text
