"""The paper study's report: Table 1 beside the paper's, Figures 6 and 8, the findings checked, model costs.

Reads a study directory written by ``sweeps/paper_study.py`` (:class:`mri_models.experiment.StudyLayout`)
and writes ``report/``: ``report.md`` with every table and figure, ``table1.csv``, ``findings.csv``,
``model_costs.csv``, and the model-comparison and gamma-curve files of :mod:`analysis.compare_models`,
:mod:`analysis.mpand_curves` (Figure 6), :mod:`analysis.gamma_curves` (Figure 8) and
:mod:`analysis.reconstructions`.

The paper's findings, each judged with the statistic behind it (95% level throughout):

(a) *attention matches or beats the U-Net* (its Section 5.1, Table 1): the paired SSIM difference Attention
    U-Net - U-Net over matched seeds at each trial's best epoch. **Reproduced** when its 95% t interval lies
    above ``-EQUIVALENCE_MARGIN``; **not reproduced** when it lies wholly below it; else inconclusive.
(b) *SSIM falls as gamma grows* (Section 5.2, Figure 8): Spearman's rank correlation between gamma and
    SSIM over the gamma > 0 trials with the paper's gate (one point per trial). **Reproduced** for rho < 0
    with p < 0.05; **not reproduced** for rho > 0 with p < 0.05; else inconclusive. The gamma = 0
    (Attention U-Net) value is given as the reference. Trials stopped early by ASHA had fewer epochs to
    reach their best, so when any was stopped every trial is read at the common budget (the last epoch all
    of them reached).
(c) *MPAND falls during training* (Section 4.1, Figure 6): per Attention U-Net seed, the relative MPAND at
    the last epoch minus at epoch 0 (the untrained network). **Reproduced** when the 95% interval of the
    mean difference lies below 0; **not reproduced** when it lies above 0; else inconclusive.
(d) *the penalty sparsifies attention*, a question the paper could not ask of its own gate: per gate
    (``psi_norm``) of the gamma sweep, Spearman's rho between gamma and the mean coefficient alpha (at the
    common budget: after the same training for every trial, not at an epoch chosen by SSIM; every gamma
    including 0), the fraction of coefficients below 0.1 at the largest gamma, and what that cost in SSIM
    at the reported point (Welch's t interval, largest gamma minus gamma = 0). **Sparsifies**
    when rho < 0 with p < 0.05 and at least :data:`SPARSE_FRACTION` of the coefficients fall below 0.1;
    **lowers α, not sparse** when rho < 0 with p < 0.05 but fewer do; **raises α** for rho > 0 with p < 0.05;
    else inconclusive. For the paper's gate the report also says whether it could become sparse at all: an
    instance norm after ``psi`` keeps mean alpha above :data:`analysis.attention_curves.INSTANCE_BOUND`.

Table 1's Sparse Attention U-Net is the gamma sweep's best gamma > 0 with the paper's gate, chosen by mean
validation SSIM over seeds and reported on the test split (the model comparison trains the other two).

Run ``python -m analysis.paper_study --study PATH [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from scipy import stats

from analysis import attention_curves, compare_models, gamma_curves, mpand_curves, reconstructions
from analysis.attention_curves import INSTANCE_BOUND
from analysis.collect import status_counts
from analysis.common import (
    OutDir,
    StepResult,
    Study,
    at_common_budget,
    common_budget,
    load_study,
    markdown_table,
    mean_std_text,
    metric_at_epoch,
    paired_test,
    point_column,
    point_label,
    reported_point,
    test_points,
)
from analysis.report import run_safely
from mri_models import experiment
from mri_models.arms import arm_of
from mri_models.experiment import StudyLayout
from mri_models.metrics import PRIMARY_METRIC, metric_table

PAPER = "Chou and Robaina, *Accelerating MRI Reconstruction via Deep Learning*"
# The paper's Table 1 ("Validation Set Results, using the best hyperparameter configuration for each
# model"), fastMRI single-coil knee, 50 epochs, by the model each row names.
PAPER_TABLE_1 = {
    "unet": {"label": "Vanilla U-Net", "nmse": 0.034, "psnr": 31.9, "ssim": 0.73},
    "attention_unet": {"label": "U-Net with attention", "nmse": 0.033, "psnr": 32.0, "ssim": 0.73},
    "sparse_attention_unet": {
        "label": "U-Net with sparse-attention",
        "nmse": 0.045,
        "psnr": 30.2,
        "ssim": 0.71,
    },
}
# SSIM differences smaller than this count as "matches": the paper reports SSIM to two decimals and reads
# its 0.73 vs 0.73 as comparable and 0.73 vs 0.71 as a degradation.
EQUIVALENCE_MARGIN = 0.01
ALPHA = 0.05
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


@dataclass
class Finding:
    """One of the paper's claims, checked: the verdict and the statistic it rests on."""

    key: str
    claim: str
    source: str
    verdict: str
    statistic: str
    estimate: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    n: int = 0


# ----------------------------------------------------------------------------------------- findings


def _interval_text(result: dict, fmt: str = "+.4f") -> str:
    if math.isnan(result["ci_low"]):
        return f"{result['mean']:{fmt}}" if not math.isnan(result["mean"]) else "–"
    return f"{result['mean']:{fmt}} [{result['ci_low']:{fmt}}, {result['ci_high']:{fmt}}]"


def attention_matches_unet(study: Study) -> Finding:
    """Finding (a): the paired SSIM difference Attention U-Net - U-Net over matched seeds (best epoch)."""
    finding = Finding(
        "a",
        "Attention U-Net matches or beats the U-Net (SSIM)",
        "Section 5.1, Table 1",
        INCONCLUSIVE,
        "",
    )
    trials = study.included_trials()
    if trials.empty or not {"unet", "attention_unet"} <= set(trials["arm"]):
        finding.statistic = "no U-Net and Attention U-Net trials to compare"
        return finding
    keys = [*study.config_keys, "seed"]
    matched = trials[trials["arm"] == "unet"].merge(
        trials[trials["arm"] == "attention_unet"], on=keys, suffixes=("_unet", "_attention")
    )
    point = reported_point(study)
    column = point_column(point, "ssim")
    result = paired_test((matched[f"{column}_attention"] - matched[f"{column}_unet"]).tolist())
    finding.estimate, finding.ci_low, finding.ci_high = result["mean"], result["ci_low"], result["ci_high"]
    finding.p_value, finding.n = result["p_ttest"], int(result["n"])
    finding.statistic = (
        f"paired SSIM difference (attention − U-Net) {_interval_text(result)} over {result['n']} seed(s), "
        f"{point_label(point)}; margin ±{EQUIVALENCE_MARGIN}"
    )
    if result["n"] < 2 or math.isnan(result["ci_low"]):
        finding.statistic += "; fewer than two matched seeds: no interval"
    elif result["ci_low"] >= -EQUIVALENCE_MARGIN:
        finding.verdict = REPRODUCED
    elif result["ci_high"] < -EQUIVALENCE_MARGIN:
        finding.verdict = NOT_REPRODUCED
    return finding


def ssim_by_trial(study: Study) -> tuple[pd.DataFrame, str]:
    """Per attention trial with the paper's gate: gamma, the SSIM it is judged by, and which SSIM that is.

    The best epoch's when no trial was stopped early, else the value at the common budget.
    """
    trials = study.included_trials()
    if trials.empty:
        return pd.DataFrame(columns=["trial_id", "gamma", "ssim"]), "no trials"
    trials = trials[trials["has_attention"] & (gates(trials) == PAPER_GATE)]  # the paper's architecture
    if not (trials["status"] == "stopped").any():
        point = reported_point(study)
        ssim = trials[point_column(point, "ssim")]
        read_at = "best epoch" if point == "best" else point_label(point)
        return trials.assign(ssim=ssim)[["trial_id", "gamma", "ssim"]], read_at
    budget = common_budget(trials)
    at = metric_at_epoch(study.epochs, budget, ["ssim"]) if budget else pd.DataFrame(columns=["ssim"])
    table = trials[["experiment", "trial_id", "gamma"]].merge(at, on=["experiment", "trial_id"])
    return table[["trial_id", "gamma", "ssim"]], f"epoch {budget} (common budget; ASHA stopped some trials)"


def ssim_falls_with_gamma(study: Study) -> Finding:
    """Finding (b): Spearman's rho between gamma and SSIM over gamma > 0, with the gamma = 0 reference."""
    finding = Finding("b", "SSIM falls as γ grows", "Section 5.2, Figure 8", INCONCLUSIVE, "")
    table, read_at = ssim_by_trial(study)
    table = table[np.isfinite(table["ssim"].astype(float))]
    positive = table[table["gamma"] > 0]
    reference = table.loc[table["gamma"] == 0, "ssim"]
    reference_text = (
        f"γ=0 (Attention U-Net): {mean_std_text(reference.mean(), reference.std(), '.4f')}"
        if len(reference)
        else "no γ=0 trial"
    )
    by_gamma = positive.groupby("gamma")["ssim"].agg(["mean", "std"])
    curve = ", ".join(f"γ={g:g}: {mean_std_text(r['mean'], r['std'], '.4f')}" for g, r in by_gamma.iterrows())
    finding.n = len(positive)
    if len(positive) < 3 or positive["gamma"].nunique() < 2:
        finding.statistic = f"fewer than 3 trials over 2 values of γ > 0; {reference_text}"
        return finding
    rho, p = stats.spearmanr(positive["gamma"], positive["ssim"])
    finding.estimate, finding.p_value = float(rho), float(p)
    finding.statistic = (
        f"Spearman ρ = {rho:+.3f} (p = {p:.3g}, {len(positive)} trials over {positive['gamma'].nunique()} "
        f"γ > 0, SSIM: {read_at}); {curve}; reference {reference_text}"
    )
    if not np.isfinite(rho):
        finding.statistic += "; SSIM does not vary: no correlation"
    elif p < ALPHA:
        finding.verdict = REPRODUCED if rho < 0 else NOT_REPRODUCED
    return finding


def mpand_falls(study: Study) -> Finding:
    """Finding (c): MPAND at the last epoch minus the first, per Attention U-Net seed."""
    finding = Finding("c", "MPAND of the Attention U-Net falls during training", "Section 4.1, Figure 6",
                      INCONCLUSIVE, "")  # fmt: skip
    epochs = study.included_epochs()
    if epochs.empty or "mpand" not in epochs:
        finding.statistic = "no MPAND reported"
        return finding
    rows = epochs[(epochs["arm"] == "attention_unet") & np.isfinite(epochs["mpand"].astype(float))]
    per_trial = rows.sort_values("epoch").groupby("trial_id").agg(
        first_epoch=("epoch", "first"), last_epoch=("epoch", "last"), first=("mpand", "first"),
        last=("mpand", "last"),
    )  # fmt: skip
    per_trial = per_trial[per_trial["last_epoch"] > per_trial["first_epoch"]]
    result = paired_test((per_trial["last"] - per_trial["first"]).tolist())
    finding.estimate, finding.ci_low, finding.ci_high = result["mean"], result["ci_low"], result["ci_high"]
    finding.p_value, finding.n = result["p_ttest"], int(result["n"])
    span = (
        f"epoch {int(per_trial['first_epoch'].min())} → {int(per_trial['last_epoch'].max())}"
        if len(per_trial)
        else "no trial with two epochs"
    )
    finding.statistic = (
        f"MPAND last − first epoch {_interval_text(result, '+.3f')} over {result['n']} seed(s) ({span}; "
        f"first {per_trial['first'].mean():.3f}, last {per_trial['last'].mean():.3f} on average)"
        if len(per_trial)
        else span
    )
    if result["n"] < 2 or math.isnan(result["ci_low"]):
        finding.statistic += "; fewer than two seeds: no interval"
    elif result["ci_high"] < 0:
        finding.verdict = REPRODUCED
    elif result["ci_low"] > 0:
        finding.verdict = NOT_REPRODUCED
    return finding


def gates(trials: pd.DataFrame) -> pd.Series:
    """Each trial's gate (``psi_norm``; the paper's where an experiment predates the option)."""
    if "psi_norm" not in trials:
        return pd.Series(PAPER_GATE, index=trials.index)
    return trials["psi_norm"].fillna(PAPER_GATE)


def _ssim_cost(study: Study, rows: pd.DataFrame) -> tuple[str, dict]:
    """SSIM at the largest gamma minus at gamma = 0 (Welch's t interval), at the reported point."""
    point = reported_point(study)
    column = point_column(point, "ssim")
    largest = rows.loc[rows["gamma"] == rows["gamma"].max(), column].dropna()
    reference = rows.loc[rows["gamma"] == 0, column].dropna()
    if len(largest) < 2 or len(reference) < 2:
        return "SSIM cost: fewer than two seeds at γ=0 or the largest γ", {}
    test = stats.ttest_ind(largest, reference, equal_var=False)
    interval = test.confidence_interval(1 - ALPHA)
    difference = float(largest.mean() - reference.mean())
    result = {"mean": difference, "ci_low": float(interval.low), "ci_high": float(interval.high)}
    return f"SSIM cost (largest γ − γ=0, {point_label(point)}): {_interval_text(result)}", result


def _sparsity_finding(study: Study, gate: str, rows: pd.DataFrame) -> Finding:
    claim = f"The penalty sparsifies attention: {GATE_LABELS.get(gate, f'psi_norm={gate}')}"
    finding = Finding("d", claim, "new (the paper has no coefficient statistics)", INCONCLUSIVE, "")
    at, budget = at_common_budget(study, rows, ["alpha_mean", "alpha_below_0_1"])
    if "alpha_mean" in at:
        at = at[np.isfinite(at["alpha_mean"].astype(float))]
    if at.empty or "alpha_mean" not in at:
        finding.statistic = "no coefficient statistics reported (trials from before they were recorded)"
        return finding
    by_gamma = at.groupby("gamma")[["alpha_mean", "alpha_below_0_1"]].agg(["mean", "std"])
    curve = f"at epoch {budget}, the common budget: " + "; ".join(
        f"γ={g:g}: mean α {mean_std_text(r[('alpha_mean', 'mean')], r[('alpha_mean', 'std')], '.3f')}, "
        f"{100 * r[('alpha_below_0_1', 'mean')]:.1f}% < 0.1"
        for g, r in by_gamma.iterrows()
    )
    below = float(by_gamma[("alpha_below_0_1", "mean")].iloc[-1])
    cost_text, _ = _ssim_cost(study, rows)
    plain = ""
    if gate == PAPER_GATE:
        plain = (
            f". In plain words: this gate cannot become sparse. Its instance norm gives every image's logits "
            f"mean 0 and variance 1, so mean α cannot fall below {INSTANCE_BOUND:.4f} whatever γ is; the "
            f"lowest mean α of any trial was {float(at['alpha_mean'].min()):.3f}, with at most "
            f"{100 * float(at['alpha_below_0_1'].max()):.1f}% of coefficients below 0.1"
        )
    finding.n = len(at)
    if len(at) < 3 or at["gamma"].nunique() < 2:
        finding.statistic = f"fewer than 3 trials over 2 values of γ; {curve}{plain}"
        return finding
    rho, p = stats.spearmanr(at["gamma"], at["alpha_mean"])
    finding.estimate, finding.p_value = float(rho), float(p)
    finding.statistic = (
        f"Spearman ρ(γ, mean α) = {rho:+.3f} (p = {p:.3g}, {len(at)} trials); {curve}; {cost_text}{plain}"
    )
    if np.isfinite(rho) and p < ALPHA:
        finding.verdict = RAISES if rho > 0 else SPARSIFIES if below >= SPARSE_FRACTION else LOWERS
    return finding


def penalty_sparsifies(study: Study) -> list[Finding]:
    """Finding (d), one per gate of the gamma sweep: does the L1 penalty make the coefficients sparse?"""
    trials = study.included_trials()
    trials = trials[trials["has_attention"].astype(bool)] if not trials.empty else trials
    if trials.empty:
        return [Finding("d", "The penalty sparsifies attention", "new", INCONCLUSIVE, "no attention trials")]
    gate_of = gates(trials)
    order = sorted(gate_of.unique(), key=lambda g: (g != PAPER_GATE, g))
    return [_sparsity_finding(study, gate, trials[gate_of == gate]) for gate in order]


def findings(model_comparison: Study, gamma_sweep: Study) -> list[Finding]:
    return [attention_matches_unet(model_comparison), ssim_falls_with_gamma(gamma_sweep),
            mpand_falls(model_comparison), *penalty_sparsifies(gamma_sweep)]  # fmt: skip


def with_sparse_arm(model_comparison: Study, gamma_sweep: Study) -> tuple[Study, str]:
    """The model comparison with Table 1's Sparse Attention U-Net: the gamma sweep's best gamma > 0 with the
    paper's gate by mean validation SSIM over seeds (its trials, reported like the others), and a note."""
    trials = gamma_sweep.included_trials()
    if trials.empty or model_comparison.trials.empty:
        return model_comparison, "no gamma sweep trials: Table 1 has no Sparse Attention U-Net from it"
    candidates = trials[(trials["gamma"] > 0) & (gates(trials) == PAPER_GATE)]
    by_gamma = candidates.groupby("gamma")[f"best_{PRIMARY_METRIC}"].mean().dropna()
    if by_gamma.empty:
        return model_comparison, "the gamma sweep has no γ > 0 with the paper's gate"
    chosen = float(by_gamma.idxmax())
    selected = gamma_sweep.trials[
        (gamma_sweep.trials["gamma"] == chosen) & (gates(gamma_sweep.trials) == PAPER_GATE)
    ]
    keep = model_comparison.trials["model"] != "sparse_attention_unet"
    combined = pd.concat([model_comparison.trials[keep], selected], ignore_index=True)
    volumes = gamma_sweep.volumes
    if not volumes.empty and "trial_id" in volumes:
        volumes = volumes[volumes["trial_id"].isin(selected["trial_id"])]
    volumes = pd.concat([model_comparison.volumes, volumes], ignore_index=True)
    study = replace(model_comparison, trials=combined, volumes=volumes)
    grid = ", ".join(f"γ={g:g}: {v:.4f}" for g, v in by_gamma.items())
    note = (
        f"Sparse Attention U-Net: γ={chosen:g}, the gamma sweep's best γ > 0 with the paper's gate by mean "
        f"validation {PRIMARY_METRIC.upper()} over seeds ({grid}); its test numbers were read by no choice."
    )
    return study, note


# ----------------------------------------------------------------------------------------- tables


def table_one(study: Study, point: str | None = None) -> pd.DataFrame:
    """Our Table 1 (best epoch, mean ± std over seeds) beside the paper's, with the zero-filled row.

    Rows are the comparison's arms in SSIM order; ``ssim_rank`` and ``paper_ssim_rank`` compare orderings,
    which survive the change of data and budget when absolute values do not.
    """
    summary = compare_models.summary_table(study)
    if summary.empty:
        return summary
    point = point or reported_point(study)
    gain = compare_models.gain_column(point, "ssim")
    rows = []
    for _, row in summary.iterrows():
        baseline = row["statuses"] == "baseline (no training)"
        paper = {} if baseline else PAPER_TABLE_1.get(str(row.get("model")), {})
        label = row["arm"] if baseline else arm_of(row["model"], {"gamma": row.get("gamma") or 0.0}).label
        out = {"arm": row["arm"], "label": label, "model": row.get("model"), "seeds": row.get("seeds")}
        for metric in metric_table():
            out[f"{metric}_mean"] = row[f"{metric}_{point}_mean"]
            out[f"{metric}_std"] = row.get(f"{metric}_{point}_std")
            out[f"paper_{metric}"] = paper.get(metric, math.nan)
        # The validation SSIM each checkpoint was chosen by, beside the test value it is reported with.
        out["val_ssim_mean"], out["val_ssim_std"] = row["ssim_best_mean"], row.get("ssim_best_std")
        if not baseline:
            out["ssim_gain"] = row[f"{gain}_mean"]
            out["ssim_gain_ci95_low"] = row[f"{gain}_ci95_low"]
            out["ssim_gain_ci95_high"] = row[f"{gain}_ci95_high"]
        rows.append(out)
    table = pd.DataFrame(rows)
    table.attrs["point"] = point
    trained = table["paper_ssim"].notna()
    table.loc[trained, "ssim_rank"] = table.loc[trained, "ssim_mean"].rank(ascending=False, method="min")
    table.loc[trained, "paper_ssim_rank"] = table.loc[trained, "paper_ssim"].rank(
        ascending=False, method="min"
    )
    return table


def table_one_markdown(table: pd.DataFrame) -> str:
    rows = []
    for _, row in table.iterrows():
        out = {"Architecture": row["label"], "Seeds": "–" if pd.isna(row["seeds"]) else int(row["seeds"])}
        for metric, spec in metric_table().items():
            out[f"{spec.label} (ours)"] = mean_std_text(row[f"{metric}_mean"], row[f"{metric}_std"], spec.fmt)
            paper = row[f"paper_{metric}"]
            out[f"{spec.label} (paper)"] = "–" if pd.isna(paper) else f"{paper:g}"
        if str(table.attrs.get("point", "best")).startswith("test_"):
            selected = mean_std_text(row["val_ssim_mean"], row["val_ssim_std"], ".4f")
            out["SSIM (validation, selected)"] = selected
        gain = row.get("ssim_gain")
        out["SSIM gain over zero-filled (95% CI)"] = (
            "–"
            if pd.isna(gain)
            else compare_models.gain_text(gain, row["ssim_gain_ci95_low"], row["ssim_gain_ci95_high"], ".4f")
        )
        rank, paper_rank = row.get("ssim_rank"), row.get("paper_ssim_rank")
        out["SSIM rank (ours / paper)"] = "–" if pd.isna(rank) else f"{int(rank)} / {int(paper_rank)}"
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def cost_table(costs: list[dict]) -> pd.DataFrame:
    """The measured costs with ratios to the U-Net's (the first row when there is no U-Net)."""
    table = pd.DataFrame(costs)
    if table.empty:
        return table
    reference = table[table["model"] == "unet"].iloc[0] if (table["model"] == "unet").any() else table.iloc[0]
    for column in ("parameters", "size_mb", "peak_step_mb", "forward_ms"):
        table[f"{column}_vs_{reference['arm']}"] = table[column] / reference[column]
    return table


def cost_markdown(table: pd.DataFrame) -> str:
    column = next(c for c in table.columns if c.startswith("forward_ms_vs_"))
    reference = column.removeprefix("forward_ms_vs_")
    rows = []
    for _, row in table.iterrows():
        rows.append(
            {
                "Architecture": row["label"],
                "Parameters": f"{int(row['parameters']):,} (×{row[f'parameters_vs_{reference}']:.3f})",
                "Size (MB)": f"{row['size_mb']:.2f} (×{row[f'size_mb_vs_{reference}']:.3f})",
                "Peak training-step memory (MB)": (
                    f"{row['peak_step_mb']:.1f} (×{row[f'peak_step_mb_vs_{reference}']:.2f})"
                ),
                "Forward time (ms, median [min–max])": (
                    f"{row['forward_ms']:.1f} [{row['forward_ms_min']:.1f}–{row['forward_ms_max']:.1f}] "
                    f"(×{row[f'forward_ms_vs_{reference}']:.2f})"
                ),
            }
        )
    return markdown_table(pd.DataFrame(rows))


# ----------------------------------------------------------------------------------------- report


def _finding_lines(items: list[Finding]) -> list[str]:
    return [f"({f.key}) {f.claim} [{f.source}]: **{f.verdict}** — {f.statistic}" for f in items]


def _step_section(result: StepResult) -> list[str]:
    lines = []
    for artifact in result.artifacts:
        if artifact.path.endswith(".png"):
            lines += [f"{artifact.caption}\n", f"![{artifact.path}]({artifact.path})\n"]
    lines += [f"> note: {note}\n" for note in result.notes]
    return lines


def render(
    layout: StudyLayout,
    mc: Study,
    gamma: Study,
    checked: list[Finding],
    tables1: list[pd.DataFrame],
    costs: dict | None,
    steps: dict[str, StepResult],
    table_study: Study | None = None,
    sparse_note: str = "",
) -> str:
    record = experiment.read_json(layout.study_file) or {}
    lines = [f"# Paper study: {layout.name}\n"]
    lines.append(
        f"Reproduces {PAPER}: profile `{record.get('profile', '?')}`, data `{record.get('data_root', '?')}`. "
        "Every number is a mean over seeds with its spread or 95% interval, and set against the zero-filled "
        "input. Experiments:\n"
    )
    for study in (mc, gamma):
        for info in study.experiments:
            lines.append(
                f"- `{info.name}` ({info.path}): {len(study.trials)} trials ({status_counts(study.trials)}), "
                f"{info.sweep.get('max_epochs', '?')} epochs each at most."
            )
    lines += ["", "## Findings\n"]
    lines += [f"- {line}" for line in _finding_lines(checked)]
    lines += [
        "",
        f"Verdicts at the 95% level; (a) counts SSIM differences within ±{EQUIVALENCE_MARGIN} as a match. "
        "*Inconclusive* means the seeds do not separate the answers: more seeds (`--set seeds=[...]`) or "
        "epochs narrow the intervals.\n",
        *_table_one_sections(tables1, table_study or mc, sparse_note),
        "The paper's columns are its Table 1 (fastMRI knee, 320 × 320, 50 epochs); ours come from the "
        "`model_comparison` experiment and, for the Sparse Attention U-Net, the `gamma_sweep`. Absolute "
        "values depend on the data and the budget (the `cpu` and `smoke` profiles train small networks "
        "briefly on synthetic knees); compare the orderings and the gains over the zero-filled input. "
        "Paired differences: `compare_models.md`.\n",
        "## Figure 6: MPAND during training\n",
        *_step_section(steps["mpand"]),
        "## Figure 8: SSIM against γ\n",
        *_step_section(steps["gamma"]),
        "## Attention coefficients against epoch and γ (finding d)\n",
        *_step_section(steps["attention"]),
        *([steps["attention"].markdown, ""] if steps["attention"].markdown else []),
        "## Model cost (Figures 15 and 16)\n",
    ]
    if costs:
        size = "×".join(str(s) for s in costs.get("image_size", []))
        first = costs["models"][0] if costs["models"] else {}
        lines += [
            cost_markdown(cost_table(costs["models"])),
            f"Measured side by side in one process on `{first.get('device', '?')}` at {size} with batch size "
            f"{first.get('batch_size', '?')}: parameters and state-dict size; the most memory one training "
            "step (forward, loss with penalties, backward, Adam) holds above the weights; inference forward "
            "time over interleaved repeats. Ratios are to the U-Net.\n",
        ]
    else:
        lines.append("_(no model costs recorded: model_costs.json is missing)_\n")
    lines += ["## Reconstructions\n", *_step_section(steps["reconstructions"])]
    problems = [*mc.problems, *gamma.problems]
    for result in steps.values():
        problems += result.problems
    lines += ["## Problems\n", *([f"- {p}" for p in problems] if problems else ["None found."])]
    return "\n".join(lines) + "\n"


def _table_one_sections(tables1: list[pd.DataFrame], study: Study, sparse_note: str = "") -> list[str]:
    """Table 1 per reported point (each test setting, or validation when there is no test evaluation),
    then the test split per acceleration and acquisition."""
    lines = []
    for table in tables1:
        point = str(table.attrs.get("point", "best"))
        lines.append(f"## Table 1: {point_label(point)}\n")
        if not point.startswith("test_"):
            lines.append("_No test evaluation (an experiment from before the held-out split): validation "
                         "numbers, chosen on the same data._\n")  # fmt: skip
        lines.append(table_one_markdown(table) if not table.empty else "_(no trial has metrics)_\n")
    if any(str(t.attrs.get("point", "")).startswith("test_") for t in tables1):
        rule = "Each trial's checkpoint is chosen on validation (its best validation SSIM); the test split, "
        lines.insert(1, rule + "which no choice read, reports it.\n")
    if sparse_note:
        lines.insert(1, f"{sparse_note}\n")
    breakdown = compare_models.breakdown_table(study)
    if not breakdown.empty:
        lines += ["## Test split per acceleration and acquisition\n",
                  compare_models.breakdown_markdown(breakdown)]  # fmt: skip
    return lines


def _load_or_empty(path: str) -> Study:
    """The experiment as a study, or an empty one whose problem says it is missing (not run yet)."""
    try:
        return load_study([path])
    except FileNotFoundError as err:
        return Study([], pd.DataFrame(), pd.DataFrame(), [], {}, [], [f"{err} (not run yet?)"])


def write_report(study_path: str, out_uri: str | None = None) -> tuple[str, list[str]]:
    """Write the study's report; returns its path and the findings, one line each.

    Raises:
        FileNotFoundError: when ``study_path`` holds no study.
    """
    layout = StudyLayout(study_path)
    if experiment.read_json(layout.study_file) is None:
        raise FileNotFoundError(f"no study at {study_path} (no {experiment.STUDY_FILE})")
    mc, gamma = (_load_or_empty(e.path) for e in (layout.model_comparison, layout.gamma_sweep))
    out = OutDir(out_uri or layout.report_dir)
    steps = {
        "compare": run_safely(compare_models.run, mc, out),
        "mpand": run_safely(mpand_curves.run, mc, out),
        "gamma": run_safely(gamma_curves.run, gamma, out),
        "attention": run_safely(attention_curves.run, gamma, out),
        "reconstructions": run_safely(reconstructions.run, mc, out),
    }
    checked = findings(mc, gamma)
    out.write_csv("findings.csv", pd.DataFrame([asdict(f) for f in checked]))
    table_study, sparse_note = with_sparse_arm(mc, gamma)
    reported = test_points(table_study.trials) if not table_study.trials.empty else []
    tables1 = [table_one(table_study, point) for point in reported or ["best"]]
    out.write_csv("table1.csv", pd.concat([t.assign(point=t.attrs.get("point")) for t in tables1]))
    costs = experiment.read_json(layout.model_costs_file)
    if costs:
        out.write_csv("model_costs.csv", cost_table(costs["models"]))
    report = render(layout, mc, gamma, checked, tables1, costs, steps, table_study, sparse_note)
    out.write_text("report.md", report)
    return out.join("report.md"), _finding_lines(checked)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="study directory (local path or URI)")
    parser.add_argument("--out", help="output directory (default: <study>/report)")
    args = parser.parse_args(argv)
    try:
        report, lines = write_report(args.study, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    print("\n".join([*lines, f"report: {report}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
