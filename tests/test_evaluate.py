"""Reference files, npz validation and streaming, evaluate_* and ``mdtzoo eval`` (with a small fake extractor)."""

import json
import re

import gin
import numpy as np
import pytest

from mdtzoo import evaluate
from mdtzoo.launch import cli
from mdtzoo.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall
from mdtzoo.metrics.reference import check_reference, load_reference, make_reference, open_images


class FakeExtractor:
    """Deterministic stand-in for Inception: pool (B, 6), spatial (B, 5), probs (B, 4) from 4x4 colour means."""

    def __init__(self):
        rng = np.random.default_rng(123)
        self.a, self.b, self.c = rng.normal(size=(48, 6)), rng.normal(size=(48, 5)), rng.normal(size=(6, 4))
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        b, h, w, _ = images.shape
        x = images.astype(np.float64).reshape(b, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(b, -1) / 255
        pool = np.tanh(x @ self.a)
        logits = 3 * pool @ self.c
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return {"pool": pool, "spatial": np.tanh(x @ self.b), "probs": probs / probs.sum(1, keepdims=True)}


def _images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def files(tmp_path):
    samples, ref_images = _images(40, 0), _images(30, 1)
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "ref_adm.npz", ref_images)
    return tmp_path, samples, ref_images


# -- npz reading and reference files ------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "compressed", "fortran"])
def test_open_images_streams_the_array_exactly(tmp_path, layout):
    images = _images(11, 2, size=12)
    stored = np.asfortranarray(images) if layout == "fortran" else images
    (np.savez_compressed if layout == "compressed" else np.savez)(tmp_path / "x.npz", stored, np.arange(11))
    npz = open_images(tmp_path / "x.npz")
    assert len(npz) == 11 and npz.shape == (11, 12, 12, 3)
    batches = list(npz.batches(4))
    assert [len(b) for b in batches] == [4, 4, 3] and all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_1": np.zeros(3)}, r"has no arr_0 \(it holds: arr_1\)"),
        ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "has dtype float32; expected uint8"),
        ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"shape \(4, 3, 8, 8\); expected \(N, H, W, 3\) NHWC RGB \(channels first"),
        ({"arr_0": np.zeros((8, 8, 3), np.uint8)}, r"has shape \(8, 8, 3\)"),
        ({"arr_0": np.zeros((1, 8, 8, 3), np.uint8)}, "need at least 2"),
    ],
)
def test_open_images_rejects_bad_arrays(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        open_images(tmp_path / "bad.npz")


def test_open_images_missing_and_not_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples file .*nope.npz does not exist"):
        open_images(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="is not an .npz file"):
        open_images(tmp_path / "text.npz")


def test_make_reference_round_trip(tmp_path):
    images, ex = _images(25, 3), FakeExtractor()
    path = make_reference(images, ex, tmp_path / "ref.npz", batch_size=7, pr_size=10, seed=0)
    assert sorted(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert not check_reference(path)  # needs no images and no extractor
    ref = load_reference(path)
    feats = ex(images)
    mu, sigma = gaussian_stats(feats["pool"].astype(np.float32))
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-7)
    sigma_s = gaussian_stats(feats["spatial"].astype(np.float32))[1]
    np.testing.assert_allclose(ref.sigma_s, sigma_s, rtol=1e-5, atol=1e-7)
    assert ref.mu.dtype == ref.sigma_s.dtype == np.float64 and ref.sigma.shape == (6, 6) and ref.mu_s.shape == (5,)
    chosen = np.sort(np.random.default_rng(0).permutation(25)[:10])
    assert ref.pool.dtype == np.float32 and ref.pool.shape == (10, 6)
    np.testing.assert_allclose(ref.pool, feats["pool"][chosen], rtol=1e-6)
    with np.load(path) as z:
        assert int(z["num_images"]) == 25


def test_make_reference_from_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(9)
    for i, (h, w) in enumerate([(20, 30), (16, 16), (40, 24), (17, 19), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}_{i}.png")
    with pytest.raises(ValueError, match="pass image_size"):
        make_reference(tmp_path, FakeExtractor(), tmp_path / "ref.npz")
    ex = FakeExtractor()
    make_reference(tmp_path, ex, tmp_path / "ref.npz", image_size=8, batch_size=2)
    ref = load_reference(tmp_path / "ref.npz")
    assert ex.calls == 3 and ref.pool.shape == (5, 6) and ref.sigma.shape == (6, 6)


def test_adm_reference_uses_stored_stats_and_arr0_for_pr(tmp_path):
    ref_images, ex = _images(20, 4), FakeExtractor()
    stats = dict(mu=np.ones(6), sigma=np.eye(6), mu_s=np.zeros(5), sigma_s=2 * np.eye(5))
    np.savez(tmp_path / "adm.npz", arr_0=ref_images, **stats)
    assert check_reference(tmp_path / "adm.npz")
    with pytest.raises(ValueError, match="an extractor is needed"):
        load_reference(tmp_path / "adm.npz")
    ref = load_reference(tmp_path / "adm.npz", ex, batch_size=6)
    np.testing.assert_array_equal(ref.sigma_s, 2 * np.eye(5))
    np.testing.assert_allclose(ref.pool, ex(ref_images)["pool"], rtol=1e-6)
    np.savez(tmp_path / "partial.npz", arr_0=ref_images, mu=np.ones(6))
    with pytest.raises(ValueError, match="only some of mu, sigma, mu_s, sigma_s"):
        check_reference(tmp_path / "partial.npz")


# -- evaluate_* -----------------------------------------------------------------------------
def test_evaluate_arrays_matches_the_metric_functions(files):
    folder, samples, ref_images = files
    ex = FakeExtractor()
    got = evaluate.evaluate_arrays(samples, folder / "ref_adm.npz", ex, batch_size=16)
    s, r = ex(samples), ex(ref_images)
    f32 = {k: v.astype(np.float32) for k, v in s.items()}
    r32 = {k: v.astype(np.float32) for k, v in r.items()}
    assert got["fid"] == pytest.approx(frechet_distance(*gaussian_stats(f32["pool"]), *gaussian_stats(r32["pool"])))
    sfid = frechet_distance(*gaussian_stats(f32["spatial"]), *gaussian_stats(r32["spatial"]))
    assert got["sfid"] == pytest.approx(sfid)
    assert got["inception_score"] == pytest.approx(inception_score(f32["probs"]))
    assert (got["precision"], got["recall"]) == precision_recall(r32["pool"], f32["pool"])
    assert got["fid"] > 0 and 1 < got["inception_score"] < 4


def test_evaluate_npz_passes_sorted_labels_to_the_is_check(tmp_path):
    samples = _images(12, 5)
    np.savez(tmp_path / "s.npz", samples, np.repeat(np.arange(4), 3))
    make_reference(_images(10, 6), FakeExtractor(), tmp_path / "r.npz")
    gin.bind_parameter("metrics.inception_score.split_size", 6)  # two splits of 6: classes 0-1 | 2-3
    with pytest.warns(UserWarning, match="labels look sorted"):
        out = evaluate.evaluate_npz(tmp_path / "s.npz", tmp_path / "r.npz", extractor=FakeExtractor(), batch_size=5)
    assert out["num_samples"] == 12 and out["num_ref_features"] == 10


# -- mdtzoo eval ----------------------------------------------------------------------------
def _eval(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    for var, sub in (("MDTZOO_WEIGHTS", "w"), ("HOME", "home"), ("TORCH_HOME", "torch")):
        monkeypatch.setenv(var, str(tmp_path / sub))


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "samples file .*missing.npz does not exist"),
        (lambda p: np.savez(p, np.zeros((4, 8, 8, 3), np.float64)), "arr_0 has dtype float64; expected uint8"),
        (lambda p: np.savez(p, np.zeros((4, 3, 8, 8), np.uint8)), r"arr_0 has shape \(4, 3, 8, 8\)"),
    ],
)
def test_eval_bad_input_is_one_line_before_weights(files, capsys, no_weights, make, message):
    folder = files[0]
    path = folder / "missing.npz"
    if make is not None:
        make(path)
    code, out, err = _eval(capsys, path, "--ref", folder / "ref_adm.npz")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mdtzoo eval: error: ")
    assert re.search(message, err), err
    assert "weights" not in err  # inputs are checked before the weights are looked for


def test_eval_missing_weights_is_one_line(files, capsys, no_weights):
    folder = files[0]
    code, _, err = _eval(capsys, folder / "samples.npz", "--ref", folder / "ref_adm.npz")
    assert code == 2 and err.count("\n") == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "never downloads" in err


def test_eval_end_to_end_writes_json_and_refuses_to_overwrite(files, capsys, monkeypatch):
    folder, samples, _ = files
    monkeypatch.setattr(evaluate, "make_extractor", lambda *a, **k: FakeExtractor())
    code, out, err = _eval(capsys, folder / "samples.npz", "--ref", folder / "ref_adm.npz", "--batch-size", "9")
    assert code == 0, err
    expected = evaluate.evaluate_arrays(samples, folder / "ref_adm.npz", FakeExtractor())
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert float(lines[1].split(": ")[1]) == pytest.approx(expected["fid"])
    path = folder / "samples_eval_ref_adm.json"
    assert lines[-1] == f"wrote {path}"
    record = json.loads(path.read_text())
    assert {k: record[k] for k in expected} == pytest.approx(expected)
    assert record["num_samples"] == 40 and record["num_ref_features"] == 30

    path.write_text('{"fid": 1.0}')  # a finished result must survive a second run
    code, _, err = _eval(capsys, folder / "samples.npz", "--ref", folder / "ref_adm.npz")
    assert code == 2 and "already exists; pass --force" in err
    assert json.loads(path.read_text()) == {"fid": 1.0}
    code, _, _ = _eval(capsys, folder / "samples.npz", "--ref", folder / "ref_adm.npz", "--out", folder / "o")
    assert code == 0 and (folder / "o" / "samples_eval_ref_adm.json").is_file()
    code, _, _ = _eval(capsys, folder / "samples.npz", "--ref", folder / "ref_adm.npz", "--force")
    assert code == 0 and json.loads(path.read_text())["fid"] == pytest.approx(expected["fid"])
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".tmp") == []


def test_write_results_refuses_existing(tmp_path):
    path = evaluate.write_results({"fid": 2.0}, tmp_path / "r.json")
    with pytest.raises(FileExistsError):
        evaluate.write_results({"fid": 3.0}, path)
    evaluate.write_results({"fid": 3.0}, path, force=True)
    assert json.loads(path.read_text()) == {"fid": 3.0}
