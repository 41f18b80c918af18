"""Samplers: determinism, closed-form steps, and correct marginals with an exact ε oracle.

For Gaussian data x0 ~ N(μ, s²) (elementwise) the optimal ε-predictor is known in closed
form: E[ε | x_t] = sqrt(1-ᾱ)(x_t - sqrt(ᾱ)μ) / (ᾱs² + 1 - ᾱ). A correct sampler driven by
it must return samples with mean μ and standard deviation s.
"""

import math

import numpy as np
import pytest
import torch

from mdtzoo.diffusion import build_diffusion
from mdtzoo.registry import SAMPLERS

MU, S = 0.5, 0.8
BASE_AC = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float64)


def oracle(learn_sigma=False, mu=MU, s=S):
    """Exact ε for N(mu, s²) data under the linear T=1000 schedule; t are original steps."""

    def model_fn(x, t, **kwargs):
        ac = BASE_AC[t].reshape(-1, 1, 1, 1)
        eps = ((1 - ac).sqrt() * (x.double() - ac.sqrt() * mu) / (ac * s * s + 1 - ac)).float()
        # v = 0: the variance half-way (in log) between β̃ and β.
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model_fn


SHAPE = (2048, 1, 2, 4)  # 16384 values: std error of the mean 0.006, of the std ~0.5%


def _run(name, diffusion, model_fn, seed=0, shape=SHAPE, **options):
    return SAMPLERS.build(name, **options)(diffusion, model_fn, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_is_deterministic_given_its_generator(name):
    d = build_diffusion(respacing="10")
    options = {"num_steps": 5} if name not in ("ddpm", "ddim") else {}
    a = _run(name, d, oracle(True), seed=1, shape=(3, 2, 4, 4), **options)
    b = _run(name, d, oracle(True), seed=1, shape=(3, 2, 4, 4), **options)
    c = _run(name, d, oracle(True), seed=2, shape=(3, 2, 4, 4), **options)
    assert a.shape == (3, 2, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_is_batch_independent_with_per_sample_generators(name):
    d = build_diffusion(respacing="10")
    options = {"num_steps": 5} if name not in ("ddpm", "ddim") else {}
    sampler = SAMPLERS.build(name, **options)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = sampler(d, oracle(True), (4, 1, 2, 2), generator=gens(range(4)))
    parts = [sampler(d, oracle(True), (2, 1, 2, 2), generator=gens(r)) for r in (range(2), range(2, 4))]
    assert torch.allclose(whole, torch.cat(parts), atol=1e-6)


def test_ddpm_draws_all_step_noise_from_the_generator():
    d = build_diffusion(respacing="5")
    torch.manual_seed(0)
    a = _run("ddpm", d, oracle(True), shape=(2, 1, 2, 2))
    torch.manual_seed(1)  # the global RNG must not matter
    b = _run("ddpm", d, oracle(True), shape=(2, 1, 2, 2))
    assert torch.equal(a, b)


def test_ddim_step_equals_the_closed_form():
    d = build_diffusion(respacing="ddim50", learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2, 2, generator=g)
    i = 30  # index 30 -> original step 600, previous kept step 580
    t = torch.full((3,), i)
    got = d.ddim_sample(oracle(), x, t, eta=0.0)
    ac, ac_prev = BASE_AC[600], BASE_AC[580]
    eps = oracle()(x, torch.full((3,), 600)).double()
    x0 = (x.double() - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
    expected = math.sqrt(ac_prev) * x0 + math.sqrt(1 - ac_prev) * eps
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # eta = 1 with given noise z adds sigma·z, sigma² = (1-ᾱ')/(1-ᾱ)·(1-ᾱ/ᾱ').
    z = torch.randn(3, 1, 2, 2, generator=g)
    sigma = math.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
    expected1 = math.sqrt(ac_prev) * x0 + math.sqrt(1 - ac_prev - sigma**2) * eps + sigma * z.double()
    assert torch.allclose(d.ddim_sample(oracle(), x, t, eta=1.0, noise=z).double(), expected1, atol=1e-5)


@pytest.mark.parametrize(
    "name,respacing,learn_sigma,options,std_tol",
    [
        ("ddpm", "100", True, {}, 0.03),
        ("ddpm", "100", False, {}, 0.03),
        ("ddim", "250", False, {}, 0.02),
        ("dpm_solver", None, True, {"num_steps": 20}, 0.02),
        ("unipc", None, False, {"num_steps": 20}, 0.02),
        ("euler", None, False, {"num_steps": 50}, 0.06),
    ],
)
def test_samplers_with_the_exact_oracle_reach_the_data_distribution(name, respacing, learn_sigma, options, std_tol):
    d = build_diffusion(respacing=respacing, learn_sigma=learn_sigma)
    x = _run(name, d, oracle(learn_sigma), **options)
    assert x.mean().item() == pytest.approx(MU, abs=0.025)
    assert x.std().item() == pytest.approx(S, rel=std_tol)


def test_dpm_solver_beats_ddim_at_20_steps():
    """The reason for the bridge: at 20 steps DPM-Solver++ is far closer than DDIM."""
    dpm = _run("dpm_solver", build_diffusion(learn_sigma=False), oracle(), num_steps=20)
    ddim = _run("ddim", build_diffusion(respacing="ddim20", learn_sigma=False), oracle())
    assert abs(dpm.std().item() - S) < 0.3 * abs(ddim.std().item() - S)


def test_bridge_uses_the_unrespaced_betas_and_original_timesteps():
    seen = []

    def model_fn(x, t, **kwargs):
        seen.append(t[0].item())
        return oracle()(x, t)

    SAMPLERS.build("dpm_solver", num_steps=10)(build_diffusion(respacing="50", learn_sigma=False),
                                               model_fn, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert seen == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def test_bridge_follows_the_prediction_target():
    d = build_diffusion(predict="x0", learn_sigma=False)
    x0_oracle = lambda x, t, **k: ((x - (1 - BASE_AC[t].reshape(-1, 1, 1, 1)).sqrt().float()  # noqa: E731
                                    * oracle()(x, t)) / BASE_AC[t].reshape(-1, 1, 1, 1).sqrt().float())
    x = _run("dpm_solver", d, x0_oracle, num_steps=20)
    assert x.std().item() == pytest.approx(S, rel=0.02)


def test_sampler_options_are_gin_bindable():
    import gin

    gin.parse_config(["samplers.ddim.eta = 0.5", "samplers.dpm_solver.num_steps = 7"])
    assert SAMPLERS.build("ddim").eta == 0.5 and SAMPLERS.build("dpm_solver").num_steps == 7


def test_given_noise_is_the_start():
    d = build_diffusion(respacing="1", learn_sigma=False)
    noise = torch.randn(2, 1, 2, 2)
    # One step at t=0 from x: the result is the model's posterior mean at t=0.
    x = SAMPLERS.build("ddim")(d, oracle(), noise.shape, noise=noise)
    assert torch.allclose(x, d.p_from_output(oracle()(noise, torch.zeros(2, dtype=torch.long)), noise, torch.zeros(2, dtype=torch.long))["pred_x0"], atol=1e-5)
    with pytest.raises(ValueError, match="noise has shape"):
        SAMPLERS.build("ddim")(d, oracle(), (3, 1, 2, 2), noise=noise)


def test_per_sample_noise_is_each_generators_own_draw():
    """randn with B generators: row i is generator i's draw, whatever the batch (one device copy)."""
    from mdtzoo.diffusion import randn

    gens = [torch.Generator().manual_seed(s) for s in (3, 1, 4)]
    got = randn((3, 2, 5), gens, device="cpu")
    for row, s in zip(got, (3, 1, 4)):
        assert torch.equal(row, torch.randn(2, 5, generator=torch.Generator().manual_seed(s)))
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        randn((3, 2), gens[:2])
