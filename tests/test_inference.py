"""The study's statistics against the libraries that define them and against simulations of known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis import inference


def _crossed(rng, seeds: int, volumes: int, mean: float, sd_seed=0.02, sd_volume=0.03, sd_residual=0.01):
    """A seed x volume table of the additive crossed model: y = mean + s_i + v_j + e_ij."""
    return (
        mean
        + rng.normal(0, sd_seed, (seeds, 1))
        + rng.normal(0, sd_volume, (1, volumes))
        + rng.normal(0, sd_residual, (seeds, volumes))
    )


@pytest.mark.parametrize("seeds, volumes", [(10, 12), (3, 4)])
def test_crossed_bootstrap_covers_the_population_mean_near_nominally(seeds, volumes):
    # 200 studies with a known mean; the 95% interval over seeds and volumes, at a comfortable design and
    # at the few seeds and test volumes of the cpu profile.
    rng = np.random.default_rng(1)
    covered = 0
    for study in range(200):
        table = _crossed(rng, seeds, volumes, 0.05)
        low, high = inference.crossed_bootstrap(table, resamples=1000, seed=study)
        covered += low <= 0.05 <= high
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_the_seed_only_t_interval_undercovers_when_volumes_vary():
    # What the bootstrap is for: with the volumes' share large, an interval over seeds alone (the test
    # volumes held fixed) misses the mean of new knees far more often than 5%.
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(200):
        result = inference.estimate(_crossed(rng, 10, 12, 0.05, sd_volume=0.05))
        covered += result.t_low <= 0.05 <= result.t_high
    assert covered / 200 < 0.85, covered


def test_variance_components_recover_the_simulated_ones():
    rng = np.random.default_rng(3)
    components = inference.variance_components(_crossed(rng, 40, 40, 0.0, 0.02, 0.03, 0.01))
    assert components.seed == pytest.approx(0.02, rel=0.3)
    assert components.volume == pytest.approx(0.03, rel=0.3)
    assert components.residual == pytest.approx(0.01, rel=0.1)


def test_holm_is_statsmodels_holm_and_skips_missing_values():
    p = [0.01, 0.04, 0.03, 0.2, float("nan"), 0.001]
    expected = multipletests([0.01, 0.04, 0.03, 0.2, 0.001], method="holm")[1]
    adjusted = inference.holm(p)
    assert np.isnan(adjusted[4])
    np.testing.assert_allclose([a for i, a in enumerate(adjusted) if i != 4], expected)


def test_trend_test_gives_scipys_documented_example():
    # scipy.stats.page_trend_test's documented example (teaching methods, predicted to rise): L = 133.5,
    # p = 0.0018191161948127822 (exact).
    table = [[3, 4, 3], [2, 2, 4], [3, 3, 5], [1, 3, 2], [2, 3, 2], [2, 4, 5], [1, 2, 4], [3, 4, 4],
             [2, 4, 5], [1, 3, 4]]  # fmt: skip
    assert inference.trend_p(table, decreasing=False) == pytest.approx(0.0018191161948127822)
    # The same data read right to left is a decreasing trend of the same strength.
    reversed_table = np.asarray(table)[:, ::-1]
    assert inference.trend_p(reversed_table, decreasing=True) == pytest.approx(0.0018191161948127822)
    assert inference.trend_p(table, decreasing=True) > 0.5


def test_trend_test_decides_either_way_and_can_find_nothing():
    rng = np.random.default_rng(4)
    levels = np.array([0.0, -0.01, -0.02, -0.03, -0.04])
    falling = levels + rng.normal(0, 0.003, (3, 5)) + rng.normal(0, 0.05, (3, 1))  # block effects ignored
    assert inference.trend_p(falling, decreasing=True) < 0.01
    assert inference.trend_p(-falling, decreasing=True) > 0.9
    flat = rng.normal(0, 0.01, (3, 5))
    assert inference.trend_p(flat, decreasing=True) > 0.05


def test_tost_decides_equivalence_and_its_p_is_the_larger_one_sided():
    d = [0.001, -0.002, 0.0015, 0.0005, -0.001]
    low = stats.ttest_1samp(d, -0.01, alternative="greater").pvalue
    high = stats.ttest_1samp(d, 0.01, alternative="less").pvalue
    assert inference.tost_p(d, 0.01) == pytest.approx(max(low, high)) and inference.tost_p(d, 0.01) < 0.01
    assert inference.tost_p([0.02, 0.025, 0.018], 0.01) > 0.5  # clearly outside the margin


def _simulated_power(effect: float, sd: float, seeds: int, test, rng, studies: int = 4000) -> float:
    """The fraction of simulated studies (one per row) that ``test`` (rows -> booleans) rejects."""
    return float(np.mean(test(rng.normal(effect, sd, (studies, seeds)))))


def test_t_planning_agrees_with_a_simulation_of_the_same_design():
    rng = np.random.default_rng(5)
    sd, seeds = 0.01, 6
    plan = inference.plan_t(0.006, sd, seeds, inference.ALPHA)
    # The detectable effect is detected 80% of the time by the two-sided t-test over the seeds run.

    def rejects(rows):
        return stats.ttest_1samp(rows, 0.0, axis=1).pvalue < inference.ALPHA

    power = _simulated_power(plan.detectable, sd, seeds, rejects, rng)
    assert abs(power - inference.POWER) < 3 * np.sqrt(0.8 * 0.2 / 4000), power
    # The seeds needed for the observed effect reach 80%; one seed fewer does not.
    assert _simulated_power(0.006, sd, plan.needed_observed, rejects, rng) >= inference.POWER - 0.02
    assert _simulated_power(0.006, sd, plan.needed_observed - 1, rejects, rng) < inference.POWER + 0.02


def test_tost_planning_agrees_with_a_simulation_of_the_same_design():
    rng = np.random.default_rng(6)
    sd, margin = 0.006, 0.01
    plan = inference.plan_tost(0.002, sd, 4, margin, inference.ALPHA)
    n = plan.needed_observed

    def equivalent(rows):  # both one-sided tests reject: the TOST of inference.tost_p, row by row
        above = stats.ttest_1samp(rows, -margin, axis=1, alternative="greater").pvalue
        below = stats.ttest_1samp(rows, margin, axis=1, alternative="less").pvalue
        return np.maximum(above, below) < inference.ALPHA

    assert _simulated_power(0.002, sd, n, equivalent, rng) >= inference.POWER - 0.02
    assert _simulated_power(0.002, sd, n - 1, equivalent, rng) < inference.POWER + 0.02
    assert plan.needed_stated <= n  # a true difference of 0 is the easiest to show equivalent


def test_trend_planning_reaches_its_power_in_an_independent_simulation():
    rng = np.random.default_rng(7)
    levels = np.array([0.0, -0.002, -0.004, -0.006])
    table = levels + rng.normal(0, 0.004, (3, 4)) + rng.normal(0, 0.05, (3, 1))
    plan = inference.plan_trend(table, inference.ALPHA, decreasing=True)
    assert plan.needed_observed is not None and plan.needed_observed > 3
    means = table.mean(axis=0)
    residual = table - table.mean(axis=1, keepdims=True) - means + table.mean()
    sd = np.sqrt((residual**2).sum() / (2 * 3))
    power = inference.trend_power(means, sd, plan.needed_observed, inference.ALPHA, True, seed=99)
    assert power >= inference.POWER - 0.06
