"""generate() and the sample files: format, reproducibility, batch / rank independence."""

import numpy as np
import pytest
import torch
from PIL import Image

from mdtzoo.diffusion import build_diffusion
from mdtzoo.sample import (generate, generate_npz, make_labels, merge_npz, save_grid, save_npz, shard_path,
                           shard_range, to_uint8)
from mdtzoo.vae import LatentVAE


class TinyModel(torch.nn.Module):
    """A small class-conditional conv net with learned sigma (2C output channels)."""

    def __init__(self, in_channels=3, input_size=8, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.in_channels, self.input_size = in_channels, input_size
        self.conv = torch.nn.Conv2d(in_channels, 2 * in_channels, 3, padding=1)
        self.label = torch.nn.Embedding(classes + 1, 2 * in_channels)
        self.dropout = torch.nn.Dropout(0.5)  # must be off while sampling

    def forward(self, x, t, y):
        h = self.conv(x) + self.label(y)[:, :, None, None] + (t.float() / 1000)[:, None, None, None]
        h = self.dropout(h)
        c = x.shape[1]
        return torch.cat([0.5 * h[:, :c], torch.tanh(h[:, c:])], dim=1)


def _gen(model=None, **kwargs):
    opts = dict(num_samples=5, batch_size=2, seed=0, num_classes=10, sampler="ddpm", guidance="none")
    opts.update(kwargs)
    return generate(model or TinyModel(), build_diffusion(respacing="5"), opts.pop("sampler"), opts.pop("guidance"), **opts)


def test_generate_returns_uint8_nhwc_and_labels_reproducibly():
    images, labels = _gen()
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.shape == (5,) and ((labels >= 0) & (labels < 10)).all()
    again, labels_again = _gen()
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    other, _ = _gen(seed=1)
    assert not np.array_equal(images, other)


def test_generate_is_independent_of_batch_size_and_sharding():
    whole, labels = _gen(batch_size=5, guidance="power_cosine")
    small, _ = _gen(batch_size=2, guidance="power_cosine")
    parts = [_gen(batch_size=2, guidance="power_cosine", rank=r, world_size=2) for r in range(2)]
    assert [len(p[0]) for p in parts] == [3, 2]
    assert np.abs(whole.astype(int) - small.astype(int)).max() <= 1  # conv batching may flip a rounding
    assert np.array_equal(np.concatenate([p[0] for p in parts]), small)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), labels)


def test_generate_restores_training_mode():
    model = TinyModel().train()
    _gen(model)
    assert model.training


def test_generate_decodes_latents_with_a_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=8))
    images, _ = _gen(TinyModel(in_channels=4, input_size=4), vae=vae, num_samples=2)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


def test_labels():
    balanced = make_labels("balanced", 1000, 10, seed=0)
    assert np.array_equal(np.bincount(balanced), np.full(10, 100))
    assert not np.array_equal(balanced[:10], np.arange(10))  # shuffled
    assert np.array_equal(np.bincount(make_labels("balanced", 25, 10, seed=0)), [3] * 5 + [2] * 5)
    uniform = make_labels(None, 1000, 10, seed=0)
    assert np.array_equal(uniform, make_labels("uniform", 1000, 10, seed=0)) and set(uniform) == set(range(10))
    assert (make_labels("null", 4, 10, seed=0) == 10).all()
    assert make_labels([1, 2, 3], 3, 10, seed=0).tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        make_labels([1, 2], 3, 10, seed=0)
    with pytest.raises(ValueError, match="balanced"):
        make_labels("classes", 3, 10, seed=0)
    images, labels = _gen(labels=[3, 3, 4, 4, 5])
    assert labels.tolist() == [3, 3, 4, 4, 5]


def test_shard_range_partitions():
    for n, w in [(10, 3), (2, 4), (50000, 8)]:
        ranges = [shard_range(n, r, w) for r in range(w)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]


def test_save_npz_format_and_atomicity(tmp_path):
    images, labels = _gen()
    path = save_npz(tmp_path / "out" / "samples.npz", images, labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
        assert data["arr_1"].dtype == np.int64 and np.array_equal(data["arr_1"], labels)
        assert np.array_equal(data["arr_0"], images)
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]  # no temp file left
    with pytest.raises(ValueError, match="uint8"):
        save_npz(tmp_path / "bad.npz", images.astype(np.float32), labels)


def test_generate_npz_merges_rank_shards(tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    kwargs = dict(num_samples=5, batch_size=2, seed=0, num_classes=10)
    d = build_diffusion(respacing="5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert generate_npz(out, TinyModel(), d, **kwargs) is None
    assert shard_path(out, 1, 2).exists() and not out.exists()
    monkeypatch.setenv("RANK", "0")
    assert generate_npz(out, TinyModel(), d, poll_s=0.01, **kwargs) == out
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()
    images, labels = generate(TinyModel(), d, num_samples=5, batch_size=2, seed=0, num_classes=10, rank=0, world_size=1)
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    merged = merge_npz([out, out], tmp_path / "twice.npz")
    with np.load(merged) as data:
        assert data["arr_0"].shape == (10, 8, 8, 3)


def test_save_grid(tmp_path):
    images = np.arange(5 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 4, 6, 3)
    path = save_grid(tmp_path / "grid.png", images, nrow=3, padding=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    assert np.array_equal(grid[2:6, 2:8], images[0]) and np.array_equal(grid[8:12, 10:16], images[4])
