"""The relations dataset and its exact oracle: samples score 1, every corruption scores 0, noise ~0."""

import numpy as np
import pytest
import torch

from mdtzoo.data import relations as R
from mdtzoo.data.grid import COLOURS, GRID, SHAPES, components, crop, free_for, quantise, render, stamp
from mdtzoo.data.oracle import CLASS_NAMES, RelationsOracle, check_grid, oracle_accuracy

PER_CLASS = 25


@pytest.fixture(scope="module")
def train():
    return R.relations(split="train", length=PER_CLASS * len(CLASS_NAMES), heldout_size=64)


def _batch(ds, n=None):
    xs, ys = zip(*(ds[i] for i in range(n or len(ds))))
    return torch.stack(xs), torch.stack(ys)


# -- the dataset -----------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_items_have_the_declared_shape_dtype_and_range(image_size, split):
    ds = R.relations(split=split, image_size=image_size, length=40, heldout_size=24)
    x, y = _batch(ds)
    assert len(ds) == (40 if split == "train" else 24)
    assert x.shape == (len(ds), 3, image_size, image_size) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {-1.0, 1.0}  # palette colours are cube corners
    assert y.dtype == torch.int64 and ds[0][1].shape == () and y.tolist() == [i % 8 for i in range(len(ds))]
    assert (ds.num_classes, ds.image_size, ds.channels, ds.name) == (8, image_size, 3, "relations")


def test_shape_library_is_connected_and_distinct_up_to_translation():
    for s in SHAPES:
        assert len(components(s)) == 1 and np.array_equal(crop(np.argwhere(s))[1], s)
    keys = {(s.shape, s.tobytes()) for s in SHAPES}
    assert len(keys) == len(SHAPES) == 14


def test_same_seed_same_images_other_seed_other_images():
    a, b = R.relations(length=16, seed=3), R.relations(length=16, seed=3)
    c = R.relations(length=16, seed=4)
    xa, xb, xc = _batch(a)[0], _batch(b)[0], _batch(c)[0]
    assert torch.equal(xa, xb)
    assert sum(not torch.equal(p, q) for p, q in zip(xa, xc)) >= 15


def test_heldout_is_fixed_across_seeds_and_disjoint_from_train():
    h0, h1 = R.relations(split="heldout", seed=0, heldout_size=80), R.relations(split="heldout", seed=9, heldout_size=80)
    assert torch.equal(_batch(h0)[0], _batch(h1)[0])
    tr = R.relations(split="train", length=4000, heldout_size=80)
    held = {h0.grid(i).tobytes() for i in range(len(h0))} | {h0.grid(i)[:, ::-1].tobytes() for i in range(len(h0))}
    assert not any(tr.grid(i).tobytes() in held for i in range(len(tr)))
    # Without the exclusion some train draws would collide (the small-tile repeat class).
    assert any(tr._draw("train", i).tobytes() in held for i in range(len(tr)))


def test_flip_follows_the_epoch_and_keeps_the_relation():
    ds = R.relations(length=64, flip=True)
    e0 = _batch(ds)[0]
    ds.set_epoch(1)
    e1, y = _batch(ds)
    flipped = [not torch.equal(p, q) for p, q in zip(e0, e1)]
    assert 10 < sum(flipped) < 54  # about half the items change orientation between epochs
    assert all(torch.equal(p, q) or torch.equal(p, q.flip(-1)) for p, q in zip(e0, e1))
    assert torch.equal(ds.item(5, 0)[0], e0[5]) and ds.epoch == 1
    assert ds.oracle.accuracy(e1, y)["overall"] == 1.0


def test_unknown_class_and_bad_size_are_rejected():
    with pytest.raises(ValueError, match="face"):
        R.relations(classes=("face", "eyes"))
    with pytest.raises(ValueError, match="multiple of 16"):
        R.relations(image_size=24)
    with pytest.raises(ValueError, match="split"):
        R.relations(split="val")


# -- the oracle on real samples, noise and other inputs ---------------------------------------
@pytest.mark.parametrize("image_size", [16, 32])
def test_dataset_samples_score_one(image_size):
    for split in ("train", "heldout"):
        ds = R.relations(split=split, image_size=image_size, length=200, heldout_size=200)
        x, y = _batch(ds)
        result = R.oracle_accuracy(x, y)
        assert result["overall"] == 1.0 and result["per_class"] == {c: 1.0 for c in CLASS_NAMES}
        assert result["count"] == {c: 25 for c in CLASS_NAMES}


def test_oracle_reads_uint8_nhwc_and_tolerates_pixel_noise(train):
    x, y = _batch(train)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert oracle_accuracy(u8, y)["overall"] == 1.0
    g = torch.Generator().manual_seed(0)
    # sigma 0.3 per pixel (~38 of 255 levels): 2x2 cells average it to 0.15, far inside the margin.
    assert oracle_accuracy(x + 0.3 * torch.randn(x.shape, generator=g), y)["overall"] == 1.0
    # A uniform shift of every channel towards mid grey by up to 1 - margin still reads back.
    assert oracle_accuracy(x * 0.3, y)["overall"] == 1.0
    assert oracle_accuracy(x * 0.2, y)["overall"] == 0.0  # 0.2 < margin 0.25: unreadable


def test_noise_scores_low(train):
    y = torch.arange(800) % 8
    g = torch.Generator().manual_seed(1)
    uniform = torch.rand(800, 3, 32, 32, generator=g) * 2 - 1
    assert oracle_accuracy(uniform, y)["overall"] < 0.2
    rng = np.random.default_rng(2)
    palette_noise = np.stack([render(rng.integers(0, 8, (GRID, GRID)).astype(np.int8), 32) for _ in range(800)])
    result = oracle_accuracy(palette_noise, y)
    assert result["overall"] < 0.2 and max(result["per_class"].values()) < 0.2
    assert oracle_accuracy(np.full((8, 3, 32, 32), -1.0), np.arange(8))["overall"] == 0.0  # blank


def test_score_columns_and_label_checks(train):
    x, y = _batch(train, 16)
    scores = train.oracle.score(x, y)
    assert set(scores) == {"correct", "label", "class_name", "reason"}
    assert scores["correct"].dtype == bool and scores["correct"].all() and scores["reason"] == [""] * 16
    assert scores["class_name"][:3] == ["face", "count_2", "count_3"]
    with pytest.raises(ValueError, match="labels"):
        train.oracle.score(x, y + 8)
    sub = RelationsOracle(("mirror", "repeat"))
    assert sub.accuracy(x[[5, 6]], [0, 1]) == {"overall": 1.0, "per_class": {"mirror": 1.0, "repeat": 1.0}, "count": {"mirror": 1, "repeat": 1}}
    assert quantise(x[:2]).shape == (2, GRID, GRID)


# -- corruptions: one function per way of breaking each class ----------------------------------
def _other_colour(rng, *avoid):
    return int(rng.choice([c for c in COLOURS if c not in avoid]))


def _objects(g):
    return components(g != 0)


def _face(g):
    ys, xs = np.nonzero(g)
    skin = g[ys.min(), xs.min() + 1]
    feats = sorted(components((g != 0) & (g != skin)), key=lambda c: (c[:, 0].min(), c[:, 1].min()))
    right = max(feats[:2], key=lambda c: c[:, 1].min())
    left = min(feats[:2], key=lambda c: c[:, 1].min())
    return skin, g[tuple(right[0])], left, right, feats[2]


def face_missing_eye(g, rng):
    skin, _, _, eye, _ = _face(g)
    g[eye[:, 0], eye[:, 1]] = skin


def face_eye_colour(g, rng):
    skin, f, _, eye, _ = _face(g)
    g[eye[:, 0], eye[:, 1]] = _other_colour(rng, skin, f)


def face_eye_shape(g, rng):
    skin, f, left, right, _ = _face(g)
    (top, x0), lmask = crop(left)
    (rtop, rx0), rmask = crop(right)
    g[right[:, 0], right[:, 1]] = skin
    if not np.array_equal(lmask, rmask):
        stamp(g, lmask, rtop, rx0, f)  # a translated copy instead of a mirror image
    else:
        keep = right[:-1]  # a symmetric eye loses a cell
        g[keep[:, 0], keep[:, 1]] = f


def face_eye_moved(g, rng):
    skin, f, _, eye, _ = _face(g)
    g[eye[:, 0], eye[:, 1]] = skin
    g[eye[:, 0], eye[:, 1] - 1] = f  # one cell towards the axis (eyes keep >= 1 cell between them)


def face_mouth_off_centre(g, rng):
    skin, f, _, _, mouth = _face(g)
    g[mouth[:, 0], mouth[:, 1]] = skin
    g[mouth[:, 0], mouth[:, 1] - 1] = f


def drop_object(g, rng):
    last = _objects(g)[-1]
    g[last[:, 0], last[:, 1]] = 0


def recolour_object(g, rng):
    last = _objects(g)[-1]
    g[last[:, 0], last[:, 1]] = _other_colour(rng, g[tuple(last[0])])


def reshape_object(g, rng):
    last = _objects(g)[-1]
    if len(last) < 2:
        return False
    g[tuple(last[-1])] = 0


def add_object(g, rng, shape_of=0):
    obj = _objects(g)[shape_of]
    (_, _), mask = crop(obj)
    for top, left in rng.permutation([(t, l) for t in range(GRID) for l in range(GRID)]):
        if free_for(g != 0, mask, top, left):
            stamp(g, mask, top, left, g[tuple(obj[0])])
            return True
    return False


def same_shapes(g, rng):
    drop_object(g, rng)
    return add_object(g, rng)


def move_object(g, rng):
    last = _objects(g)[-1]
    colour = g[tuple(last[0])]
    g[last[:, 0], last[:, 1]] = 0
    (top, left), mask = crop(last)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        if free_for(g != 0, mask, top + dy, left + dx):
            stamp(g, mask, top + dy, left + dx, colour)
            return True
    return False


def mirror_cell(g, rng):
    y, x = int(rng.integers(GRID)), int(rng.integers(GRID // 2, GRID))
    g[y, x] = (g[y, x] + int(rng.integers(1, 8))) % 8


def mirror_half_shifted(g, rng):
    g[:, GRID // 2 :] = np.roll(g[:, GRID // 2 :], 1, axis=0)


def repeat_cell(g, rng):
    y, x = int(rng.integers(4, GRID)), int(rng.integers(GRID))
    g[y, x] = (g[y, x] + int(rng.integers(1, 8))) % 8


def repeat_tile_drift(g, rng):
    g[-4:] = np.roll(g[-4:], 1, axis=1)


CORRUPTIONS = {
    "face": [face_missing_eye, face_eye_colour, face_eye_shape, face_eye_moved, face_mouth_off_centre],
    "count_2": [drop_object, add_object, recolour_object, reshape_object],
    "count_3": [drop_object, add_object, recolour_object, reshape_object],
    "count_4": [drop_object, add_object, recolour_object, reshape_object],
    "colour_match": [recolour_object, drop_object, same_shapes],
    "mirror": [mirror_cell, mirror_half_shifted],
    "repeat": [repeat_cell, repeat_tile_drift],
    "evenly_spaced": [move_object, recolour_object, drop_object, add_object],
}
CASES = [(c, f) for c, fs in CORRUPTIONS.items() for f in fs]


def corrupted_images(train, class_name, corrupt) -> tuple[np.ndarray, int]:
    """(32 px renders of the class's train grids that ``corrupt`` changed, their label)."""
    label = CLASS_NAMES.index(class_name)
    rng = np.random.default_rng(label)
    broken = []
    for i in range(label, len(train), len(CLASS_NAMES)):
        g = train.grid(i).copy()
        original = g.copy()
        assert check_grid(original, class_name) == ""
        if corrupt(g, rng) is False or np.array_equal(g, original):
            continue  # not applicable to this sample (no free place, nothing changed)
        broken.append(render(g, 32))
    assert len(broken) >= PER_CLASS - 5
    return np.stack(broken), label


@pytest.mark.parametrize("class_name,corrupt", CASES, ids=[f"{c}-{f.__name__}" for c, f in CASES])
def test_every_corruption_scores_zero(train, class_name, corrupt):
    images, label = corrupted_images(train, class_name, corrupt)
    broken = list(images)
    scores = train.oracle.score(np.stack(broken), [label] * len(broken))
    assert not scores["correct"].any(), [r for r, c in zip(scores["reason"], scores["correct"]) if c]
    assert all(scores["reason"])


def test_relations_grid_picture_is_small(tmp_path):
    from mdtzoo.data.toy import save_relations_grid

    path = save_relations_grid(tmp_path / "grid.png")
    assert path.stat().st_size < 100_000
