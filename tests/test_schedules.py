"""Noise schedules and loss weightings: closed forms, and invariants over every registered entry."""

import gin
import numpy as np
import pytest
import torch

from mdtzoo.diffusion import build_diffusion
from mdtzoo.registry import GUIDANCE, SAMPLERS, SCHEDULE, WEIGHTING
from mdtzoo.schedules import alphas_cumprod
from mdtzoo.schedules.weighting import PREDICTIONS


@pytest.mark.parametrize("name", SCHEDULE.names())
@pytest.mark.parametrize("steps", [1000, 250, 50])
def test_every_schedule_is_a_valid_float64_schedule(name, steps):
    betas = SCHEDULE.build(name, num_steps=steps)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (steps,)
    assert ((betas > 0) & (betas < 1)).all()
    ac = alphas_cumprod(betas)
    assert (np.diff(ac) < 0).all() and 0 < ac[-1] < ac[0] < 1


def test_linear_endpoints_and_iddpm_rescaling():
    b = SCHEDULE.build("linear", num_steps=1000)
    assert b[0] == 1e-4 and b[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    # IDDPM: other T scale both ends by 1000/T, e.g. T=250 -> 4e-4 .. 0.08.
    b250 = SCHEDULE.build("linear", num_steps=250)
    assert b250[0] == pytest.approx(4e-4, rel=1e-12) and b250[-1] == pytest.approx(0.08, rel=1e-12)


def test_linear_alphas_cumprod_closed_form():
    b = SCHEDULE.build("linear", num_steps=1000)
    t = np.arange(1000)
    # ᾱ_t = exp(Σ_{s<=t} log(1 - β_s)) with β_s = 1e-4 + s·Δ, summed independently of cumprod.
    expected = np.array([np.exp(np.sum(np.log1p(-(1e-4 + np.arange(k + 1) * (0.0199 / 999))))) for k in t])
    assert np.allclose(alphas_cumprod(b), expected, rtol=1e-12, atol=0)
    assert alphas_cumprod(b)[-1] == pytest.approx(4.0358e-5, rel=1e-4)


def test_cosine_matches_its_alpha_bar_and_caps_at_max_beta():
    T, s = 1000, 0.008
    b = SCHEDULE.build("cosine", num_steps=T)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    ac = alphas_cumprod(b)
    uncapped = b < 0.999
    # Where no beta was capped, ᾱ_t = f((t+1)/T) / f(0).
    last = np.argmin(uncapped)
    t = np.arange(last)
    assert np.allclose(ac[t], f((t + 1) / T) / f(0), rtol=1e-9)
    assert b.max() == 0.999 and b[-1] == 0.999
    with gin.unlock_config():
        gin.bind_parameter("schedule.cosine.max_beta", 0.5)
    assert SCHEDULE.build("cosine", num_steps=T).max() == 0.5


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = SCHEDULE.build("scaled_linear", num_steps=1000)
    r = np.sqrt(b)
    assert r[0] == pytest.approx(0.00085**0.5) and r[-1] == pytest.approx(0.012**0.5)
    assert np.allclose(np.diff(r), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-10)


SNRS = torch.tensor([1e-6, 1e-3, 0.2, 1.0, 4.99, 5.0, 5.01, 1e2, 1e4, 1e6])


@pytest.mark.parametrize("name", WEIGHTING.names())
@pytest.mark.parametrize("predict", PREDICTIONS)
def test_every_weighting_is_finite_and_non_negative(name, predict):
    w = WEIGHTING.build(name)(SNRS, predict)
    assert w.shape == SNRS.shape and torch.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("name", WEIGHTING.names())
def test_every_weighting_rejects_an_unknown_target(name):
    with pytest.raises(ValueError, match="eps"):
        WEIGHTING.build(name)(SNRS, "score")


def test_min_snr_targets():
    w = WEIGHTING.build("min_snr")
    m = torch.clamp(SNRS, max=5.0)
    assert torch.allclose(w(SNRS, "x0"), m)
    assert torch.allclose(w(SNRS, "eps"), m / SNRS)
    assert torch.allclose(w(SNRS, "v"), m / (SNRS + 1))
    with gin.unlock_config():
        gin.bind_parameter("weighting.min_snr.gamma", 1.0)
    assert WEIGHTING.build("min_snr").gamma == 1.0


def test_min_snr_eps_weight_is_one_from_t_130_under_the_linear_schedule():
    """MDT v2: min(snr, 5)/snr = 1 for t >= 130 (snr_129 = 5.0647 > 5 >= snr_130 = 4.9832)."""
    d = build_diffusion(weighting="min_snr")
    t = torch.arange(1000)
    snr = d.snr_at(t)
    assert snr[129].item() == pytest.approx(5.064714, rel=1e-5)
    assert snr[130].item() == pytest.approx(4.983211, rel=1e-5)
    w = d.weighting(snr, "eps")
    assert (w[130:] == 1).all() and (w[:130] < 1).all()
    assert w[0].item() == pytest.approx(5 * (1 - 0.9999) / 0.9999, rel=1e-4)  # 5/snr_0


def test_snr_trunc():
    w = WEIGHTING.build("snr_trunc")
    assert torch.allclose(w(SNRS, "x0"), torch.clamp(SNRS, min=1.0))
    assert torch.allclose(w(SNRS, "eps"), torch.clamp(1.0 / SNRS, min=1.0))
    assert torch.allclose(w(SNRS, "v"), torch.clamp(SNRS, min=1.0) / (SNRS + 1))


def test_uniform_is_one():
    assert (WEIGHTING.build("uniform")(SNRS, "v") == 1).all()


@pytest.mark.parametrize("registry", [SCHEDULE, WEIGHTING, SAMPLERS, GUIDANCE], ids=lambda r: r.family)
def test_every_component_has_a_one_line_description(registry):
    described = registry.describe()
    assert len(described) == len(registry) > 0
    for qualified, line in described:
        assert qualified.startswith(registry.family + ".") and 10 < len(line) <= 110, qualified
