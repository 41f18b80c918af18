"""`mdtzoo demo` with a reduced step count: both runs, grids, the table and its files."""

import pandas as pd

from mdtzoo.launch import cli


def test_demo_produces_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--steps", "2", "--samples-per-class", "1", "--sample-steps", "2",
                     "--gin", "datasets.relations.length = 256", "--gin", "datasets.relations.heldout_size = 16"])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("mdt", "dit"):
        assert (out / name / "DONE").read_text().strip() == "step 2"
        assert (out / name / "eval" / "step_00000002.json").is_file()
        assert (out / f"{name}_samples.png").is_file()
    table = pd.read_csv(out / "demo_table.csv", index_col="model")
    assert list(table.index) == ["mdt", "dit"]
    assert (table["steps"] == 2).all()
    assert table.loc["mdt", "params"] > table.loc["dit", "params"]  # the side-interpolator and rel-pos tables
    assert table["relation_acc"].between(0, 1).all() and table["relation_score"].between(0, 1).all()
    assert "| mdt |" in (out / "demo_table.md").read_text()
    assert "sample grids:" in printed and str(out / "demo_table.csv") in printed
    # Running it again reuses the finished runs and their evaluations.
    assert cli.main(["demo", "--out", str(out), "--steps", "2", "--samples-per-class", "1", "--sample-steps", "2",
                     "--gin", "datasets.relations.length = 256", "--gin", "datasets.relations.heldout_size = 16"]) == 0
