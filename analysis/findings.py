"""The paper's findings, each decided by a test that can come out either way, with the seeds it needs.

Every comparison is paired by seed (a seed fixes initial weights, data order and masks in every arm) and
read at equal training (:func:`analysis.study.reported_point`). The statistics are those of
:mod:`analysis.inference`; the decision rules and their justification are in ``docs/statistics.md``.

(a) *attention matches or beats the U-Net* (the paper's Section 5.1, Table 1): per seed the SSIM
    difference Attention U-Net - U-Net. **Reproduced** when two one-sided tests show it equivalent within
    ``±margin`` (or the one-sided test shows attention better by more than the margin); **not
    reproduced** when the one-sided test shows attention worse by more than the margin.
(b) *SSIM falls as gamma grows* (Section 5.2, Figure 8): Page's trend test over the gamma grid including
    gamma = 0, blocked by seed, with the paper's gate; **reproduced** for a falling trend, **not
    reproduced** for a rising one. Beside it, the paired contrast of the best gamma > 0 (by validation)
    against gamma = 0.
(c) *MPAND falls during training* (Section 4.1, Figure 6): per seed the relative MPAND at the last epoch
    minus at epoch 0; one-sided t-tests for a fall (reproduced) and a rise (not reproduced).
(d) *the penalty sparsifies attention*, a question the paper could not ask of its own gate: per gate, Page's
    trend test of the mean coefficient over gamma (common budget), blocked by seed. A fall is **sparsifies**
    when at least :data:`SPARSE_FRACTION` of the coefficients end below 0.1 at the largest gamma, else
    **lowers α, not sparse**; a rise is **raises α**; beside it, the SSIM cost paired by seed.

Every hypothesis of every finding (its reproduced and its not-reproduced alternatives) forms one family,
and Holm's adjustment over that family decides: a verdict needs an adjusted p below :data:`ALPHA`. The
plan of each finding (:class:`analysis.inference.Plan`) is made at the strictest level Holm can ask of a
hypothesis of the family, ``ALPHA / family size``, so the seeds it names suffice whatever the others do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.attention_curves import INSTANCE_BOUND
from analysis.inference import (
    ALPHA,
    Estimate,
    Plan,
    estimate,
    holm,
    one_sided_p,
    plan_t,
    plan_tost,
    plan_trend,
    tost_p,
    trend_p,
)
from analysis.points import point_column, point_label
from analysis.seed_stats import at_common_budget, seed_table
from analysis.study import Study, reported_point
from mri_models.metrics import PRIMARY_METRIC

# SSIM differences within this count as "matches": the paper reports SSIM to two decimals, reads its
# 0.73 vs 0.73 as comparable and its 0.73 vs 0.71 (a 0.02 gap) as a degradation; half that gap is the
# largest difference it would still call a match. A named setting: `equivalence_margin` in the study
# config, `--margin` on the command line.
EQUIVALENCE_MARGIN = 0.01
# The paper's sparse-vs-attention gap (Table 1: 0.73 -> 0.71): the stated effect of (b)'s contrast.
PAPER_SPARSE_GAP = -0.02
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SPARSIFIES, LOWERS, RAISES = "sparsifies", "lowers α, not sparse", "raises α"
# Attention is called sparse when at least half of its coefficients are below 0.1 (switched off).
SPARSE_FRACTION = 0.5
PAPER_GATE = "instance"
GATE_LABELS = {
    "instance": "the paper's gate (psi_norm=instance)",
    "instance_affine": "instance norm with learned scale and shift (psi_norm=instance_affine)",
    "none": "Oktay et al.'s gate (psi_norm=none)",
}


@dataclass(frozen=True)
class Hypothesis:
    """One alternative a finding tests: the verdict it would give, what it says, its raw p-value."""

    verdict: str
    says: str
    p: float


@dataclass
class Finding:
    """One of the paper's claims, checked: the verdict, the statistic it rests on and the seeds it needs."""

    key: str
    claim: str
    source: str
    verdict: str
    statistic: str
    estimate: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    boot_low: float = math.nan
    boot_high: float = math.nan
    p_value: float = math.nan
    p_adjusted: float = math.nan
    n: int = 0
    test: str = ""
    hypotheses: list[Hypothesis] = field(default_factory=list)
    plan: Plan | None = None
    planner: Callable[[float], Plan] | None = field(default=None, repr=False)
    effect_unit: str = ""

    def take(self, result: Estimate) -> None:
        """Record an estimate's mean and intervals as the finding's."""
        self.estimate, self.n = result.mean, result.n
        self.ci_low, self.ci_high = result.t_low, result.t_high
        self.boot_low, self.boot_high = result.boot_low, result.boot_high

    def row(self) -> dict:
        """The finding as one row of ``findings.csv``."""
        plan = self.plan or Plan(self.n, math.nan, None, None)
        return {
            "key": self.key, "claim": self.claim, "source": self.source, "verdict": self.verdict,
            "test": self.test, "estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "boot_low": self.boot_low, "boot_high": self.boot_high, "p_value": self.p_value,
            "p_adjusted": self.p_adjusted, "n": self.n, "detectable_effect": plan.detectable,
            "seeds_needed": plan.needed_observed, "stated_effect": plan.stated,
            "seeds_needed_stated": plan.needed_stated, "effect_unit": self.effect_unit,
            "statistic": self.statistic,
        }  # fmt: skip


def gates(trials: pd.DataFrame) -> pd.Series:
    """Each trial's gate (``psi_norm``; the paper's where an experiment predates the option)."""
    if "psi_norm" not in trials:
        return pd.Series(PAPER_GATE, index=trials.index)
    return trials["psi_norm"].fillna(PAPER_GATE)


def _blocks(study: Study, drop: tuple[str, ...] = ()) -> list[str]:
    """The columns that pair trials: the configuration keys (less ``drop``) and the seed."""
    return [*(k for k in study.config_keys if k not in drop), "seed"]


def _arm_trials(study: Study, arm: str) -> pd.DataFrame:
    trials = study.included_trials()
    return trials[trials["arm"] == arm] if not trials.empty else trials


# ----------------------------------------------------------------------------------------- (a)


def attention_matches_unet(study: Study, margin: float = EQUIVALENCE_MARGIN) -> Finding:
    """Finding (a): the per-seed SSIM difference Attention U-Net - U-Net, tested for equivalence."""
    finding = Finding("a", "Attention U-Net matches or beats the U-Net (SSIM)", "Section 5.1, Table 1",
                      INCONCLUSIVE, "", test=f"TOST within ±{margin:g}", effect_unit="SSIM")  # fmt: skip
    unet, attention = _arm_trials(study, "unet"), _arm_trials(study, "attention_unet")
    if unet.empty or attention.empty:
        finding.statistic = "no U-Net and Attention U-Net trials to compare"
        return finding
    point, keys = reported_point(study), _blocks(study)
    difference = seed_table(study, attention, point, "ssim", keys) - seed_table(
        study, unet, point, "ssim", keys
    )
    result = estimate(difference.dropna(how="all"))
    finding.take(result)
    finding.statistic = (
        f"paired SSIM difference (attention − U-Net) {result.text()} over {_units(result)}, "
        f"{point_label(point)}; margin ±{margin:g}{_components_text(result)}"
    )
    if result.n < 2:
        finding.statistic += "; fewer than two matched seeds: no test"
        return finding
    d = result.per_seed
    finding.hypotheses = [
        Hypothesis(REPRODUCED, f"equivalent within ±{margin:g}", tost_p(d, margin)),
        Hypothesis(
            REPRODUCED, f"attention better by more than {margin:g}", one_sided_p(d, margin, "greater")
        ),
        Hypothesis(
            NOT_REPRODUCED, f"attention worse by more than {margin:g}", one_sided_p(d, -margin, "less")
        ),
    ]
    finding.planner = lambda alpha: plan_tost(result.mean, result.sd, result.n, margin, alpha)
    return finding


def _units(result: Estimate) -> str:
    return (
        f"{result.n} seed(s) × {result.volumes} test volumes" if result.volumes > 1 else f"{result.n} seed(s)"
    )


def _components_text(result: Estimate) -> str:
    c = result.components
    if c is None:
        return ""
    return f"; SD between seeds {c.seed:.4f}, between volumes {c.volume:.4f}, residual {c.residual:.4f}"


# ----------------------------------------------------------------------------------------- trends


def _level_table(trials: pd.DataFrame, column: str, keys: list[str]) -> pd.DataFrame:
    """Blocks (seeds) x gamma, ascending: each trial's ``column``; complete blocks only."""
    table = trials.pivot_table(index=keys, columns="gamma", values=column, aggfunc="mean")
    return table.sort_index(axis=1).dropna()


def _trend_hypotheses(table: pd.DataFrame, falls: str, rises: str) -> tuple[list[Hypothesis], str]:
    """Page's trend test both ways over three or more levels; with two, the paired t-test of the larger
    gamma against the smaller, both ways."""
    if table.shape[1] >= 3:
        values = table.to_numpy()
        tests = [Hypothesis(falls, "falls with γ", trend_p(values, decreasing=True)),
                 Hypothesis(rises, "rises with γ", trend_p(values, decreasing=False))]  # fmt: skip
        return tests, "Page's trend test"
    d = (table.iloc[:, -1] - table.iloc[:, 0]).tolist()
    tests = [Hypothesis(falls, "falls with γ", one_sided_p(d, 0.0, "less")),
             Hypothesis(rises, "rises with γ", one_sided_p(d, 0.0, "greater"))]  # fmt: skip
    return tests, "paired t-test (two γ)"


def _trend_planner(table: pd.DataFrame) -> Callable[[float], Plan]:
    if table.shape[1] >= 3:
        return lambda alpha: plan_trend(table.to_numpy(), alpha, decreasing=True)
    d = table.iloc[:, -1] - table.iloc[:, 0]
    return lambda alpha: plan_t(float(d.mean()), float(d.std(ddof=1)), len(d), alpha)


def best_sparse_gamma(trials: pd.DataFrame) -> tuple[float | None, pd.Series]:
    """The gamma > 0 with the paper's gate of best mean validation SSIM over seeds, and the grid's means."""
    candidates = trials[(trials["gamma"] > 0) & (gates(trials) == PAPER_GATE)]
    by_gamma = candidates.groupby("gamma")[f"best_{PRIMARY_METRIC}"].mean().dropna()
    return (float(by_gamma.idxmax()) if not by_gamma.empty else None), by_gamma


def ssim_falls_with_gamma(study: Study) -> Finding:
    """Finding (b): Page's trend test of SSIM over the gamma grid (gamma = 0 included), blocked by seed."""
    finding = Finding(
        "b", "SSIM falls as γ grows", "Section 5.2, Figure 8", INCONCLUSIVE, "", effect_unit="SSIM"
    )
    trials = study.included_trials()
    if not trials.empty:
        trials = trials[trials["has_attention"].astype(bool) & (gates(trials) == PAPER_GATE)]
    point = reported_point(study)
    keys = _blocks(study, ("psi_norm",))
    table = _level_table(trials, point_column(point, "ssim"), keys) if not trials.empty else pd.DataFrame()
    if table.empty or table.shape[1] < 2 or len(table) < 1:
        finding.statistic = "fewer than two values of γ with a complete seed"
        return finding
    curve = ", ".join(f"γ={g:g}: {m:.4f}" for g, m in table.mean().items())
    finding.hypotheses, finding.test = _trend_hypotheses(table, REPRODUCED, NOT_REPRODUCED)
    finding.n = len(table)
    finding.planner = _trend_planner(table)
    finding.statistic = (
        f"{finding.test} over {table.shape[1]} γ (0 included) in {len(table)} seed(s), SSIM at "
        f"{point_label(point)}: {curve}"
    )
    chosen, _ = best_sparse_gamma(trials)
    if chosen is not None and 0.0 in table.columns:
        sparse = seed_table(study, trials[trials["gamma"] == chosen], point, "ssim", keys)
        attention = seed_table(study, trials[trials["gamma"] == 0.0], point, "ssim", keys)
        contrast = estimate((sparse - attention).dropna(how="all"))
        finding.take(contrast)
        needed = plan_t(contrast.mean, contrast.sd, contrast.n, ALPHA, PAPER_SPARSE_GAP).needed_stated
        finding.statistic += (
            f"; contrast γ={chosen:g} (best γ > 0 by validation) − γ=0, paired by seed: {contrast.text()}"
            f" ({needed or 'more than 200'} seeds would detect the paper's {PAPER_SPARSE_GAP:+.2f})"
        )
    finding.n = len(table)
    return finding


# ----------------------------------------------------------------------------------------- (c)


def mpand_falls(study: Study) -> Finding:
    """Finding (c): relative MPAND at the last epoch minus at epoch 0, per Attention U-Net seed."""
    finding = Finding("c", "MPAND of the Attention U-Net falls during training", "Section 4.1, Figure 6",
                      INCONCLUSIVE, "", test="paired t-test (last epoch − epoch 0)",
                      effect_unit="MPAND %")  # fmt: skip
    epochs = study.included_epochs()
    if epochs.empty or "mpand" not in epochs:
        finding.statistic = "no MPAND reported"
        return finding
    rows = epochs[(epochs["arm"] == "attention_unet") & np.isfinite(epochs["mpand"].astype(float))]
    ordered = rows.sort_values("epoch").groupby(["experiment", "trial_id"])
    per_trial = ordered.agg(first_epoch=("epoch", "first"), last_epoch=("epoch", "last"),
                            first=("mpand", "first"), last=("mpand", "last"))  # fmt: skip
    per_trial = per_trial[per_trial["last_epoch"] > per_trial["first_epoch"]]
    if per_trial.empty:
        finding.statistic = "no Attention U-Net trial with two epochs"
        return finding
    result = estimate((per_trial["last"] - per_trial["first"]).to_numpy())
    finding.take(result)
    span = f"epoch {int(per_trial['first_epoch'].min())} → {int(per_trial['last_epoch'].max())}"
    finding.statistic = (
        f"MPAND last − first epoch {result.text('+.3f')} over {result.n} seed(s) ({span}; first "
        f"{per_trial['first'].mean():.3f}, last {per_trial['last'].mean():.3f} on average)"
    )
    if result.n < 2:
        finding.statistic += "; fewer than two seeds: no test"
        return finding
    d = result.per_seed
    finding.hypotheses = [Hypothesis(REPRODUCED, "falls", one_sided_p(d, 0.0, "less")),
                          Hypothesis(NOT_REPRODUCED, "rises", one_sided_p(d, 0.0, "greater"))]  # fmt: skip
    finding.planner = lambda alpha: plan_t(result.mean, result.sd, result.n, alpha)
    return finding


# ----------------------------------------------------------------------------------------- (d)


def _sparsity_finding(study: Study, gate: str, rows: pd.DataFrame) -> Finding:
    claim = f"The penalty sparsifies attention: {GATE_LABELS.get(gate, f'psi_norm={gate}')}"
    finding = Finding("d", claim, "new (the paper has no coefficient statistics)", INCONCLUSIVE, "",
                      effect_unit="mean α")  # fmt: skip
    at, budget = at_common_budget(study, rows, ["alpha_mean", "alpha_below_0_1"])
    if "alpha_mean" in at:
        at = at[np.isfinite(at["alpha_mean"].astype(float))]
    if at.empty or "alpha_mean" not in at:
        finding.statistic = "no coefficient statistics reported (trials from before they were recorded)"
        return finding
    by_gamma = at.groupby("gamma")[["alpha_mean", "alpha_below_0_1"]].mean()
    curve = f"at epoch {budget}, the common budget: " + "; ".join(
        f"γ={g:g}: mean α {r['alpha_mean']:.3f}, {100 * r['alpha_below_0_1']:.1f}% < 0.1"
        for g, r in by_gamma.iterrows()
    )
    below = float(by_gamma["alpha_below_0_1"].iloc[-1])
    keys = _blocks(study, ("psi_norm",))
    table = _level_table(at, "alpha_mean", keys)
    plain = _floor_text(at) if gate == PAPER_GATE else ""
    if table.shape[1] < 2 or table.empty:
        finding.statistic = f"fewer than two values of γ with a complete seed; {curve}{plain}"
        return finding
    falls = SPARSIFIES if below >= SPARSE_FRACTION else LOWERS
    finding.hypotheses, finding.test = _trend_hypotheses(table, falls, RAISES)
    finding.planner = _trend_planner(table)
    change = estimate((table.iloc[:, -1] - table.iloc[:, 0]).to_numpy())  # largest γ − γ=0, per seed
    finding.take(change)
    finding.statistic = (
        f"{finding.test} of mean α over {table.shape[1]} γ in {len(table)} seed(s); mean α at the largest "
        f"γ − at the smallest {change.text('+.3f')}; {curve}; {_ssim_cost(study, rows, keys)}{plain}"
    )
    return finding


def _floor_text(at: pd.DataFrame) -> str:
    return (
        ". In plain words: this gate cannot become sparse. Its instance norm gives every image's logits mean "
        f"0 and variance 1, so mean α cannot fall below {INSTANCE_BOUND:.4f} whatever γ is; the lowest mean "
        f"α of any trial was {float(at['alpha_mean'].min()):.3f}, with at most "
        f"{100 * float(at['alpha_below_0_1'].max()):.1f}% of coefficients below 0.1"
    )


def _ssim_cost(study: Study, rows: pd.DataFrame, keys: list[str]) -> str:
    """SSIM at the largest gamma minus at gamma = 0, paired by seed, at the reported point."""
    point = reported_point(study)
    largest, smallest = rows["gamma"].max(), rows["gamma"].min()
    cost = seed_table(study, rows[rows["gamma"] == largest], point, "ssim", keys) - seed_table(
        study, rows[rows["gamma"] == smallest], point, "ssim", keys
    )
    result = estimate(cost.dropna(how="all"))
    if result.n < 2:
        return "SSIM cost: fewer than two seeds with both γ"
    return (
        f"SSIM cost (γ={largest:g} − γ={smallest:g}, paired by seed, {point_label(point)}): {result.text()}"
    )


def penalty_sparsifies(study: Study) -> list[Finding]:
    """Finding (d), one per gate of the gamma sweep: does the L1 penalty make the coefficients sparse?"""
    trials = study.included_trials()
    trials = trials[trials["has_attention"].astype(bool)] if not trials.empty else trials
    if trials.empty:
        return [Finding("d", "The penalty sparsifies attention", "new", INCONCLUSIVE, "no attention trials")]
    gate_of = gates(trials)
    order = sorted(gate_of.unique(), key=lambda g: (g != PAPER_GATE, g))
    return [_sparsity_finding(study, gate, trials[gate_of == gate]) for gate in order]


# ----------------------------------------------------------------------------------------- decision


def decide(items: list[Finding], alpha: float = ALPHA) -> list[Finding]:
    """Holm over every hypothesis of every finding; each finding takes the verdict of its hypothesis with
    the smallest adjusted p when that is below ``alpha``, and its plan at ``alpha / family size``."""
    family = [(finding, hypothesis) for finding in items for hypothesis in finding.hypotheses]
    adjusted = holm([h.p for _, h in family], alpha)
    strictest = alpha / max(len(family), 1)
    for finding in items:
        tested = [
            (a, h) for (f, h), a in zip(family, adjusted, strict=True) if f is finding and np.isfinite(a)
        ]
        if tested:
            best_adjusted, best = min(tested, key=lambda pair: pair[0])
            finding.p_value, finding.p_adjusted = best.p, best_adjusted
            if best_adjusted < alpha:
                finding.verdict = best.verdict
                finding.test = f"{finding.test}: {best.says}" if finding.test else best.says
        if finding.planner is not None:
            finding.plan = finding.planner(strictest)
    return items


def findings(
    model_comparison: Study, gamma_sweep: Study, margin: float = EQUIVALENCE_MARGIN
) -> list[Finding]:
    """Every finding, decided together (one Holm family)."""
    items = [attention_matches_unet(model_comparison, margin), ssim_falls_with_gamma(gamma_sweep),
             mpand_falls(model_comparison), *penalty_sparsifies(gamma_sweep)]  # fmt: skip
    return decide(items)
