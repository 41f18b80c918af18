"""Property tests for every registered masking strategy (parametrised over the registry).

A strategy registered in ``mdtzoo.masking`` is covered here without anyone writing a test.
"""

import inspect
import re
from pathlib import Path

import gin

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mdtzoo.interp import scatter_back
from mdtzoo.masking import MaskOut, from_mask, from_shuffle, keep_count
from mdtzoo.registry import MASKING

STRATEGIES = MASKING.names()
grids = st.tuples(st.integers(1, 12), st.integers(1, 12))


def make(name, ratio=None):
    """Build a strategy, with ``ratio`` if its constructor takes one."""
    params = inspect.signature(MASKING.get(name)).parameters
    if ratio is not None and "ratio" in params:
        if "span" in params:
            return MASKING.build(name, ratio=ratio, span=min(0.2, 0.99 - ratio))
        return MASKING.build(name, ratio=ratio)
    return MASKING.build(name)


def draw(strategy, batch, grid, seed):
    return strategy(batch, grid, generator=torch.Generator().manual_seed(seed))


def test_the_built_in_strategies_are_registered():
    assert {"random", "random_jitter", "block", "none"} <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
@given(batch=st.integers(1, 6), grid=grids, ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_structure(name, batch, grid, ratio, seed):
    check_structure(draw(make(name, ratio), batch, grid, seed), batch, grid)


def check_structure(out, batch, grid):
    n = grid[0] * grid[1]
    assert isinstance(out, MaskOut)
    k = out.num_keep
    assert 0 <= k <= n
    assert out.ids_shuffle.shape == out.ids_restore.shape == out.mask.shape == (batch, n)
    assert out.ids_keep.shape == (batch, k) and out.ids_removed.shape == (batch, n - k)
    # binary, exactly N - K ones per sample
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(out.mask.sum(1) == n - k)
    # kept and removed are disjoint and cover every token
    both = torch.cat([out.ids_keep, out.ids_removed], dim=1)
    assert torch.equal(both.sort(dim=1).values, torch.arange(n).expand(batch, n))
    assert torch.all(out.mask.gather(1, out.ids_keep) == 0)
    assert torch.all(out.mask.gather(1, out.ids_removed) == 1)
    # restore o shuffle = identity, both ways
    ident = torch.arange(n).expand(batch, n)
    assert torch.equal(out.ids_shuffle.gather(1, out.ids_restore), ident)
    assert torch.equal(out.ids_restore.gather(1, out.ids_shuffle), ident)


@pytest.mark.parametrize("name", STRATEGIES)
@given(batch=st.integers(1, 6), grid=grids, ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_grid_order_is_the_same_mask_sorted(name, batch, grid, ratio, seed):
    """What the model's masked pass uses (sorted kept positions for the attention kernels)."""
    out = draw(make(name, ratio), batch, grid, seed)
    ordered = out.in_grid_order()
    check_structure(ordered, batch, grid)
    assert ordered.num_keep == out.num_keep and torch.equal(ordered.mask, out.mask)
    assert torch.equal(ordered.ids_keep, out.ids_keep.sort(dim=1).values)
    assert torch.all(ordered.ids_keep.diff(dim=1) > 0) and torch.all(ordered.ids_removed.diff(dim=1) > 0)


def test_masked_pass_does_not_depend_on_the_kept_order():
    from mdtzoo.models import build_model

    torch.manual_seed(0)
    model = build_model("mdt_xs2", input_size=8, num_classes=4).double().eval()
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 50, 900]), torch.tensor([0, 1, 2])
    mask = model.sample_mask(3, generator=g)
    perm = torch.randperm(mask.num_keep, generator=g)
    shuffled = from_shuffle(torch.cat([mask.ids_keep[:, perm], mask.ids_removed.flip(1)], 1), mask.num_keep)
    with torch.no_grad():
        a = model(x, t, y, mask=mask, drop_labels=False)
        b = model(x, t, y, mask=shuffled, drop_labels=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", STRATEGIES)
@given(batch=st.integers(1, 4), grid=grids, ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_gather_then_scatter_restores_kept_tokens_bit_exactly(name, batch, grid, ratio, seed):
    n = grid[0] * grid[1]
    out = draw(make(name, ratio), batch, grid, seed)
    x = torch.randn(batch, n, 5, generator=torch.Generator().manual_seed(seed))
    kept = x.gather(1, out.ids_keep.unsqueeze(-1).expand(-1, -1, 5))
    fill = torch.full((5,), 7.0)
    back = scatter_back(kept, out, fill)
    keep = out.mask == 0
    assert torch.equal(back[keep], x[keep])
    assert torch.all(back[~keep] == 7.0)


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_mask(name):
    strategy = make(name)
    a, b = draw(strategy, 8, (8, 8), 123), draw(strategy, 8, (8, 8), 123)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_shuffle, b.ids_shuffle)


@pytest.mark.parametrize("name", STRATEGIES)
def test_samples_are_masked_independently(name):
    strategy = make(name, 0.5)
    out = draw(strategy, 32, (8, 8), 7)
    if getattr(strategy, "deterministic", False):
        # A deterministic strategy must say so, and then really ignore the generator.
        assert torch.equal(out.mask, draw(strategy, 32, (8, 8), 8).mask)
        assert torch.equal(out.mask, out.mask[:1].expand_as(out.mask))
        return
    distinct = {tuple(row.tolist()) for row in out.mask}
    assert len(distinct) == 32  # 32 samples, 32 different masks
    c = draw(strategy, 32, (8, 8), 8)
    assert not torch.equal(out.mask, c.mask)  # a different seed gives different masks


@pytest.mark.parametrize("name", [n for n in STRATEGIES if "ratio" in inspect.signature(MASKING.get(n)).parameters
                                  and "span" not in inspect.signature(MASKING.get(n)).parameters])
@given(grid=grids, ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_fixed_ratio_keeps_exactly_int_n_times_one_minus_ratio(name, grid, ratio, seed):
    n = grid[0] * grid[1]
    out = draw(make(name, ratio), 3, grid, seed)
    assert out.num_keep == int(n * (1 - ratio))


def test_mdt_keep_count_matches_the_reference():
    # MDT-S/2 on 256 tokens at ratio 0.3 keeps 179 (SPEC: the paper's "rho N" is a typo).
    assert keep_count(256, 0.3) == 179
    assert MASKING.build("random", ratio=0.3)(2, (16, 16)).num_keep == 179


@given(ratio=st.floats(0.0, 0.7), span=st.floats(0.0, 0.29), seed=st.integers(0, 2**31))
def test_jitter_ratio_stays_in_bounds(ratio, span, seed):
    strategy = MASKING.build("random_jitter", ratio=ratio, span=span)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        state = g.get_state()
        drawn = strategy.draw_ratio(generator=g)  # the ratio the next call will draw
        g.set_state(state)
        out = strategy(2, (16, 16), generator=g)
        # float32, as the reference computes it (so the bounds carry float32 rounding)
        assert ratio - 1e-6 <= drawn.item() <= ratio + span + 1e-6
        assert out.num_keep == int(256 * (1 - drawn))
        assert keep_count(256, ratio + span) - 1 <= out.num_keep <= keep_count(256, ratio) + 1


def test_jitter_covers_its_range_uniformly():
    strategy = MASKING.build("random_jitter", ratio=0.3, span=0.2)
    g = torch.Generator().manual_seed(0)
    ratios = torch.cat([strategy.draw_ratio(generator=g) for _ in range(4000)])
    assert ratios.min() >= 0.3 and ratios.max() < 0.5
    assert abs(ratios.mean().item() - 0.4) < 0.005  # U[0.3, 0.5): mean 0.4, sd of the mean 0.0009
    assert abs(ratios.std().item() - 0.2 / 12**0.5) < 0.003


def test_random_masking_is_uniform_over_positions():
    out = MASKING.build("random", ratio=0.3)(4000, (4, 4), generator=torch.Generator().manual_seed(0))
    freq = out.mask.mean(0)  # each position removed with probability 5/16
    assert torch.allclose(freq, torch.full((16,), 5 / 16), atol=0.03)


def test_block_masking_removes_contiguous_regions():
    # At a low ratio, each removed token of a block mask usually has a removed 4-neighbour.
    out = MASKING.build("block", ratio=0.3)(64, (16, 16), generator=torch.Generator().manual_seed(0))
    m = out.mask.view(64, 16, 16)
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    frac_with_neighbour = ((neighbours > 0) & (m > 0)).sum() / m.sum()
    random = MASKING.build("random", ratio=0.3)(64, (16, 16), generator=torch.Generator().manual_seed(0))
    r = torch.nn.functional.pad(random.mask.view(64, 16, 16), (1, 1, 1, 1))
    rn = r[:, :-2, 1:-1] + r[:, 2:, 1:-1] + r[:, 1:-1, :-2] + r[:, 1:-1, 2:]
    frac_random = ((rn > 0) & (random.mask.view(64, 16, 16) > 0)).sum() / random.mask.sum()
    assert frac_with_neighbour > 0.95 and frac_random < 0.8


def test_from_mask_keeps_ascending_order_and_validates():
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.float32)
    out = from_mask(mask)
    assert out.num_keep == 2
    assert out.ids_keep.tolist() == [[0, 2], [1, 2]]
    assert torch.equal(out.mask, mask)
    with pytest.raises(ValueError, match="same number"):
        from_mask(torch.tensor([[0, 1, 0, 1], [1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="binary"):
        from_mask(torch.tensor([[0, 0.5]]))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        from_mask(torch.zeros(4))


def test_from_shuffle_round_trip():
    perm = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    out = from_shuffle(perm, 4)
    assert torch.equal(out.ids_keep, perm[:, :4])
    assert torch.equal(from_mask(out.mask).mask, out.mask)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MASKING.build("random", ratio=bad)


def test_the_tutorial_strategy_works_and_passes_the_properties():
    """docs/adding_a_component.md's example, executed as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "adding_a_component.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)

    class Capture:  # stands in for the registry so the example registers only temporarily
        def register(self, name):
            return lambda cls: captured.setdefault(name, cls)

    captured = {}
    namespace = {}
    exec(compile(code.replace("from mdtzoo.registry import MASKING", "MASKING = _CAPTURE"), "tutorial", "exec"),
         {"_CAPTURE": Capture(), **namespace})
    (name, cls), = captured.items()
    with MASKING.temporary(name, cls):
        gin.parse_config(f"masking.{name}.ratio = 0.5")
        strategy = MASKING.build(name)
        out = draw(strategy, 4, (4, 4), 0)
        check_structure(out, 4, (4, 4))
        assert out.num_keep == 8 and out.ids_keep[0].tolist() == list(range(8))
        assert torch.equal(out.mask, draw(strategy, 4, (4, 4), 1).mask)


def test_jitter_keep_count_truncates_like_the_reference():
    # The reference computes int(L * (1 - (u * 0.2 + 0.3))) in float32; at u = 1/256 on 256 tokens
    # that keeps 179 where float64 arithmetic would keep 178.
    strategy = MASKING.build("random_jitter", ratio=0.3, span=0.2)

    u = torch.tensor([1 / 256], dtype=torch.float32)
    assert int(256 * (1 - (u * 0.2 + 0.3))) == 179
    ratio = strategy.draw_ratio(generator=torch.Generator().manual_seed(0))
    assert ratio.dtype == torch.float32
