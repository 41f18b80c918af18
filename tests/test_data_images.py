"""Every registered dataset's contract; image folders (ADM crop, layouts, corrupt files); digits."""

import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mdtzoo.data.common import split_indices
from mdtzoo.data.extract import extract_latents
from mdtzoo.data.images import CorruptImageError, center_crop_arr, image_folder, list_images
from mdtzoo.data.toy import tiny_vae, write_toy_image_folder
from mdtzoo.registry import DATASETS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_toy_image_folder(root, per_class=4, size=(40, 28))
    return root


@pytest.fixture(scope="module")
def latents_dir(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    images = image_folder(folder, split="all", image_size=16, flip=False)
    extract_latents(images, tiny_vae(), out, vae_id="tiny", shard_size=5, batch_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def small(folder, latents_dir):
    """Small settings per registered dataset; a dataset not listed is built with its defaults."""
    return {
        "relations": dict(length=32, heldout_size=16),
        "image_folder": dict(root=str(folder), image_size=16, heldout_size=2),
        "latents": dict(root=str(latents_dir), heldout_size=2),
    }


def _build(small, name, **kw):
    return DATASETS.build(name, **{**small.get(name, {}), **kw})


# -- the contract, for every registered dataset ---------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_registered_dataset_yields_declared_shapes_dtypes_and_range(small, name, split):
    ds = _build(small, name, split=split)
    assert ds.name == name and ds.split == split and len(ds) > 0 and len(ds.labels) == len(ds)
    for i in range(min(len(ds), 6)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (ds.channels, ds.image_size, ds.image_size)
        assert y.dtype == torch.int64 and y.shape == () and 0 <= int(y) < ds.num_classes and int(y) == ds.labels[i]
        assert torch.isfinite(x).all()
        if not getattr(ds, "latent", False):
            assert x.min() >= -1 and x.max() <= 1
    assert len(pickle.loads(pickle.dumps(ds))) == len(ds)  # DataLoader workers can receive it


@pytest.mark.parametrize("name", DATASETS.names())
def test_registered_dataset_is_a_pure_function_of_index_seed_epoch(small, name):
    a, b = _build(small, name, seed=5), _build(small, name, seed=5)
    b.set_epoch(7)
    for i in range(min(len(a), 4)):
        assert torch.equal(a[i][0], b.item(i, 0)[0])  # item(i, epoch) ignores the current epoch
        assert torch.equal(a.item(i, 7)[0], b[i][0])
        assert torch.equal(a.item(i, 7)[0], a.item(i, 7)[0])


@pytest.mark.parametrize("name", DATASETS.names())
def test_registered_dataset_splits_are_disjoint(small, name):
    train, held = _build(small, name, split="train"), _build(small, name, split="heldout")
    if hasattr(train, "indices"):  # finite datasets: a partition of one index range
        assert not set(train.indices) & set(held.indices)
    else:  # procedural: no heldout picture appears in train
        key = lambda ds, i: ds[i][0].numpy().tobytes()  # noqa: E731
        assert not {key(train, i) for i in range(len(train))} & {key(held, i) for i in range(len(held))}


def test_dataloader_workers_see_the_same_items(folder):
    ds = image_folder(folder, image_size=16, heldout_size=2)
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(5)])) and y.tolist() == ds.labels[:5].tolist()


def test_split_indices_partition_and_cap():
    train, held = split_indices(1797, "train", 180), split_indices(1797, "heldout", 180)
    assert len(held) == 179 and len(train) == 1618  # heldout is at most 10%
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1797))
    assert np.array_equal(held, split_indices(1797, "heldout", 180))  # fixed, seed-independent


# -- ADM centre crop ------------------------------------------------------------------------------
def test_center_crop_halves_with_box_then_crops_the_centre():
    # 10x6 (W x H) made of constant 2x2 blocks: BOX halving gives the block values exactly.
    blocks = np.arange(15, dtype=np.uint8).reshape(3, 5) * 10  # (H/2, W/2)
    img = Image.fromarray(blocks.repeat(2, 0).repeat(2, 1))
    out = center_crop_arr(img, 3)  # short side 6 >= 2*3 -> halve to 5x3; scale 1; crop x from (5-3)//2 = 1
    assert out.shape == (3, 3) and np.array_equal(out, blocks[:, 1:4])


def test_center_crop_without_resize_is_a_plain_centre_crop():
    arr = np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3)
    out = center_crop_arr(Image.fromarray(arr), 4)  # scale 1, crop x = (7-4)//2 = 1
    assert np.array_equal(out, arr[:, 1:5])


@pytest.mark.parametrize("size,wh", [(64, (300, 200)), (64, (200, 300)), (32, (33, 97)), (16, (16, 16))])
def test_center_crop_sizes(size, wh):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    assert center_crop_arr(img, size).shape == (size, size, 3)


# -- layouts ---------------------------------------------------------------------------------------
def test_folder_layout_classes_are_sorted_folder_names(folder):
    files, labels, names, layout = list_images(str(folder))
    assert layout == "folders" and names == ["count_2", "face", "mirror"] and len(files) == 12
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_flat_layout_uses_the_name_before_the_first_underscore(tmp_path):
    write_toy_image_folder(tmp_path, per_class=2, layout="flat", classes=("mirror", "count_2"))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path, split="all", image_size=16, flip=False)
    assert ds.layout == "flat" and ds.class_names == ["count2", "mirror"] and len(ds) == 4
    assert [p.split("/")[-1].split("_")[0] for p in ds.paths] == ["count2", "count2", "mirror", "mirror"]
    assert ds.labels.tolist() == [0, 0, 1, 1]


def test_empty_or_missing_or_mixed_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no images in {tmp_path}") + r".*\.jpg, \.jpeg, \.png"):
        image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="root="):
        image_folder()
    write_toy_image_folder(tmp_path, per_class=1, classes=("face",))
    write_toy_image_folder(tmp_path, per_class=1, classes=("mirror",), layout="flat")
    with pytest.raises(ValueError, match="both class folders"):
        image_folder(tmp_path)
    assert len(image_folder(tmp_path, layout="folders", split="all")) == 1


def test_flip_is_per_epoch_and_an_exact_mirror(folder):
    ds, plain = image_folder(folder, image_size=16, heldout_size=2), image_folder(folder, image_size=16, heldout_size=2, flip=False)
    by_epoch = [[ds.item(i, e)[0] for i in range(len(ds))] for e in range(4)]
    for e in range(4):
        assert all(torch.equal(x, p[0]) or torch.equal(x, p[0].flip(-1)) for x, p in zip(by_epoch[e], plain))
    changed = sum(not torch.equal(a, b) for a, b in zip(by_epoch[0], by_epoch[1]))
    assert 0 < changed < len(ds)


# -- corrupt files ---------------------------------------------------------------------------------
@pytest.fixture
def with_corrupt(tmp_path):
    paths = write_toy_image_folder(tmp_path, per_class=3, classes=("face", "repeat"), suffix=".jpg")
    bad = paths[1]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    garbage = tmp_path / "repeat" / "repeat_zz.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    return tmp_path, bad, garbage


def test_corrupt_image_raises_with_its_path(with_corrupt):
    root, bad, garbage = with_corrupt
    ds = image_folder(root, split="all", image_size=16, flip=False)
    with pytest.raises(CorruptImageError, match=re.escape(str(bad)) + ".*[Tt]runcated"):
        ds[ds.paths.index(str(bad))]
    with pytest.raises(CorruptImageError, match=re.escape(str(garbage)) + ".*cannot identify"):
        ds[ds.paths.index(str(garbage))]
    with pytest.raises(CorruptImageError, match=r"2 corrupt image\(s\)"):  # verify: before any other work
        image_folder(root, split="all", image_size=16, verify=True)


def test_skip_mode_substitutes_the_next_valid_image_and_reports(with_corrupt):
    root, bad, garbage = with_corrupt
    ds = image_folder(root, split="all", image_size=16, flip=False, on_corrupt="skip")
    i = ds.paths.index(str(bad))
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        x, y = ds[i]
    assert torch.equal(x, ds[i + 1][0]) and int(y) == ds.labels[i + 1]
    assert [p for p, _ in ds.corrupt] == [str(bad)] and "truncated" in ds.corrupt[0][1].lower()
    with pytest.warns(UserWarning, match=r"2 corrupt image\(s\).*will be replaced") as record:
        checked = image_folder(root, split="all", image_size=16, on_corrupt="skip", verify=True)
    assert len(record) == 1 and sorted(p for p, _ in checked.corrupt) == sorted([str(bad), str(garbage)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known corrupt files are skipped silently afterwards
        assert torch.equal(checked[i][0], ds[i + 1][0])


# -- digits ----------------------------------------------------------------------------------------
def test_digits_are_bundled_upsampled_and_split():
    train, held = DATASETS.build("digits"), DATASETS.build("digits", split="heldout")
    assert len(train) + len(held) == 1797 and (train.num_classes, train.channels, train.image_size) == (10, 1, 16)
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert x.min() == -1 and x.max() <= 1 and x.max() > 0.9
    assert sorted(set(train.labels.tolist())) == list(range(10))
    rgb = DATASETS.build("digits", rgb=True, image_size=32)
    xr = rgb[0][0]
    assert xr.shape == (3, 32, 32) and torch.equal(xr[0], xr[1]) and torch.equal(xr[1], xr[2])
    levels = DATASETS.build("digits", image_size=8)[0][0] * 8 + 8  # native size: exactly sklearn's 0..16
    assert torch.equal(levels, levels.round()) and levels.min() == 0
