"""Metric maths against closed forms and brute force: Fréchet distance, Inception Score, precision/recall."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdtzoo.metrics import (
    RunningGaussian,
    class_sorted_gap,
    frechet_distance,
    gaussian_stats,
    inception_score,
    manifold_radii,
    precision_recall,
)
from mdtzoo.metrics.suite import ADM_SUITE, Features
from mdtzoo.metrics.reference import Reference
from mdtzoo.registry import METRICS, first_line


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _exact_fd(mu1, s1, mu2, s2):
    """Eigen-based FD: tr sqrt(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)), valid for any PSD pair."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * tr


# -- Fréchet distance ---------------------------------------------------------------------
@given(dim=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_frechet_diagonal_closed_form(dim, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    v1, v2 = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_frechet_general_covariances_identity_and_symmetry():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 20)), rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.3 + 0.5
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(_exact_fd(mu1, s1, mu2, s2), rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_singular_covariances_take_the_eps_fallback():
    rng = np.random.default_rng(1)
    # 6 samples in 10 dims: both covariances have rank 5 (the product is singular).
    (mu1, s1), (mu2, s2) = gaussian_stats(rng.normal(size=(6, 10))), gaussian_stats(rng.normal(size=(6, 10)) + 1)
    assert np.linalg.matrix_rank(s1) == 5
    with pytest.warns(UserWarning, match="singular"):
        fd = frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert np.isfinite(fd)
    eye = np.eye(10) * 1e-6  # ADM: traces of the raw covariances, sqrt of the offset product
    with_offset = _exact_fd(mu1, s1 + eye, mu2, s2 + eye) - 2 * 10 * 1e-6
    assert fd == pytest.approx(with_offset, rel=1e-7)
    assert fd == pytest.approx(_exact_fd(mu1, s1, mu2, s2), abs=0.05)


def test_frechet_full_rank_no_warning_and_shape_errors():
    rng = np.random.default_rng(2)
    mu, s = gaussian_stats(rng.normal(size=(100, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(mu, s, mu + 1, s)
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(mu, s, mu[:4], s[:4, :4])


def test_running_gaussian_matches_np_cov_far_from_origin():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(257, 7)) + 1e4  # a large mean: the naive E[xx]-mumu would cancel
    stats = RunningGaussian()
    for start in range(0, len(x), 50):
        stats.update(x[start : start + 50])
    mu, sigma = stats.stats()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)


# -- Inception Score ----------------------------------------------------------------------
def _adm_is(probs, split_size):
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores)


def test_inception_score_uniform_is_one_and_matches_adm_formula():
    assert inception_score(np.full((30, 8), 1 / 8), split_size=10) == pytest.approx(1.0, abs=1e-12)
    probs = np.random.default_rng(4).dirichlet(np.full(12, 0.3), size=95) + 1e-12
    probs /= probs.sum(1, keepdims=True)
    assert inception_score(probs, split_size=20) == pytest.approx(_adm_is(probs, 20), rel=1e-10)


def test_inception_score_confident_distinct_predictions_equal_class_count():
    classes = 10
    onehot = np.eye(classes)[np.tile(np.arange(classes), 4)]  # every split of 10 holds each class once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shuffled-like order must not warn
        assert inception_score(onehot, split_size=classes) == pytest.approx(classes, rel=1e-12)


def test_inception_score_class_sorted_order_warns_and_is_deflated():
    classes = 10
    sorted_labels = np.repeat(np.arange(classes), 4)  # 0,0,0,0,1,1,...: two splits of 20, 5 classes each
    with pytest.warns(UserWarning, match="sorted by class"):
        score = inception_score(np.eye(classes)[sorted_labels], split_size=20)
    assert score == pytest.approx(5.0, rel=1e-12)
    assert class_sorted_gap(sorted_labels, 20) == pytest.approx(np.log(2), abs=0.2)
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(classes, 0.5), size=40)
    with pytest.warns(UserWarning, match="labels look sorted"):
        inception_score(probs, split_size=20, labels=sorted_labels)


def test_random_order_does_not_warn():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(100, 0.05), size=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inception_score(probs, split_size=5000, labels=rng.integers(0, 100, 20_000))
    assert abs(class_sorted_gap(probs, 5000)) < 0.05


# -- precision / recall -------------------------------------------------------------------
def _brute_force_pr(real, fake, k):
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(d2(real, real), axis=1)[:, k]  # self at distance 0 is position 0
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    d = d2(real, fake)
    precision = (d <= r_real[:, None]).any(axis=0).mean()
    recall = (d <= r_fake[None, :]).any(axis=1).mean()
    return precision, recall


@given(
    n_real=st.integers(5, 40), n_fake=st.integers(5, 40), dim=st.integers(1, 6), k=st.integers(1, 4),
    batch=st.integers(1, 50), seed=st.integers(0, 2**32 - 1),
)
def test_precision_recall_matches_brute_force(n_real, n_fake, dim, k, batch, seed):
    # Small integer features: float32 distances are exact, so ties (which `<=` decides) really occur.
    rng = np.random.default_rng(seed)
    real = rng.integers(-4, 5, (n_real, dim)).astype(np.float32)
    fake = (rng.integers(-4, 5, (n_fake, dim)) + rng.integers(0, 2)).astype(np.float32)
    assert precision_recall(real, fake, k=k, batch_size=batch) == pytest.approx(_brute_force_pr(real, fake, k), abs=0)


def test_precision_recall_identical_sets_and_batch_size_invariance():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(300, 32)).astype(np.float32), rng.normal(0.3, 1.1, (250, 32)).astype(np.float32)
    assert precision_recall(real, real) == (1.0, 1.0)
    results = {precision_recall(real, fake, k=3, batch_size=b) for b in (7, 64, 10_000)}
    assert len(results) == 1
    p, r = results.pop()
    assert (p, r) == pytest.approx(_brute_force_pr(real, fake, 3), abs=0)
    assert 0 < p < 1 and 0 < r < 1


def test_manifold_radius_counts_self_as_first_neighbour():
    x = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    # k=1: the nearest other point; k=2: the second nearest (squared distances).
    np.testing.assert_array_equal(manifold_radii(x, k=1), [1, 1, 4, 16])
    np.testing.assert_array_equal(manifold_radii(x, k=2, batch_size=1), [9, 4, 9, 36])
    with pytest.raises(ValueError, match="more than k=4"):
        manifold_radii(x, k=4)


# -- the registered suite -----------------------------------------------------------------
def test_registered_metrics_have_docs_and_compute_the_suite():
    assert set(ADM_SUITE) <= set(METRICS.names())
    assert all(first_line(METRICS.get(n)) for n in METRICS.names())
    rng = np.random.default_rng(8)
    pool, spatial = rng.normal(size=(60, 4)), rng.normal(size=(60, 3))
    probs = rng.dirichlet(np.ones(5), size=60)
    feats = Features(pool=pool, spatial=spatial, probs=probs)
    ref_pool = rng.normal(0.2, 1, (50, 4))
    ref = Reference(*gaussian_stats(ref_pool), *gaussian_stats(spatial[::-1] + 1), pool=ref_pool)
    out = {}
    for name in ADM_SUITE:
        out.update(METRICS.build(name, samples=feats, ref=ref))
    assert out["fid"] == pytest.approx(frechet_distance(*gaussian_stats(pool), ref.mu, ref.sigma))
    assert out["sfid"] == pytest.approx(frechet_distance(*gaussian_stats(spatial), ref.mu_s, ref.sigma_s))
    assert out["inception_score"] == pytest.approx(inception_score(probs))
    assert (out["precision"], out["recall"]) == precision_recall(ref_pool, pool)
