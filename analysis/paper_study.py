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
    SSIM over the gamma > 0 trials (one point per trial). **Reproduced** for rho < 0 with p < 0.05; **not
    reproduced** for rho > 0 with p < 0.05; else inconclusive. The gamma = 0 (Attention U-Net) value is
    given as the reference. Trials stopped early by ASHA had fewer epochs to reach their best, so when any
    was stopped every trial is read at the common budget (the last epoch all of them reached).
(c) *MPAND falls during training* (Section 4.1, Figure 6): per Attention U-Net seed, MPAND at the last
    epoch minus the first. **Reproduced** when the 95% interval of the mean difference lies below 0;
    **not reproduced** when it lies above 0; else inconclusive.

Run ``python -m analysis.paper_study --study PATH [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from scipy import stats

from analysis import compare_models, gamma_curves, mpand_curves, reconstructions
from analysis.collect import status_counts
from analysis.common import (
    OutDir,
    StepResult,
    Study,
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
from mri_models.metrics import metric_table

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
    """Per attention trial: gamma and the SSIM it is judged by, and which SSIM that is.

    The best epoch's when no trial was stopped early, else the value at the common budget.
    """
    trials = study.included_trials()
    if trials.empty:
        return pd.DataFrame(columns=["trial_id", "gamma", "ssim"]), "no trials"
    trials = trials[trials["has_attention"]]
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


def findings(model_comparison: Study, gamma_sweep: Study) -> list[Finding]:
    return [attention_matches_unet(model_comparison), ssim_falls_with_gamma(gamma_sweep),
            mpand_falls(model_comparison)]  # fmt: skip


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
        *_table_one_sections(tables1, mc),
        "The paper's columns are its Table 1 (fastMRI knee, 320 × 320, 50 epochs); ours come from the "
        "`model_comparison` experiment. Absolute values depend on the data and the budget (the `cpu` and "
        "`smoke` profiles train small networks briefly on synthetic knees); compare the orderings and the "
        "gains over the zero-filled input. Paired differences: `compare_models.md`.\n",
        "## Figure 6: MPAND during training\n",
        *_step_section(steps["mpand"]),
        "## Figure 8: SSIM against γ\n",
        *_step_section(steps["gamma"]),
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


def _table_one_sections(tables1: list[pd.DataFrame], study: Study) -> list[str]:
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
        "reconstructions": run_safely(reconstructions.run, mc, out),
    }
    checked = findings(mc, gamma)
    out.write_csv("findings.csv", pd.DataFrame([asdict(f) for f in checked]))
    reported = test_points(mc.trials) if not mc.trials.empty else []
    tables1 = [table_one(mc, point) for point in reported or ["best"]]
    out.write_csv("table1.csv", pd.concat([t.assign(point=t.attrs.get("point")) for t in tables1]))
    costs = experiment.read_json(layout.model_costs_file)
    if costs:
        out.write_csv("model_costs.csv", cost_table(costs["models"]))
    out.write_text("report.md", render(layout, mc, gamma, checked, tables1, costs, steps))
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
