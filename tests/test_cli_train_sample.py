"""`mdtzoo train` and `mdtzoo sample` end to end on tiny models and data made here."""

import numpy as np
import pytest
import torch
from PIL import Image

from mdtzoo.launch import cli
from mdtzoo.models import build_model, to_reference
from mdtzoo.registry import DATASETS

from test_training import Toy


@pytest.fixture
def toy():
    with DATASETS.temporary("toy", Toy):
        yield


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_config(tmp_path, model="mdt_xs2", steps=4):
    path = tmp_path / "run.gin"
    path.write_text(
        f"include 'models/{model}.gin'\n"
        "train.dataset = 'datasets.toy'\n"
        f"train.steps = {steps}\ntrain.global_batch = 8\ntrain.ckpt_every = 2\ntrain.progress = False\n"
    )
    return path


def test_train_dry_run_then_train_then_sample(toy, tmp_path, capsys):
    config = write_config(tmp_path)
    code, out, _ = run(capsys, "train", config, "--run-dir", tmp_path / "r", "--dry-run")
    assert code == 0 and "data: datasets.toy, 96 items, 3x8x8, 3 classes" in out
    assert not (tmp_path / "r").exists()  # a dry run touches nothing
    code, out, _ = run(capsys, "train", config, "--run-dir", tmp_path / "r")
    assert code == 0 and '"status": "done"' in out
    code, _, err = run(capsys, "train", config, "--run-dir", tmp_path / "r")
    assert code == 2 and "never overwritten" in err

    code, out, _ = run(capsys, "sample", tmp_path / "r", "--npz", tmp_path / "s.npz", "--num", 6, "--steps", 5)
    assert code == 0
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert sorted(data["arr_1"].tolist()) == [0, 0, 1, 1, 2, 2]  # balanced labels
    first = data["arr_0"].copy()
    code, _, err = run(capsys, "sample", tmp_path / "r", "--npz", tmp_path / "s.npz", "--num", 6, "--steps", 5)
    assert code == 2 and "never overwritten" in err
    code, _, _ = run(capsys, "sample", tmp_path / "r", "--npz", tmp_path / "s.npz", "--num", 6, "--steps", 5,
                     "--force")
    assert code == 0 and np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], first)  # seed-reproducible
    code, _, _ = run(capsys, "sample", tmp_path / "r", "--grid", tmp_path / "g.png", "--classes", "0,2",
                     "--num", 4, "--steps", 5)
    assert code == 0 and Image.open(tmp_path / "g.png").size[0] > 8
    code, _, err = run(capsys, "sample", tmp_path / "r", "--grid", tmp_path / "g.png", "--classes", "7")
    assert code == 2 and "out of range" in err


def test_sample_from_a_reference_checkpoint(tmp_path, capsys):
    model = build_model("mdt_xs2", input_size=8, in_channels=3, num_classes=5)
    torch.save(to_reference(model), tmp_path / "ref.pt")
    code, out, err = run(capsys, "sample", "--reference", tmp_path / "ref.pt", "--npz", tmp_path / "r.npz",
                         "--num", 3, "--steps", 3)
    assert code == 0, err
    assert np.load(tmp_path / "r.npz")["arr_0"].shape == (3, 8, 8, 3)
    torch.save({"not": "a state dict", "x": object.__class__.__name__}, tmp_path / "bad.pt")
    code, _, err = run(capsys, "sample", "--reference", tmp_path / "bad.pt", "--npz", tmp_path / "b.npz")
    assert code == 2


def test_latent_reference_models_need_a_vae(tmp_path, capsys):
    model = build_model("dit_xs8", input_size=16, in_channels=4, num_classes=5)
    torch.save(to_reference(model), tmp_path / "ref.pt")
    code, _, err = run(capsys, "sample", "--reference", tmp_path / "ref.pt", "--npz", tmp_path / "r.npz")
    assert code == 2 and "--vae" in err
