"""Latent pre-extraction (shards, resume, ranks, CLI) and the memory-mapped ``latents`` dataset."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mdtzoo.data.extract import extract_latents
from mdtzoo.data.images import image_folder
from mdtzoo.data.latents import latents, read_meta
from mdtzoo.data.toy import tiny_vae, write_toy_image_folder
from mdtzoo.launch import cli

SHARD, N = 4, 10  # 10 images -> shards of 4, 4, 2


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_toy_image_folder(root, per_class=5, size=(24, 20), classes=("face", "mirror"))
    return image_folder(root, split="all", image_size=16, flip=False)


def _extract(images, vae, out, **kw):
    return extract_latents(images, vae, out, vae_id="tiny", shard_size=SHARD, batch_size=3, progress=False, **kw)


@pytest.fixture(scope="module")
def extracted(images, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    _extract(images, vae, out)
    return out


def _mtimes(out):
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in sorted(out.glob("shard_*/*"))}


def test_shards_hold_mean_and_std_of_image_and_mirror_image(images, vae, extracted):
    meta = read_meta(extracted)
    assert (meta["count"], meta["num_shards"], meta["latent_shape"], meta["dtype"]) == (N, 3, [4, 8, 8], "float16")
    assert meta["scale_factor"] == 0.18215 and meta["image_size"] == 16 and meta["class_names"] == ["face", "mirror"]
    mean = np.concatenate([np.load(extracted / f"shard_{k:05d}" / "mean.npy") for k in range(3)])
    std = np.concatenate([np.load(extracted / f"shard_{k:05d}" / "std.npy") for k in range(3)])
    label = np.concatenate([np.load(extracted / f"shard_{k:05d}" / "label.npy") for k in range(3)])
    assert mean.shape == std.shape == (N, 2, 4, 8, 8) and mean.dtype == std.dtype == np.float16
    assert label.dtype == np.int64 and label.tolist() == images.labels.tolist()
    x = torch.stack([images[i][0] for i in range(N)])
    m0, s0 = vae.encode(x)
    m1, s1 = vae.encode(x.flip(-1))
    assert np.allclose(mean[:, 0], m0.numpy(), rtol=2e-3, atol=1e-4) and np.allclose(mean[:, 1], m1.numpy(), rtol=2e-3, atol=1e-4)
    assert np.allclose(std[:, 0], s0.numpy(), rtol=2e-3) and np.allclose(std[:, 1], s1.numpy(), rtol=2e-3)
    assert (std > 0).all()
    assert json.loads((extracted / "shard_00002" / "shard.json").read_text())["count"] == 2


def test_resume_redoes_only_missing_or_half_written_shards(images, vae, extracted, tmp_path):
    out = tmp_path / "lat"
    shutil.copytree(extracted, out)
    before = _mtimes(out)
    reference = np.load(out / "shard_00001" / "mean.npy")
    shutil.rmtree(out / "shard_00001")
    result = _extract(images, vae, out)
    assert result["written"] == [1] and result["skipped"] == [0, 2]
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if not k.startswith("shard_00001")} == {
        k: v for k, v in before.items() if not k.startswith("shard_00001")
    }
    assert np.array_equal(np.load(out / "shard_00001" / "mean.npy"), reference)  # same numbers again
    # A half-written shard (a field missing) and a killed run's temporary folder are redone / cleaned.
    (out / "shard_00002" / "std.npy").unlink()
    (out / ".shard_00000.tmp-999").mkdir()
    result = _extract(images, vae, out)
    assert result["written"] == [2] and result["skipped"] == [0, 1]
    assert not list(out.glob(".shard_*")) and (out / "shard_00002" / "std.npy").is_file()


def test_resume_with_other_settings_is_refused(images, vae, extracted, tmp_path):
    out = tmp_path / "lat"
    shutil.copytree(extracted, out)
    with pytest.raises(ValueError, match="shard_size: existing 4 vs requested 5"):
        extract_latents(images, vae, out, vae_id="tiny", shard_size=5, progress=False)


def test_ranks_take_shards_round_robin_from_the_environment(images, vae, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _extract(images, vae, tmp_path)["written"] == [1]
    with pytest.raises(FileNotFoundError, match="2 of 3 shards missing"):
        latents(tmp_path)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _extract(images, vae, tmp_path)["written"] == [0, 2]
    assert len(latents(tmp_path, split="train", heldout_size=1)) == 9


def test_posterior_samples_are_deterministic_per_seed_epoch_index(extracted):
    a, b = latents(extracted, seed=1), latents(extracted, seed=1)
    assert a.latent and (a.channels, a.image_size, a.num_classes) == (4, 8, 2)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    b.set_epoch(1)
    assert not any(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    c = latents(extracted, seed=2)
    assert not torch.equal(a[0][0], c[0][0])
    loader = torch.utils.data.DataLoader(b, batch_size=4, num_workers=2)  # memory maps reopen per worker
    assert torch.equal(next(iter(loader))[0], torch.stack([b[i][0] for i in range(4)]))


def test_posterior_samples_have_the_stored_mean_and_std(extracted):
    ds = latents(extracted, split="heldout", heldout_size=1, flip=False)
    row = int(ds.indices[0])
    k, r = divmod(row, SHARD)
    mean = np.load(extracted / f"shard_{k:05d}" / "mean.npy")[r, 0].astype(np.float32)
    std = np.load(extracted / f"shard_{k:05d}" / "std.npy")[r, 0].astype(np.float32)
    draws = torch.stack([ds.item(0, e)[0] for e in range(400)]).numpy()  # (400, 4, 8, 8)
    z = (draws.mean(0) - mean) / (std / np.sqrt(400))
    assert np.abs(z).mean() < 1.0 and np.abs(z).max() < 5  # |z| ~ half-normal, mean 0.8
    ratio = draws.std(0) / std
    assert abs(ratio.mean() - 1) < 0.02 and np.abs(ratio - 1).max() < 0.25
    exact = latents(extracted, split="heldout", heldout_size=1, flip=False, sample_posterior=False)
    assert np.array_equal(exact[0][0].numpy(), mean)


def test_flip_picks_the_mirror_image_latent(extracted):
    ds = latents(extracted, flip=True, sample_posterior=False)
    mean = np.load(extracted / "shard_00000" / "mean.npy").astype(np.float32)
    i = int(np.searchsorted(ds.indices, 0))
    sides = set()
    for e in range(16):
        x = ds.item(i, e)[0].numpy()
        sides.add(0 if np.array_equal(x, mean[0, 0]) else 1 if np.array_equal(x, mean[0, 1]) else -1)
    assert sides == {0, 1}


def test_missing_latents_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mdtzoo extract"):
        latents(tmp_path)


def test_cli_extracts_with_a_saved_vae_and_resumes(images, vae, tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    vae.autoencoder.save_pretrained(vae_dir)
    args = ["extract", "--root", images.root, "--out", str(tmp_path / "out"), "--vae", str(vae_dir), "--image-size", "16",
            "--shard-size", "4", "--batch-size", "5", "--workers", "0", "--quiet", "--verify"]
    assert cli.main(args) == 0
    assert "wrote 3 shard(s), skipped 0" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "wrote 0 shard(s), skipped 3" in capsys.readouterr().out
    assert latents(tmp_path / "out").meta["vae"] == str(vae_dir)
    assert cli.main(["extract", "--out", str(tmp_path / "o2"), "--vae", str(vae_dir)]) == 2
    assert "needs root=" in capsys.readouterr().err


def test_cli_reads_the_dataset_from_gin(images, vae, tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    vae.autoencoder.save_pretrained(vae_dir)
    gin_file = tmp_path / "data.gin"
    gin_file.write_text(f"datasets.image_folder.root = '{images.root}'\ndatasets.image_folder.image_size = 16\n")
    assert cli.main(["extract", "--data", str(gin_file), "--out", str(tmp_path / "out"), "--vae", str(vae_dir), "--quiet", "--workers", "0"]) == 0
    meta = read_meta(tmp_path / "out")
    assert (meta["count"], meta["num_shards"], meta["latent_shape"]) == (N, 1, [4, 8, 8])
    assert os.path.isdir(tmp_path / "out" / "shard_00000")
