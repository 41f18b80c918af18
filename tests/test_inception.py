"""The FID Inception-v3: output shapes and taps (random weights), the weights file layout and search."""

import numpy as np
import pytest
import torch
from torch import nn

from mdtzoo.metrics.inception import (
    WEIGHTS_FILES,
    InceptionExtractor,
    InceptionV3,
    find_weights,
    load_weights,
    resize_tf1,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InceptionV3().eval()


def test_forward_shapes_and_adm_taps(model):
    model.fc.bias.data.fill_(5.0)  # ADM's logits ignore the bias
    taps = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.setdefault("conv", o))
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        out = model(x)
    hook.remove()
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "pool": (2, 2048), "spatial": (2, 17 * 17 * 7), "logits": (2, 1008), "probs": (2, 1008)
    }
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(2))
    # mixed_6/conv[..., :7] in NHWC, flattened (h, w, c) as ADM's reshape does.
    conv = taps["conv"]
    assert conv.shape == (2, 192, 17, 17)
    spatial = out["spatial"].reshape(2, 17, 17, 7)
    assert torch.equal(spatial[1, 3, 5], conv[1, :7, 3, 5])
    assert torch.equal(spatial.permute(0, 3, 1, 2), conv[:, :7])


def test_state_dict_has_pytorch_fid_layout(model):
    tv = pytest.importorskip("torchvision")
    # pytorch-fid builds torchvision's Inception3 (1008 classes, no aux head) and loads its file strictly.
    ref = tv.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert len([k for k in ours if not k.endswith("num_batches_tracked")]) == 472  # 94 conv+BN, fc


@pytest.fixture(scope="module")
def randomised():
    """A module with random BatchNorm statistics too, so that a wrong load cannot pass unnoticed."""
    torch.manual_seed(1)
    m = InceptionV3()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return m


@pytest.mark.parametrize("variant", ["torch_fidelity", "dataparallel_with_counters"])
def test_loads_saved_weights_strictly(tmp_path, randomised, variant):
    state = randomised.state_dict()
    if variant == "torch_fidelity":  # its converter writes no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / WEIGHTS_FILES[0]
    torch.save(state, path)
    loaded = load_weights(InceptionV3(), path).state_dict()
    for k, v in randomised.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded[k], v), k


def test_wrong_state_dict_is_named(tmp_path):
    state = {k: v for k, v in InceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    state["Mixed_7c.branch_pool.conv.kernel"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 keys missing \(e.g. \['Mixed_7c.branch_pool.conv.weight'\]\)"):
        load_weights(InceptionV3(), path)
    state = {"fc.weight": torch.zeros(1000, 2048)}
    torch.save(state, path)
    with pytest.raises(ValueError, match="not an Inception-v3 FID state dict"):
        load_weights(InceptionV3(), path)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("MDTZOO_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_missing_weights_error_names_files_and_places(no_weights_anywhere):
    tmp = no_weights_anywhere
    with pytest.raises(FileNotFoundError) as err:
        find_weights()
    msg = str(err.value)
    for name in WEIGHTS_FILES:
        assert name in msg
    for place in (tmp / "weights", tmp / "home" / ".cache" / "mdtzoo", tmp / "torch" / "hub" / "checkpoints"):
        assert str(place / WEIGHTS_FILES[0]) in msg
    assert "never downloads" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        InceptionExtractor(weights=tmp / "nowhere.pth", device="cpu")


def test_weights_found_in_search_order(no_weights_anywhere):
    tmp = no_weights_anywhere
    cache = tmp / "home" / ".cache" / "mdtzoo"
    cache.mkdir(parents=True)
    (cache / WEIGHTS_FILES[1]).write_bytes(b"x")
    assert find_weights() == cache / WEIGHTS_FILES[1]
    (tmp / "weights").mkdir()
    (tmp / "weights" / WEIGHTS_FILES[0]).write_bytes(b"x")
    assert find_weights() == tmp / "weights" / WEIGHTS_FILES[0]
    assert find_weights(cache) == cache / WEIGHTS_FILES[1]  # a folder given explicitly


def test_extractor_loads_weights_file(tmp_path, randomised):
    path = tmp_path / WEIGHTS_FILES[1]
    torch.save(randomised.state_dict(), path)
    ex = InceptionExtractor(weights=path, device="cpu")
    assert ex.weights_path == path and "resize=tf1" in ex.describe()
    bn = ex.model.Mixed_6d.branch1x1.bn
    torch.testing.assert_close(bn.running_mean, randomised.Mixed_6d.branch1x1.bn.running_mean)


class _Stub(nn.Module):
    """Means of each channel: checks the extractor's NHWC -> NCHW plumbing without Inception's cost."""

    def forward(self, x):
        m = x.float().mean(dim=(2, 3))
        return {"pool": m, "spatial": m * 2, "logits": m, "probs": m.softmax(1)}


def test_extractor_feeds_nchw_and_returns_float32_numpy():
    images = np.zeros((3, 5, 4, 3), dtype=np.uint8)
    images[..., 0], images[..., 2] = 10, 200
    out = InceptionExtractor(model=_Stub(), device="cpu")(images)
    np.testing.assert_allclose(out["pool"], [[10, 0, 200]] * 3)
    assert set(out) == {"pool", "spatial", "probs"} and out["pool"].dtype == np.float32


def _tf1_reference(img, size):
    """TF1 ResizeBilinear written out per pixel (CPU kernel: top row, bottom row, then vertical)."""
    h, w = img.shape
    out = np.zeros((size, size), dtype=np.float32)
    sy, sx = np.float32(h / size), np.float32(w / size)
    for i in range(size):
        y = np.float32(i) * sy
        y0, y1, fy = int(np.floor(y)), min(int(np.ceil(y)), h - 1), y - np.floor(y)
        for j in range(size):
            x = np.float32(j) * sx
            x0, x1, fx = int(np.floor(x)), min(int(np.ceil(x)), w - 1), x - np.floor(x)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_resize_tf1_matches_tensorflow_formula():
    img = np.random.default_rng(0).uniform(0, 255, (7, 5)).astype(np.float32)
    for size in (3, 11, 16):
        got = resize_tf1(torch.from_numpy(img)[None, None], size)[0, 0].numpy()
        np.testing.assert_allclose(got, _tf1_reference(img, size), rtol=1e-6, atol=1e-4)
    x = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_tf1(x, 299), x)  # the graph's resize is the identity at 299
