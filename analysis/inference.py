"""The statistics the study's findings and comparison tables rest on, in one place.

The unit of replication is the seed: a seed fixes a trial's initial weights, data order and masks, so
trials of one seed in different arms are paired blocks (common random numbers), and the question "does
this architecture do better" is answered over seeds. The test volumes add the other source of variation:
the same volumes are read by every seed and arm (seeds and volumes are *crossed*, not nested), and a
conclusion should hold for new knees, not only for the volumes seen.

- :func:`estimate`: a mean over seeds with its t interval (the test volumes fixed) and a crossed bootstrap
  interval that resamples seeds and volumes independently (Owen's pigeonhole bootstrap; new seeds *and*
  new knees), with the variance components of a two-way seed x volume ANOVA (``statsmodels``).
- :func:`one_sided_p` and :func:`tost_p`: t-tests over seeds, the equivalence test as two one-sided ones.
- :func:`paired_test`: the paired differences of two arms over matched seeds, with their t interval, the
  t-test and the Wilcoxon signed-rank test.
- :func:`trend_p`: Page's trend test (``scipy.stats.page_trend_test``) over an ordered grid, blocked by
  seed.
- :func:`holm`: Holm's step-down adjustment (``statsmodels``) over a family of p-values.
- :func:`plan_t` and :func:`plan_trend`: the minimum detectable effect with the seeds run and the seeds
  needed for a given effect at :data:`POWER`.

Decision rules and their justification: ``docs/statistics.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # a seed fixes the resampling: the same study gives the same intervals
MAX_SEEDS = 200  # planning looks no further: beyond it the answer is "more than 200"
TREND_SIMULATIONS = 400
MAX_PROFILE_SCALE = 16.0  # the trend planning looks for profiles up to 16 times the observed one


@dataclass(frozen=True)
class VarianceComponents:
    """Standard deviations of a seed x volume table under the additive model ``y = mu + s + v + e``."""

    seed: float
    volume: float
    residual: float


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (of per-seed values or per-seed paired differences) with its uncertainty.

    Attributes:
        n: seeds with a value.
        volumes: test volumes per seed (1 when only per-trial values were available).
        mean: the mean over seeds of each seed's mean over volumes.
        sd: the standard deviation of the per-seed means (what a t-test over seeds uses).
        t_low, t_high: the 95% t interval over seeds (NaN for fewer than two).
        boot_low, boot_high: the 95% crossed-bootstrap interval over seeds and volumes.
        components: the seed x volume variance components (None without per-volume values).
    """

    n: int
    volumes: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    components: VarianceComponents | None = None
    per_seed: tuple[float, ...] = ()

    def text(self, fmt: str = "+.4f") -> str:
        """``+0.0120 [t: -0.0100, +0.0340; bootstrap: -0.0050, +0.0290]``."""
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.t_low):
            return f"{self.mean:{fmt}}"
        unit = "seeds × volumes" if self.volumes > 1 else "seeds"
        return (
            f"{self.mean:{fmt}} [t: {self.t_low:{fmt}}, {self.t_high:{fmt}}; bootstrap over {unit}: "
            f"{self.boot_low:{fmt}}, {self.boot_high:{fmt}}]"
        )


def crossed_bootstrap(
    matrix: np.ndarray,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Interval of the grand mean of a seed x volume table from the crossed (pigeonhole) bootstrap.

    Each replicate draws seeds with replacement and, independently, volumes with replacement, and takes
    the mean of the cells they select (missing cells are skipped); with one column it is the ordinary
    bootstrap over seeds. The interval is the mean ± the t quantile on ``min(seeds, volumes) - 1`` degrees
    of freedom times the replicates' standard deviation: with a handful of seeds the percentile interval
    of the replicates is far too narrow (its coverage in simulated studies is in ``docs/statistics.md``).
    """
    values = np.asarray(matrix, dtype=float)
    seeds, volumes = values.shape
    if seeds < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    present = np.isfinite(values)
    filled = np.where(present, values, 0.0)
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples).astype(float)
    volume_counts = rng.multinomial(volumes, np.full(volumes, 1 / volumes), size=resamples).astype(float)
    total = np.einsum("bi,ij,bj->b", seed_counts, filled, volume_counts)
    count = np.einsum("bi,ij,bj->b", seed_counts, present.astype(float), volume_counts)
    replicates = total[count > 0] / count[count > 0]
    mean = float(np.nanmean(np.nanmean(values, axis=1)))
    df = (min(seeds, volumes) if volumes > 1 else seeds) - 1
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * replicates.std(ddof=1))
    return mean - half, mean + half


def variance_components(matrix: np.ndarray) -> VarianceComponents | None:
    """Method-of-moments components of a complete seed x volume table (two-way ANOVA, no replication)."""
    values = np.asarray(matrix, dtype=float)
    seeds, volumes = values.shape
    if seeds < 2 or volumes < 2 or not np.isfinite(values).all():
        return None
    table = pd.DataFrame(
        {
            "y": values.ravel(),
            "seed": np.repeat(np.arange(seeds), volumes),
            "volume": np.tile(np.arange(volumes), seeds),
        }
    )
    anova = anova_lm(smf.ols("y ~ C(seed) + C(volume)", data=table).fit())
    mean_square = anova["mean_sq"]
    residual = float(mean_square["Residual"])
    seed_var = max(float(mean_square["C(seed)"]) - residual, 0.0) / volumes
    volume_var = max(float(mean_square["C(volume)"]) - residual, 0.0) / seeds
    return VarianceComponents(math.sqrt(seed_var), math.sqrt(volume_var), math.sqrt(residual))


def estimate(matrix: pd.DataFrame | np.ndarray, confidence: float = 0.95) -> Estimate:
    """The mean over seeds of a seed x volume table (one column: one value per seed), with both intervals.

    Rows are seeds (or paired seed blocks), columns volumes; a row's value is its mean over its volumes.
    """
    values = np.asarray(matrix, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    values = values[np.isfinite(values).any(axis=1)] if values.size else values.reshape(0, 1)
    per_seed = np.nanmean(values, axis=1) if values.size else np.array([])
    n = per_seed.size
    mean = float(per_seed.mean()) if n else math.nan
    sd = float(per_seed.std(ddof=1)) if n > 1 else math.nan
    t_low = t_high = math.nan
    if n > 1:
        if not _no_spread(per_seed):
            interval = stats.ttest_1samp(per_seed, 0.0).confidence_interval(confidence)
            t_low, t_high = float(interval.low), float(interval.high)
        else:
            t_low = t_high = mean
    boot_low, boot_high = crossed_bootstrap(values, confidence)
    return Estimate(n, values.shape[1], mean, sd, t_low, t_high, boot_low, boot_high,
                    variance_components(values), tuple(float(x) for x in per_seed))  # fmt: skip


def _no_spread(values: np.ndarray) -> bool:
    """Values equal up to rounding (differences of equal SSIMs are not exactly 0): a t statistic on them
    would be rounding noise."""
    return bool(np.ptp(values) <= 1e-9 * max(1.0, float(np.abs(values).max())))


def one_sided_p(per_seed: Sequence[float], null: float, alternative: str) -> float:
    """The t-test over seeds of H0: mean = ``null`` against ``alternative`` ("less" or "greater")."""
    values = np.asarray([x for x in per_seed if np.isfinite(x)], dtype=float)
    if values.size < 2:
        return math.nan
    if _no_spread(values):  # no variance to test against: the t-test is undefined
        return math.nan
    return float(stats.ttest_1samp(values, null, alternative=alternative).pvalue)


def tost_p(per_seed: Sequence[float], margin: float) -> float:
    """Two one-sided tests of equivalence within ``±margin``: the larger of the two one-sided p-values."""
    return max(one_sided_p(per_seed, -margin, "greater"), one_sided_p(per_seed, margin, "less"))


WILCOXON_MIN_N = 6  # below six pairs even perfectly consistent signs cannot reach p < 0.05 (two-sided)


def paired_test(differences: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean paired difference with its t confidence interval, paired t-test and Wilcoxon signed-rank test.

    Args:
        differences: per matched seed, the value of one arm minus the other's.
        confidence: the interval's coverage.

    Returns:
        ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``, ``t``, ``p_ttest`` and ``p_wilcoxon`` (NaN where
        undefined: fewer than two pairs, zero spread, or too few pairs for Wilcoxon).
    """
    d = np.asarray([x for x in differences if np.isfinite(x)], dtype=float)
    n = d.size
    out = {"n": n, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    out.update({"t": math.nan, "p_ttest": math.nan, "p_wilcoxon": math.nan})
    if n == 0:
        return out
    out["mean"] = float(d.mean())
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out.update({"std": sd, "ci_low": out["mean"], "ci_high": out["mean"]})  # no spread: a point
    if sd > 0:
        # ttest_rel(a, b) is the one-sample t-test of a - b against 0.
        result = stats.ttest_1samp(d, 0.0)
        interval = result.confidence_interval(confidence)
        out.update({"ci_low": float(interval.low), "ci_high": float(interval.high)})
        out.update({"t": float(result.statistic), "p_ttest": float(result.pvalue)})
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def trend_p(table: np.ndarray, decreasing: bool) -> float:
    """Page's trend test over the columns of a blocks x ordered-levels table (complete blocks only).

    Args:
        table: one row per block (seed), one column per level in increasing order (gamma ascending).
        decreasing: the alternative that values fall along the columns (else that they rise).
    """
    values = np.asarray(table, dtype=float)
    values = values[np.isfinite(values).all(axis=1)]
    if values.shape[0] < 2 or values.shape[1] < 3:  # Page's test needs two blocks and three levels
        return math.nan
    ordered = values[:, ::-1] if decreasing else values
    return float(stats.page_trend_test(ordered).pvalue)


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Holm-adjusted p-values of a family (NaN entries stay NaN and do not count)."""
    values = np.asarray(pvalues, dtype=float)
    adjusted = np.full(values.shape, math.nan)
    finite = np.isfinite(values)
    if finite.any():
        adjusted[finite] = multipletests(values[finite], alpha=alpha, method="holm")[1]
    return adjusted.tolist()


# ----------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """What a finding's seeds can decide, and how many it would need.

    Attributes:
        seeds: seeds run.
        detectable: the smallest effect the finding's test detects with :data:`POWER` at ``seeds``.
        needed_observed: seeds needed for the effect observed (None: more than :data:`MAX_SEEDS`).
        observed: the effect observed, in the units of ``detectable`` (for a trend: the mean at the
            largest level minus at the smallest).
        needed_stated: seeds needed for the stated effect (None: more than :data:`MAX_SEEDS`).
        stated: the stated effect (NaN when the finding has none).
    """

    seeds: int
    detectable: float
    needed_observed: int | None
    needed_stated: int | None
    stated: float = math.nan
    observed: float = math.nan


def plan_t(observed: float, sd: float, seeds: int, alpha: float, stated: float = math.nan) -> Plan:
    """A two-sided t-test over seeds at level ``alpha`` (statsmodels' power of the one-sample t-test)."""
    if not (np.isfinite(sd) and sd > 0 and seeds >= 2):
        return Plan(seeds, math.nan, None, None, stated, observed)
    solver = TTestPower()
    detectable = float(solver.solve_power(effect_size=None, nobs=seeds, alpha=alpha, power=POWER)) * sd
    needed = _seeds_for(observed / sd, alpha), _seeds_for(stated / sd, alpha)
    return Plan(seeds, detectable, *needed, stated, observed)


def _seeds_for(effect_size: float, alpha: float) -> int | None:
    if not np.isfinite(effect_size) or effect_size == 0:
        return None
    return _smallest(lambda n: _t_power(abs(effect_size), n, alpha) >= POWER, 2, MAX_SEEDS)


def _t_power(effect_size: float, seeds: int, alpha: float) -> float:
    """statsmodels' power of the two-sided one-sample t-test; its noncentral t gives NaN far in the tail,
    where the power is 1 to many digits."""
    power = TTestPower().power(effect_size=effect_size, nobs=seeds, alpha=alpha)
    return 1.0 if np.isnan(power) and effect_size * math.sqrt(seeds) > 8 else float(power)


def tost_power(delta: float, sd: float, seeds: int, margin: float, alpha: float) -> float:
    """Power of the equivalence test (two one-sided t-tests at ``alpha``) when the true difference is
    ``delta``: the probability that both one-sided tests reject, from the noncentral t distribution."""
    if seeds < 2 or not (sd > 0):
        return math.nan
    df = seeds - 1
    critical = stats.t.ppf(1 - alpha, df)
    se = sd / math.sqrt(seeds)
    # Owen's exact formula needs a bivariate integral; the sum of the two one-sided powers minus one is
    # its lower bound and equals it once both are near one (the regime planning cares about).
    lower = stats.nct.sf(critical, df, (delta + margin) / se)
    upper = stats.nct.cdf(-critical, df, (delta - margin) / se)
    return float(max(lower + upper - 1.0, 0.0))


def plan_tost(observed: float, sd: float, seeds: int, margin: float, alpha: float) -> Plan:
    """Equivalence within ``±margin``: detectable is the largest true |difference| still shown equivalent
    with :data:`POWER`; the stated effect is a true difference of 0."""
    if not (np.isfinite(sd) and sd > 0 and seeds >= 2):
        return Plan(seeds, math.nan, None, None, 0.0, observed)
    grid = np.linspace(0.0, margin, 201)
    shown = [d for d in grid if tost_power(d, sd, seeds, margin, alpha) >= POWER]
    detectable = float(max(shown)) if shown else math.nan

    def needed(delta: float) -> int | None:
        if abs(delta) >= margin:
            return None
        return _smallest(lambda n: tost_power(delta, sd, n, margin, alpha) >= POWER, 2, MAX_SEEDS)

    return Plan(seeds, detectable, needed(observed), needed(0.0), 0.0, observed)


def trend_power(
    means: Sequence[float], sd: float, seeds: int, alpha: float, decreasing: bool, seed: int = 0
) -> float:
    """Power of Page's test for level means ``means`` (increasing levels) with independent normal noise of
    SD ``sd`` per cell around a seed's block effect (which within-block ranks ignore), by simulation."""
    rng = np.random.default_rng(seed)
    levels = np.asarray(means, dtype=float)
    rejections = 0
    for _ in range(TREND_SIMULATIONS):
        table = levels + rng.normal(0.0, sd, size=(seeds, levels.size))
        rejections += trend_p(table, decreasing) < alpha
    return rejections / TREND_SIMULATIONS


def plan_trend(table: np.ndarray, alpha: float, decreasing: bool) -> Plan:
    """Page's test planned from a blocks x levels table: level means and the residual SD of the additive
    block + level model (the within-block noise the ranks see); detectable as the multiple of the
    observed level profile's range, seeds needed for the observed profile."""
    values = np.asarray(table, dtype=float)
    values = values[np.isfinite(values).all(axis=1)]
    seeds = values.shape[0]
    if seeds < 2 or values.shape[1] < 3:
        return Plan(seeds, math.nan, None, None)
    means = values.mean(axis=0)
    residual = values - values.mean(axis=1, keepdims=True) - means + values.mean()
    sd = math.sqrt((residual**2).sum() / ((seeds - 1) * (values.shape[1] - 1)))
    if sd == 0:
        return Plan(seeds, 0.0, seeds, None, observed=float(means[-1] - means[0]))
    profile = means - means.mean()
    span = float(np.ptp(means))

    def power(n: int, scale: float = 1.0) -> float:
        return trend_power(profile * scale, sd, n, alpha, decreasing)

    needed = _smallest(lambda n: power(n) >= POWER, seeds, MAX_SEEDS) if span > 0 else None
    detectable = math.nan
    if span > 0 and power(seeds, MAX_PROFILE_SCALE) >= POWER:
        low, high = 0.0, MAX_PROFILE_SCALE  # bisect the multiple of the observed profile
        for _ in range(10):
            low, high = (
                (low, (low + high) / 2)
                if power(seeds, (low + high) / 2) >= POWER
                else ((low + high) / 2, high)
            )
        detectable = high * span
    return Plan(seeds, detectable, needed, None, observed=float(means[-1] - means[0]))


def _smallest(ok, low: int, high: int) -> int | None:
    """The smallest n in ``[low, high]`` with ``ok(n)`` (``ok`` monotone in n), or None: doubling from
    ``low`` to a bracket, then bisecting it (few calls, none far beyond the answer)."""
    low = max(low, 2)
    if ok(low):
        return low
    upper = low
    while not ok(upper):
        if upper >= high:
            return None
        low, upper = upper + 1, min(2 * upper, high)
    while low < upper:
        middle = (low + upper) // 2
        low, upper = (low, middle) if ok(middle) else (middle + 1, upper)
    return low
