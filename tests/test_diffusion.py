"""Gaussian diffusion: tables vs closed forms, KL / NLL vs scipy, the hybrid loss, respacing."""

import math

import gin
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from mdtzoo.diffusion import GaussianDiffusion, build_diffusion, respace_betas, space_timesteps
from mdtzoo.diffusion.losses import discretized_gaussian_log_likelihood, flat_mean, normal_kl, token_weight
from mdtzoo.registry import SCHEDULE
from mdtzoo.schedules import alphas_cumprod


def linear_betas(T=1000):
    return np.linspace(1e-4, 0.02, T)


# -- tables -------------------------------------------------------------------------------
def test_alphas_cumprod_and_posterior_variance_closed_forms():
    d = build_diffusion()
    b = linear_betas()
    ac = np.cumprod(1 - b)
    assert np.array_equal(d.alphas_cumprod, ac)
    t = np.arange(1, 1000)
    assert np.allclose(d.posterior_variance[t], b[t] * (1 - ac[t - 1]) / (1 - ac[t]), rtol=1e-12)
    assert d.posterior_variance[0] == 0
    # Clipped log variance: β̃_1 stands in for β̃_0 = 0.
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_log_variance_clipped[1] == pytest.approx(np.log(b[1] * b[0] / (1 - ac[1])), rel=1e-13)


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_q_posterior_is_the_bayes_posterior(t):
    """q(x_{t-1}|x_t,x0) ∝ N(x_{t-1}; sqrt(ᾱ_{t-1})x0, 1-ᾱ_{t-1}) · N(x_t; sqrt(α_t)x_{t-1}, β_t)."""
    d = build_diffusion()
    b = linear_betas()
    ac = np.cumprod(1 - b)
    ac_prev = 1.0 if t == 0 else ac[t - 1]
    x0, xt = 0.7, -1.3
    precision = 1 / (1 - ac_prev) + (1 - b[t]) / b[t] if t > 0 else math.inf
    if t > 0:
        var = 1 / precision
        mean = var * (math.sqrt(ac_prev) * x0 / (1 - ac_prev) + math.sqrt(1 - b[t]) * xt / b[t])
    else:
        var, mean = 0.0, x0  # x_{-1} := x0 deterministically
    m, v, _ = d.q_posterior(torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), xt), torch.tensor([t]))
    assert m.item() == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert v.item() == pytest.approx(var, rel=1e-5, abs=1e-12)


@given(t=st.integers(0, 999), schedule=st.sampled_from(SCHEDULE.names()))
def test_q_sample_preserves_unit_variance(t, schedule):
    d = build_diffusion(schedule=schedule)
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(256, 4, 16, 16, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = d.q_sample(x0, torch.full((256,), t), noise)
    # 262144 draws: the variance estimate has standard error ~ sqrt(2/n) = 0.0028.
    assert xt.var().item() == pytest.approx(1.0, abs=0.015)
    assert xt.mean().item() == pytest.approx(0.0, abs=0.01)


@given(v=st.floats(-1, 1), t=st.integers(0, 999), schedule=st.sampled_from(SCHEDULE.names()))
def test_learned_variance_lies_between_posterior_variance_and_beta(v, t, schedule):
    d = build_diffusion(schedule=schedule)
    tt = torch.tensor([t])
    log_var = d.log_variance(torch.full((1, 1, 1, 1), v), tt, 4).item()
    lo, hi = sorted([d.posterior_log_variance_clipped[t], np.log(d.betas[t])])
    assert lo - 1e-5 <= log_var <= hi + 1e-5


def test_learned_variance_endpoints():
    d = build_diffusion()
    t = torch.tensor([0, 1, 500, 999])
    ones = torch.ones(4, 1, 1, 1)
    assert torch.allclose(d.log_variance(ones, t, 4).flatten(), torch.tensor(np.log(d.betas[[0, 1, 500, 999]])).float())
    lo = d.log_variance(-ones, t, 4).flatten()
    assert torch.allclose(lo, torch.tensor(d.posterior_log_variance_clipped[[0, 1, 500, 999]]).float())


# -- KL and discretised NLL ---------------------------------------------------------------
@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, -4.0, 0.9, -3.5)])
def test_normal_kl_matches_numerical_integration(m1, lv1, m2, lv2):
    p, q = stats.norm(m1, math.exp(lv1 / 2)), stats.norm(m2, math.exp(lv2 / 2))
    s1 = math.exp(lv1 / 2)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * s1, m1 + 12 * s1)
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_discretized_nll_matches_the_gaussian_cdf():
    x = torch.tensor([-1.0, -1 + 2 / 255, -0.2, 0.0, 0.5, 1 - 2 / 255, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -1.0, 0.1, 0.01, 0.45, 0.9, 0.97], dtype=torch.float64)
    log_scales = torch.tensor([-2.0, -3.0, -1.0, -5.0, -2.5, -1.5, -4.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    expected = []
    for xi, mi, ls in zip(x.tolist(), means.tolist(), log_scales.tolist()):
        dist = stats.norm(mi, math.exp(ls))
        if xi < -0.999:
            p = dist.cdf(xi + 1 / 255)
        elif xi > 0.999:
            p = dist.sf(xi - 1 / 255)
        else:
            p = dist.cdf(xi + 1 / 255) - dist.cdf(xi - 1 / 255)
        expected.append(math.log(p))
    assert np.allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The 256 bins partition the line: their probabilities sum to 1.
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    total = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, 0.3), torch.full_like(levels, -1.2))
    assert total.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_flat_mean_weighted():
    x = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    assert torch.equal(flat_mean(x), x.mean(dim=(1, 2, 3)))
    assert torch.equal(flat_mean(x, torch.ones(2, 1, 2, 2)), x.mean(dim=(1, 2, 3)))
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0, 0, 1] = 1  # sample 0: one position, both channels; sample 1: nothing selected
    assert torch.equal(flat_mean(x, w), torch.tensor([(x[0, 0, 0, 1] + x[0, 1, 0, 1]).item() / 2, 0.0]))


def test_token_weight_from_a_token_mask():
    mask = torch.tensor([[0, 1, 0, 0, 0, 1]])  # grid 2 x 3, tokens row-major
    w = token_weight(mask, (2, 3), patch_size=2)
    assert w.shape == (1, 1, 4, 6)
    assert w[0, 0].tolist() == [[0, 0, 1, 1, 0, 0]] * 2 + [[0, 0, 0, 0, 1, 1]] * 2


# -- the hybrid loss ----------------------------------------------------------------------
class FixedOutput(torch.nn.Module):
    """Returns a fixed (trainable) output and records the timesteps it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)
        self.seen_t = []

    def forward(self, x, t, y=None):
        self.seen_t.append(t.clone())
        return self.out


def _batch(B=4, C=4, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, H, generator=g) * 2 - 1
    noise = torch.randn(B, C, H, H, generator=g)
    out = torch.randn(B, 2 * C, H, H, generator=g)
    out[:, C:] = out[:, C:].tanh()
    return x0, noise, out


def test_training_losses_equal_the_hybrid_formula():
    d = build_diffusion()
    x0, noise, out = _batch()
    t = torch.tensor([0, 1, 500, 999])
    model = FixedOutput(out.clone())
    terms = d.training_losses(model, x0, t, noise=noise)
    eps, v = out[:, :4].double(), out[:, 4:].double()
    x0d, nd = x0.double(), noise.double()
    assert torch.allclose(terms["mse"], ((nd - eps) ** 2).mean(dim=(1, 2, 3)).float(), rtol=1e-6)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])

    # Independent float64 vb: posterior of the model's x0 estimate vs the true posterior.
    b = linear_betas()
    ac = np.cumprod(1 - b)
    for i, ti in enumerate(t.tolist()):
        acp = 1.0 if ti == 0 else ac[ti - 1]
        xt = math.sqrt(ac[ti]) * x0d[i] + math.sqrt(1 - ac[ti]) * nd[i]
        x0_hat = (xt - math.sqrt(1 - ac[ti]) * eps[i]) / math.sqrt(ac[ti])
        c1, c2 = b[ti] * math.sqrt(acp) / (1 - ac[ti]), (1 - acp) * math.sqrt(1 - b[ti]) / (1 - ac[ti])
        mean_model = c1 * x0_hat + c2 * xt
        post_var = b[ti] * (1 - acp) / (1 - ac[ti])
        small = b[1] * b[0] / (1 - ac[1]) if ti == 0 else post_var
        log_var = (v[i] + 1) / 2 * math.log(b[ti]) + (1 - v[i]) / 2 * math.log(small)
        if ti == 0:
            sd = torch.exp(0.5 * log_var)
            lo = torch.where(x0d[i] < -0.999, torch.zeros_like(sd), torch.special.ndtr((x0d[i] - 1 / 255 - mean_model) / sd))
            hi = torch.where(x0d[i] > 0.999, torch.ones_like(sd), torch.special.ndtr((x0d[i] + 1 / 255 - mean_model) / sd))
            expected = -torch.log((hi - lo).clamp(min=1e-12)).mean() / math.log(2)
        else:
            true_mean = c1 * x0d[i] + c2 * xt
            kl = 0.5 * (-1 + log_var - math.log(post_var) + post_var / log_var.exp()
                        + (true_mean - mean_model) ** 2 / log_var.exp())
            expected = kl.mean() / math.log(2)
        assert terms["vb"][i].item() == pytest.approx(expected.item(), rel=2e-3, abs=1e-5), ti


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    d = build_diffusion()
    x0, noise, out = _batch()
    t = torch.tensor([0, 3, 400, 900])
    model = FixedOutput(out.clone())
    d.training_losses(model, x0, t, noise=noise)["vb"].sum().backward()
    assert (model.out.grad[:, :4] == 0).all() and (model.out.grad[:, 4:] != 0).any()
    model.out.grad = None
    d.training_losses(model, x0, t, noise=noise)["mse"].sum().backward()
    assert (model.out.grad[:, 4:] == 0).all() and (model.out.grad[:, :4] != 0).any()


def test_token_weight_restricts_every_mean_to_the_weighted_positions():
    d = build_diffusion()
    x0, noise, out = _batch()
    t = torch.tensor([0, 5, 300, 800])
    model = FixedOutput(out)
    full = d.training_losses(model, x0, t, noise=noise)
    ones = d.training_losses(model, x0, t, noise=noise, token_weight=torch.ones(4, 1, 4, 4))
    for k in ("mse", "vb", "loss"):
        assert torch.allclose(full[k], ones[k], rtol=1e-6)
    w = torch.zeros(4, 1, 4, 4)
    w[:, :, :2, :] = 1  # the top half of each image
    top = d.training_losses(model, x0, t, noise=noise, token_weight=w)
    expected_mse = ((noise - out[:, :4]) ** 2)[:, :, :2, :].mean(dim=(1, 2, 3))
    assert torch.allclose(top["mse"], expected_mse, rtol=1e-6)
    # The vb of the top half alone: run the same loss on the cropped tensors.
    crop = FixedOutput(out[:, :, :2, :])
    cropped = d.training_losses(crop, x0[:, :, :2, :], t, noise=noise[:, :, :2, :])
    assert torch.allclose(top["vb"], cropped["vb"], rtol=1e-5)


def test_weighting_scales_the_mse_term():
    d = build_diffusion(weighting="min_snr")
    x0, noise, out = _batch()
    t = torch.tensor([0, 50, 129, 130])
    terms = d.training_losses(FixedOutput(out), x0, t, noise=noise)
    snr = torch.tensor(d.snr[[0, 50, 129, 130]]).float()
    assert torch.allclose(terms["weight"], torch.clamp(snr, max=5) / snr)
    assert terms["weight"][3] == 1 and terms["weight"][2] < 1
    assert torch.allclose(terms["mse"], terms["weight"] * terms["mse_raw"])


@pytest.mark.parametrize("predict", ["eps", "x0", "v"])
def test_every_parametrisation_recovers_x0_from_its_exact_target(predict):
    d = build_diffusion(predict=predict, learn_sigma=False)
    x0, noise, _ = _batch()
    t = torch.tensor([1, 10, 500, 999])
    xt = d.q_sample(x0, t, noise)
    p = d.p_from_output(d.target(x0, t, noise), xt, t)
    assert torch.allclose(p["pred_x0"], x0, atol=2e-3 if predict == "eps" else 1e-5)
    terms = d.training_losses(lambda x, tt, **k: d.target(x0, t, noise), x0, t, noise=noise)
    assert torch.allclose(terms["loss"], torch.zeros(4)) and (terms["vb"] == 0).all()


def test_fixed_variances():
    large = build_diffusion(learn_sigma=False)
    small = build_diffusion(learn_sigma=False, sigma_small=True)
    t = torch.tensor([0, 1, 999])
    assert torch.allclose(large.log_variance(None, t, 1), torch.tensor(np.log([large.posterior_variance[1], large.betas[1], large.betas[999]])).float())
    assert torch.allclose(small.log_variance(None, t, 1), torch.tensor(small.posterior_log_variance_clipped[[0, 1, 999]]).float())


def test_wrong_output_channels_name_both_sides():
    d = build_diffusion()
    with pytest.raises(ValueError, match="4 channels; expected 8"):
        d.training_losses(lambda x, t, **k: x, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]))


# -- respacing ----------------------------------------------------------------------------
def test_respacing_250_keeps_iddpm_steps_exactly():
    kept = space_timesteps(1000, "250")
    # IDDPM: fractional stride 999/249 from 0, Python round(); computed here in one multiply.
    assert kept == [round(i * 999 / 249) for i in range(250)]
    assert kept[:5] == [0, 4, 8, 12, 16] and kept[-3:] == [991, 995, 999]
    assert len(kept) == 250


def test_respacing_ddim_and_sections():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")
    # Three sections of 334, 333, 333 steps starting at 0, 334, 667.
    expected = [round(i * 333 / 9) for i in range(10)] + [334 + round(i * 332 / 14) for i in range(15)] \
        + [667 + round(i * 332 / 19) for i in range(20)]
    assert space_timesteps(1000, "10,15,20") == sorted(expected)
    assert space_timesteps(1000, "1") == [0]  # IDDPM: a one-step section keeps its start
    with pytest.raises(ValueError):
        space_timesteps(1000, "1001")


@given(T=st.integers(2, 2000), data=st.data())
def test_respacing_is_sorted_unique_and_spans_the_chain(T, data):
    n = data.draw(st.integers(2, T))
    kept = space_timesteps(T, str(n))
    assert len(kept) == n and kept == sorted(set(kept))
    assert kept[0] == 0 and kept[-1] == T - 1


def test_respacing_all_n_for_t_1000():
    for n in range(2, 1001):
        kept = space_timesteps(1000, n)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == 999


def test_respaced_betas_keep_alphas_cumprod_at_kept_steps():
    b = linear_betas()
    kept = space_timesteps(1000, "250")
    assert np.allclose(alphas_cumprod(respace_betas(b, kept)), alphas_cumprod(b)[kept], rtol=1e-12)
    d = build_diffusion(respacing="250")
    assert d.num_timesteps == 250
    assert torch.equal(torch.as_tensor(d.timesteps), torch.tensor(kept)) and d.timesteps.dtype == torch.int64
    assert np.array_equal(d.base_betas, b)


def test_respaced_diffusion_calls_the_network_with_original_timesteps():
    d = build_diffusion(respacing="250")
    model = FixedOutput(torch.zeros(2, 8, 2, 2))
    x = torch.zeros(2, 4, 2, 2)
    d.p_sample(model, x, torch.tensor([249, 1]), noise=torch.zeros_like(x))
    d.training_losses(model, x, torch.tensor([0, 100]))
    assert model.seen_t[0].tolist() == [999, 4] and model.seen_t[1].tolist() == [0, 401]


def test_vb_is_rescaled_by_t_over_1000_when_respaced():
    x0, noise, out = _batch()
    t = torch.tensor([0, 10, 100, 249])
    model = FixedOutput(out)
    scaled = build_diffusion(respacing="250").training_losses(model, x0, t, noise=noise)
    raw = build_diffusion(respacing="250", rescale_vb=False).training_losses(model, x0, t, noise=noise)
    assert torch.allclose(scaled["vb"], 0.25 * raw["vb"])
    assert torch.equal(scaled["mse"], raw["mse"])


def test_p_sample_formula():
    d = build_diffusion()
    x0, noise, out = _batch()
    t = torch.tensor([0, 1, 500, 999])
    x = d.q_sample(x0, t, noise)
    z = torch.randn_like(x)
    got = d.p_sample(FixedOutput(out), x, t, noise=z)
    p = d.p_from_output(out, x, t)
    expected = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
    expected[0] = p["mean"][0]  # no noise at t=0
    assert torch.allclose(got, expected)


def test_build_diffusion_from_gin():
    gin.parse_config(["diffusion.build_diffusion.respacing = 'ddim50'",
                      "diffusion.build_diffusion.weighting = 'min_snr'",
                      "weighting.min_snr.gamma = 2.0",
                      "schedule.linear.beta_end = 0.03"])
    d = gin.get_configurable("diffusion.build_diffusion")()
    assert d.num_timesteps == 50 and d.weighting.gamma == 2.0
    assert d.base_betas[-1] == pytest.approx(0.03)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="cosine"):
        build_diffusion(schedule="cosin")
    with pytest.raises(ValueError, match="eps"):
        GaussianDiffusion(linear_betas(), predict="score")


@pytest.mark.parametrize("weighted", [False, True], ids=["all", "token_weight"])
def test_compiled_losses_equal_eager_without_graph_breaks(weighted):
    """``compile_losses`` (the trainer's ``train.compile``): the loss maths after the network call
    in one graph, equal to the eager maths in values and in the gradient wrt the network output
    (the vb term at t = 0 and t > 0, with and without a token weight)."""
    import torch._dynamo

    d = build_diffusion()
    x0, noise, out = _batch()
    t = torch.tensor([0, 1, 500, 999])
    weight = (torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float() if weighted else None
    x_t = d.q_sample(x0, t, noise)
    explanation = torch._dynamo.explain(d._terms_eager)(out, x0, x_t, t, noise, weight)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = []
    for compiled in (False, True):
        diffusion = build_diffusion()
        if compiled:
            diffusion.compile_losses("cpu")
        model = FixedOutput(out.clone())
        terms = diffusion.training_losses(model, x0, t, noise=noise, token_weight=weight)
        terms["loss"].sum().backward()
        runs.append(({k: v.detach() for k, v in terms.items()}, model.out.grad))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the compiled run ran a graph
    (eager, g_eager), (comp, g_comp) = runs
    assert eager.keys() == comp.keys()
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-7)
    assert g_eager[:, 4:].abs().sum() > 0  # the variance channels get the vb term's gradient
