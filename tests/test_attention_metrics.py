"""MPAND (relative and absolute) and the attention coefficients' statistics, against hand computations."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from mri_models.attention_metrics import (
    ALPHA_BINS,
    AttentionStatsAccumulator,
    MpandAccumulator,
    histogram_quantile,
    mpand,
    report_keys,
)
from mri_models.losses import attention_sparsity_penalty
from mri_models.models import AttentionUnet


def _hand_levels() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Skip features x and coefficients alpha of 2 examples at 2 levels (decoder order: deepest first)."""
    deep_x = torch.stack([torch.ones(2, 2, 2), torch.full((2, 2, 2), 2.0)])  # ||x|| = sqrt(8), 2 sqrt(8)
    deep_a = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.25)])
    fine_x = torch.stack([torch.ones(3, 1, 2), torch.full((3, 1, 2), 2.0)])  # ||x|| = sqrt(6), 2 sqrt(6)
    fine_a = torch.stack([torch.ones(1, 1, 2), torch.tensor([[[0.0, 1.0]]])])
    return [deep_x, fine_x], [deep_a, fine_a]


def _norms(xs, alphas):
    before = [x.flatten(1).norm(dim=1) for x in xs]
    after = [(a * x).flatten(1).norm(dim=1) for x, a in zip(xs, alphas, strict=True)]
    return before, after


def test_mpand_relative_and_absolute_on_a_hand_computed_example() -> None:
    result = mpand(*_norms(*_hand_levels()))
    # Deep level: after = 0.5 sqrt(8) for both examples; ratios 0.5 and 0.25 -> -50% and -75%.
    deep_relative, deep_absolute = (-50.0 - 75.0) / 2, (-math.sqrt(2) - 3 * math.sqrt(2)) / 2
    # Fine level: after = sqrt(6) and sqrt(12); ratios 1 and 1/sqrt(2).
    fine_relative = (0.0 + 100 * (1 / math.sqrt(2) - 1)) / 2
    fine_absolute = (0.0 + 2 * math.sqrt(3) - 2 * math.sqrt(6)) / 2
    # Level 1 is the finest: the network's order is reversed.
    assert result.relative_per_level == pytest.approx((fine_relative, deep_relative))
    assert result.absolute_per_level == pytest.approx((fine_absolute, deep_absolute))
    assert result.relative == pytest.approx((fine_relative + deep_relative) / 2)
    assert result.absolute == pytest.approx((fine_absolute + deep_absolute) / 2)


def test_mpand_of_a_network_is_in_minus_100_to_0_percent() -> None:
    torch.manual_seed(4)
    model = AttentionUnet(chans=4, num_pool_layers=3).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 24, 24), return_attention=True)
    result = mpand(out.skip_norms_before, out.skip_norms_after)
    assert len(result.relative_per_level) == 3
    assert all(-100 < v < 0 for v in result.relative_per_level)  # alpha in (0, 1) strictly shrinks
    expected = [
        float(100 * (a / b - 1).mean())
        for b, a in zip(reversed(out.skip_norms_before), reversed(out.skip_norms_after), strict=True)
    ]
    assert result.relative_per_level == pytest.approx(expected, rel=1e-6)


def test_mpand_accumulator_weighs_examples_merges_and_skips_zero_skips() -> None:
    # Batch A: 1 example; batch B: 3 examples, one of them with an all-zero skip at the deep level.
    batch_a = ([torch.tensor([4.0]), torch.tensor([30.0])], [torch.tensor([2.0]), torch.tensor([15.0])])
    batch_b = (
        [torch.tensor([5.0, 5.0, 0.0]), torch.tensor([40.0, 40.0, 40.0])],
        [torch.tensor([4.0, 4.0, 0.0]), torch.tensor([10.0, 10.0, 10.0])],
    )
    single = MpandAccumulator()
    single.add(*batch_a)
    single.add(*batch_b)
    result = single.compute()
    fine, deep = result.relative_per_level
    assert deep == pytest.approx((-50 - 20 - 20) / 3)  # the zero skip has no relative change
    assert fine == pytest.approx((-50 - 75 * 3) / 4)
    assert result.absolute_per_level == pytest.approx(((-15 - 30 * 3) / 4, (-2 - 1 - 1 + 0) / 4))

    rank0, rank1 = MpandAccumulator(), MpandAccumulator()
    rank0.add(*batch_b)
    rank1.add(*batch_a)
    merged = MpandAccumulator()
    merged.merge(pickle.loads(pickle.dumps(rank0.state())))
    merged.merge(rank1)
    merged.merge(MpandAccumulator().state())  # an idle rank changes nothing
    for got, expected in zip(merged.compute(), result, strict=True):
        assert got == pytest.approx(expected)
    with pytest.raises(ValueError, match="levels"):
        merged.add([torch.tensor([1.0])], [torch.tensor([0.5])])
    with pytest.raises(ValueError):
        mpand([torch.tensor([1.0, 2.0])], [torch.tensor([1.0])])


def test_mpand_without_attention_is_nan_and_empty() -> None:
    assert math.isnan(mpand((), ()).relative) and mpand((), ()).relative_per_level == ()
    accumulator = MpandAccumulator()
    accumulator.add((), ())  # a plain U-Net batch
    assert math.isnan(accumulator.compute().absolute) and accumulator.compute().absolute_per_level == ()


def test_coefficient_statistics_per_level_and_pooled() -> None:
    generator = torch.Generator().manual_seed(0)
    deep = torch.rand(4, 1, 8, 8, generator=generator) ** 3  # skewed towards 0
    fine = torch.rand(4, 1, 16, 16, generator=generator)
    maps = [deep, fine]  # decoder order
    accumulator = AttentionStatsAccumulator()
    accumulator.add([m[:1] for m in maps])
    accumulator.add([m[1:] for m in maps])
    stats = accumulator.compute()
    for level, alpha in zip(stats.levels, [fine, deep], strict=True):  # level 1 = the finest
        values = alpha.double().numpy().ravel()
        assert level.mean == pytest.approx(values.mean())
        assert level.below == pytest.approx((values < 0.1).mean())
        assert level.above == pytest.approx((values > 0.9).mean())
        for q, got in zip((0.1, 0.5, 0.9), (level.q10, level.q50, level.q90), strict=True):
            assert got == pytest.approx(np.quantile(values, q), abs=2 / ALPHA_BINS + 1.0 / values.size)
        assert level.penalty == pytest.approx(values.sum() / 4)
    pooled = np.concatenate([m.double().numpy().ravel() for m in maps])
    assert stats.pooled.mean == pytest.approx(pooled.mean())
    assert stats.pooled.below == pytest.approx((pooled < 0.1).mean())
    # The pooled P is the paper's penalty, the quantity gamma weighs.
    assert stats.pooled.penalty == pytest.approx(float(attention_sparsity_penalty(maps)))
    assert [h.sum() for h in stats.histograms] == [fine.numel(), deep.numel()]

    rank0, rank1 = AttentionStatsAccumulator(), AttentionStatsAccumulator()
    rank0.add([m[:3] for m in maps])
    rank1.add([m[3:] for m in maps])
    merged = AttentionStatsAccumulator()
    merged.merge(pickle.loads(pickle.dumps(rank0.state())))
    merged.merge(rank1)
    merged.merge(AttentionStatsAccumulator())
    for got, expected in zip(merged.compute().levels, stats.levels, strict=True):
        assert list(got.__dict__.values()) == pytest.approx(list(expected.__dict__.values()))
    report = stats.as_report(num_levels=3)
    assert list(report) == report_keys(3)
    assert report["alpha_mean_level_1"] == pytest.approx(stats.levels[0].mean)
    assert math.isnan(report["alpha_mean_level_3"])  # a level the network does not have
    assert report["alpha_below_0_1"] == pytest.approx(stats.pooled.below)


def test_histogram_quantile_interpolates_within_a_bin() -> None:
    counts = np.zeros(10)
    counts[[2, 7]] = 1.0  # one value in [0.2, 0.3), one in [0.7, 0.8)
    assert histogram_quantile(counts, 0.25) == pytest.approx(0.25)
    assert histogram_quantile(counts, 0.75) == pytest.approx(0.75)
    assert math.isnan(histogram_quantile(np.zeros(10), 0.5))
