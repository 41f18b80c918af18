"""Classifier-free guidance: the power-cosine schedule's values and the batched wrapper."""

import gin
import pytest
import torch

from mdtzoo.registry import GUIDANCE

# scale_step = ½(1 - cos(π(1 - t/1000)^4)), computed in float64 from the formula; the
# values quoted in the issue (≈0.227 at t=250, ≈0.736 at t=100) are scale_step, not s_eff.
SCALE_STEP = {0: 1.0, 100: 0.7354905444479974, 250: 0.22733750578897677, 500: 0.009607359798384785,
              750: 3.7649080427748505e-05, 999: 0.0}


def test_power_cosine_values():
    g = GUIDANCE.build("power_cosine")
    assert (g.s, g.power) == (3.8, 4.0)
    t = torch.tensor(list(SCALE_STEP))
    expected = torch.tensor(list(SCALE_STEP.values()))
    assert torch.allclose(g.scale_step(t), expected.float(), rtol=1e-5, atol=1e-7)
    s_eff = g.scale(t)
    assert torch.allclose(s_eff, 1 + 2.8 * expected.float(), rtol=1e-6)
    assert s_eff[0].item() == pytest.approx(3.8) and s_eff[-1].item() == 1.0
    assert s_eff[1].item() == pytest.approx(3.0593735, rel=1e-6)  # t = 100
    assert s_eff[2].item() == pytest.approx(1.6365450, rel=1e-6)  # t = 250
    # Monotone: strongest guidance at the end of sampling (small t).
    all_t = g.scale(torch.arange(1000))
    assert (all_t[1:] <= all_t[:-1]).all()


@pytest.mark.parametrize("name", GUIDANCE.names())
def test_every_guidance_scale_is_finite_and_at_least_one(name):
    s = GUIDANCE.build(name).scale(torch.arange(1000))
    assert s.shape == (1000,) and torch.isfinite(s).all() and (s >= 1).all()


class Recorder(torch.nn.Module):
    """out[b] = a per-label affine function of x, 2C channels; records every call."""

    def __init__(self, channels=4, classes=1001):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(classes, 2 * channels, generator=g)
        self.b = torch.randn(classes, 2 * channels, generator=g)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        xx = torch.cat([x, x], dim=1)
        return self.a[y][:, :, None, None] * xx + self.b[y][:, :, None, None]


def _inputs(B=3, C=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, C, 2, 2, generator=g), torch.tensor([999, 250, 0]), torch.tensor([5, 7, 9])


@pytest.mark.parametrize("legacy", [False, True])
def test_wrapper_runs_one_batched_forward_and_combines_eps(legacy):
    model = Recorder()
    x, t, y = _inputs()
    g = GUIDANCE.build("power_cosine", legacy_three_channels=legacy)
    out = g.wrap(model)(x, t, y=y)
    assert len(model.calls) == 1
    batch, seen_t, seen_y = model.calls[0]
    assert batch == 6 and seen_t.tolist() == t.tolist() * 2 and seen_y.tolist() == [5, 7, 9, 1000, 1000, 1000]
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 1000))
    s = g.scale(t).reshape(-1, 1, 1, 1)
    k = 3 if legacy else 4
    assert out.shape == (3, 8, 2, 2)
    assert torch.allclose(out[:, :k], uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k]), atol=1e-6)
    assert torch.equal(out[:, k:], cond[:, k:])  # variance (and, legacy, ε channel 3) unguided


def test_pixel_space_legacy_guides_all_three_channels():
    model = Recorder(channels=3)
    x, t, y = _inputs(C=3)
    plain = GUIDANCE.build("constant", scale=2.0).wrap(model)(x, t, y=y)
    legacy = GUIDANCE.build("constant", scale=2.0, legacy_three_channels=True).wrap(model)(x, t, y=y)
    assert torch.equal(plain, legacy)


def test_constant_and_null_class():
    model = Recorder(classes=11)
    x, t, y = _inputs()
    out = GUIDANCE.build("constant", scale=4.0, null_class=10).wrap(model)(x, t, y=y)
    assert model.calls[0][2].tolist() == [5, 7, 9, 10, 10, 10]
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert torch.allclose(out[:, :4], 4 * cond[:, :4] - 3 * uncond[:, :4], atol=1e-5)


def test_none_calls_the_model_once_unchanged():
    model = Recorder()
    x, t, y = _inputs()
    out = GUIDANCE.build("none").wrap(model)(x, t, y=y)
    assert len(model.calls) == 1 and model.calls[0][0] == 3
    assert torch.equal(out, model(x, t, y))


def test_scale_one_reproduces_the_conditional_model():
    model = Recorder()
    x, t, y = _inputs()
    out = GUIDANCE.build("constant", scale=1.0).wrap(model)(x, t, y=y)
    assert torch.allclose(out, model(x, t, y), atol=1e-6)


def test_guidance_is_gin_bindable():
    gin.parse_config(["guidance.power_cosine.scale = 1.5", "guidance.power_cosine.legacy_three_channels = True"])
    g = GUIDANCE.build("power_cosine")
    assert g.s == 1.5 and g.legacy_three_channels and g.power == 4.0


def test_missing_labels_are_a_clear_error():
    with pytest.raises(KeyError, match="'y'"):
        GUIDANCE.build("constant").wrap(Recorder())(*_inputs()[:2])
