"""The paper's Table 1 and more: NMSE, PSNR and SSIM per architecture and configuration over seeds.

For every arm (U-Net, Attention U-Net, Sparse Attention U-Net at each gamma; gamma = 0 is the Attention U-Net)
and configuration (the search keys other than the seed), the mean ± std over seeds of each metric on the
held-out test split at each test setting (4x and 8x: the checkpoint of the best validation SSIM, evaluated
on data no choice saw; what the report leads with), and on validation at the epoch of best validation SSIM
(chosen on the same data, so optimistic) and at the last epoch, sorted by SSIM. A breakdown per
acceleration and acquisition comes from the test split's per-volume rows. Then, for every pair of arms, the
paired differences over matched seeds (same seed, same other configuration keys): mean with a 95% t
confidence interval, the paired t-test and, with at least six pairs, the Wilcoxon signed-rank test.

Errored and diverged trials are left out of the statistics (and counted in ``failed``); trials stopped by
ASHA or left unfinished count with the epochs they ran (their statuses are listed per row).

Run ``python analysis/compare_models.py --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from scipy import stats

from analysis.common import (
    Artifact,
    OutDir,
    StepResult,
    Study,
    aggregate,
    baseline_label,
    config_text,
    image_metrics,
    markdown_table,
    mean_std_text,
    paired_test,
    pairs,
    point_column,
    point_label,
    reported_point,
    run_step,
    test_points,
)
from mri_models.metrics import PRIMARY_METRIC, metric_table

POINTS = {"best": f"epoch of best validation {PRIMARY_METRIC.upper()}", "last": "last epoch"}
BASELINE_STATUS = "baseline (no training)"


def points(study: Study) -> list[str]:
    """The points the tables show: every test setting first, then validation's best and last epoch."""
    return [*(test_points(study.trials) if not study.trials.empty else []), *POINTS]


def gain_column(point: str, metric: str) -> str:
    """The per-trial gain over the zero-filled input at a point (``gain_<metric>`` at the best epoch)."""
    return f"gain_{metric}" if point == "best" else f"gain_{point}_{metric}"


def _status_text(statuses: pd.Series) -> str:
    return ", ".join(f"{n} {s}" for s, n in statuses.value_counts().sort_index().items())


def summary_table(study: Study) -> pd.DataFrame:
    """One row per arm and configuration: metrics at the best and last epoch, mean/std/n over seeds."""
    trials = study.trials
    if trials.empty:
        return pd.DataFrame()
    keys = ["arm", *study.config_keys]
    metrics = image_metrics()
    shown = points(study)
    columns = {
        f"{m}_{p}": trials[point_column(p, m)] for p in shown for m in metrics if point_column(p, m) in trials
    }
    gained = [p for p in shown if p != "last"]
    columns |= {gain_column(p, m): trials[f"gain_{point_column(p, m)}"] for p in gained for m in metrics}
    meta_columns = [*keys, "model", "gamma", "status", "included", "epochs_run"]
    values = pd.concat([trials[meta_columns], pd.DataFrame(columns)], axis=1)
    included = values[values["included"]]
    gains = [gain_column(p, m) for p in gained for m in metrics]
    table = aggregate(included, keys, [*(f"{m}_{p}" for p in shown for m in metrics), *gains])
    if table.empty:
        return table
    for point in gained:
        gain = gain_column(point, PRIMARY_METRIC)
        table[f"{gain}_ci95_low"], table[f"{gain}_ci95_high"] = t_interval(
            table[f"{gain}_mean"], table[f"{gain}_std"], table[f"{gain}_n"]
        )
    gain = gain_column(reported_point(study), PRIMARY_METRIC)
    meta = values.groupby(keys, dropna=False, sort=False).agg(
        model=("model", "first"),
        gamma=("gamma", "first"),
        statuses=("status", _status_text),
        failed=("included", lambda s: int((~s).sum())),
    )
    # Seeds whose best epoch beat the zero-filled input on the primary metric.
    meta[f"{gain}_above"] = included.groupby(keys, dropna=False, sort=False)[gain].agg(
        lambda s: int((s > 0).sum())
    )
    epochs = included.groupby(keys, dropna=False, sort=False)["epochs_run"].agg(["min", "max"])
    # Epochs run, as a range: stopped or unfinished trials make "last epoch" a smaller budget.
    meta["epochs"] = [
        f"{lo}" if lo == hi else f"{lo}-{hi}"
        for lo, hi in epochs.reindex(meta.index).fillna(0).astype(int).to_numpy().tolist()
    ]
    table = meta.reset_index().merge(table, on=keys, how="right")
    table.insert(len(keys) + 2, "seeds", table[f"{PRIMARY_METRIC}_{reported_point(study)}_n"])
    table = pd.concat([table, zero_filled_rows(study)], ignore_index=True)
    ascending = not metric_table()[PRIMARY_METRIC].higher_is_better
    reported = f"{PRIMARY_METRIC}_{reported_point(study)}_mean"
    table = table.sort_values(reported, ascending=ascending, na_position="last")
    return table.reset_index(drop=True)


def t_interval(mean: pd.Series, std: pd.Series, n: pd.Series, confidence: float = 0.95):
    """The t confidence interval of a mean over ``n`` seeds (NaN for fewer than two)."""
    n = n.astype(float).where(n >= 2)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n)
    return mean - half, mean + half


def zero_filled_rows(study: Study) -> pd.DataFrame:
    """One row per zero-filled baseline: its validation metrics in the best- and last-epoch columns, the
    zero-filled input of the test volumes in the test columns (the same for every trial of a setting)."""
    rows = []
    included = study.included_trials()
    for baseline in study.baselines:
        row = {"arm": baseline_label(baseline, study.baselines), "statuses": BASELINE_STATUS}
        for metric in image_metrics():
            for point in POINTS:
                row[f"{metric}_{point}_mean"] = baseline["metrics"].get(metric, np.nan)
            for point in test_points(study.trials) if not study.trials.empty else []:
                column = f"zero_filled_{point_column(point, metric)}"
                row[f"{metric}_{point}_mean"] = included[column].mean() if column in included else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(study: Study) -> pd.DataFrame:
    """For each pair of arms, each metric and each point: the paired difference over matched seeds."""
    trials = study.included_trials()
    if trials.empty or "seed" not in trials:
        return pd.DataFrame()
    match = [*study.config_keys, "seed"]
    rows = []
    for reference, other in pairs(study.arms()):
        a = trials[trials["arm"] == reference]
        b = trials[trials["arm"] == other]
        matched = a.merge(b, on=match, suffixes=("_a", "_b"))
        for point in points(study):
            for metric in image_metrics():
                column = point_column(point, metric)
                if f"{column}_a" not in matched:
                    continue
                differences = (matched[f"{column}_b"] - matched[f"{column}_a"]).tolist()
                result = paired_test(differences)
                rows.append(
                    {
                        "arm": other,
                        "reference": reference,
                        "metric": metric,
                        "point": point,
                        "pairs": result["n"],
                        "mean_difference": result["mean"],
                        "std": result["std"],
                        "ci95_low": result["ci_low"],
                        "ci95_high": result["ci_high"],
                        "t": result["t"],
                        "p_ttest": result["p_ttest"],
                        "p_wilcoxon": result["p_wilcoxon"],
                        "significant_5pct": bool(result["p_ttest"] < 0.05),
                    }
                )
    table = pd.DataFrame(rows)
    # Arms that share no seed and configuration (different experiments) have nothing to compare.
    return table[table["pairs"] > 0].reset_index(drop=True) if not table.empty else table


def _markdown_summary(table: pd.DataFrame, study: Study, point: str) -> str:
    rows = []
    primary = metric_table()[PRIMARY_METRIC]
    ordered = table.sort_values(
        f"{PRIMARY_METRIC}_{point}_mean", ascending=not primary.higher_is_better, na_position="last"
    )
    gain = gain_column(point, PRIMARY_METRIC)
    for _, row in ordered.iterrows():
        baseline = row["statuses"] == BASELINE_STATUS
        out = {"Architecture": row["arm"], "Configuration": config_text(row, study.config_keys)}
        out["Seeds"] = "–" if baseline else int(row[f"{PRIMARY_METRIC}_{point}_n"])
        out["Epochs"] = "–" if baseline else row["epochs"]
        for name, metric in metric_table().items():  # in the table's order (fastMRI's NMSE, PSNR, SSIM)
            out[metric.label] = mean_std_text(
                row[f"{name}_{point}_mean"], row.get(f"{name}_{point}_std"), metric.fmt
            )
        if point.startswith("test_"):  # beside it, the validation value the checkpoint was chosen by
            out[f"{primary.label} (validation, selected)"] = mean_std_text(
                row[f"{PRIMARY_METRIC}_best_mean"], row.get(f"{PRIMARY_METRIC}_best_std"), primary.fmt
            )
        if point != "last" and f"{gain}_mean" in row:
            out[f"{primary.label} gain over zero-filled (95% CI)"] = (
                "–"
                if baseline
                else gain_text(
                    row[f"{gain}_mean"], row[f"{gain}_ci95_low"], row[f"{gain}_ci95_high"], primary.fmt
                )
            )
        failed = row.get("failed")
        out["Trials"] = row["statuses"] + (" (failed ones excluded)" if pd.notna(failed) and failed else "")
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def verdicts(study: Study) -> list[str]:
    """Per arm (its best configuration), whether it beats the zero-filled input on the primary metric.

    Beats: the mean gain over seeds is positive and its 95% interval excludes 0; inconclusive: positive
    mean but an interval that includes 0 (or a single seed); does not beat: mean gain <= 0.
    """
    table = summary_table(study)
    if table.empty or not study.baselines:
        return []
    metric = metric_table()[PRIMARY_METRIC]
    point = reported_point(study)
    gain = gain_column(point, PRIMARY_METRIC)
    trained = table[table["statuses"] != BASELINE_STATUS]
    lines = []
    for arm, rows in trained.groupby("arm", sort=False):  # the table is sorted best first
        row = rows.iloc[0]
        mean, low, high, n, above = (
            row[f"{gain}_{k}"] for k in ("mean", "ci95_low", "ci95_high", "n", "above")
        )
        if pd.isna(mean):
            verdict = "no gain can be computed (no matching baseline)"
        elif mean <= 0:
            verdict = "does **not** beat the zero-filled input"
        elif pd.isna(low) or low <= 0:
            verdict = "is inconclusive against the zero-filled input"
        else:
            verdict = "beats the zero-filled input"
        text = gain_text(mean, low, high, metric.fmt)
        lines.append(
            f"{arm} {verdict}: {metric.label} gain {text} over {int(n)} seed(s), {int(above)} of them above "
            f"({point_label(point)})"
        )
    return lines


def gain_text(mean: float, low: float, high: float, fmt: str) -> str:
    """``+0.0412 [+0.0210, +0.0614]`` (without the interval for a single seed)."""
    if pd.isna(mean):
        return "–"
    interval = "" if pd.isna(low) else f" [{low:+{fmt}}, {high:+{fmt}}]"
    return f"{mean:+{fmt}}{interval}"


def _markdown_pairs(table: pd.DataFrame, point: str, metrics: Sequence[str] | None = None) -> str:
    metrics = list(image_metrics()) if metrics is None else metrics
    shown = table[(table["point"] == point) & table["metric"].isin(metrics)].copy() if len(table) else table
    if shown.empty:
        return "_(no matched pairs of arms)_\n"
    shown["difference"] = shown["arm"] + " − " + shown["reference"]
    shown = shown[
        ["difference", "metric", "pairs", "mean_difference", "ci95_low", "ci95_high", "p_ttest", "p_wilcoxon"]
    ]
    formats = {"mean_difference": ".4g", "ci95_low": ".4g", "ci95_high": ".4g"}
    formats.update({"p_ttest": ".3g", "p_wilcoxon": ".3g"})
    return markdown_table(shown, formats)


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``compare_models.csv``, ``paired_differences.csv`` and ``compare_models.md``."""
    result = StepResult("Model comparison (Table 1)")
    summary = summary_table(study)
    differences = paired_differences(study)
    if summary.empty:
        result.problems.append("compare_models: no trial has metrics to compare")
        return result
    out.write_csv("compare_models.csv", summary)
    out.write_csv("paired_differences.csv", differences)
    reported = reported_point(study)
    text = [
        "# Model comparison\n",
        "Mean ± std over seeds; `Seeds` counts the trials with a value. Errored and diverged trials are "
        "excluded; stopped and unfinished trials count with the epochs they ran. Selection rule: each "
        f"trial's checkpoint of its best validation {PRIMARY_METRIC.upper()}; the test split is read only by "
        "the final evaluation of that checkpoint.\n",
    ]
    if not reported.startswith("test_"):
        text.append("_This experiment has no test evaluation (made before the held-out split): its numbers "
                    "are validation numbers, chosen on the same data._\n")  # fmt: skip
    for point in points(study):
        text += [f"## {point_label(point)}\n", _markdown_summary(summary, study, point)]
    text += [
        f"\n## Paired differences, {point_label(reported)}\n",
        "Arm − reference over matched seeds, with a 95% t interval.\n",
        _markdown_pairs(differences, reported),
    ]
    breakdown = breakdown_table(study)
    if not breakdown.empty:
        out.write_csv("compare_models_breakdown.csv", breakdown)
        text += ["\n## Test split per acceleration and acquisition\n", breakdown_markdown(breakdown)]
        result.artifacts.append(Artifact(
            "compare_models_breakdown.csv",
            "Test metrics per arm, acceleration and acquisition (mean ± std over seeds of each trial's mean "
            "over that acquisition's volumes), with the zero-filled input of the same volumes.",
        ))  # fmt: skip
    out.write_text("compare_models.md", "\n".join(text))
    result.markdown = "\n".join(
        [
            f"Reported: {point_label(reported)}.\n",
            _markdown_summary(summary, study, reported),
            f"{metric_table()[PRIMARY_METRIC].label} differences (arm − reference), same point:\n",
            _markdown_pairs(differences, reported, [PRIMARY_METRIC]),
            *(["Test split per acceleration and acquisition:\n", breakdown_markdown(breakdown)]
              if not breakdown.empty else []),
        ]
    )  # fmt: skip
    result.artifacts += [
        Artifact(
            "compare_models.md",
            f"{', '.join(m.label for m in metric_table().values())} per architecture and configuration as "
            "mean ± std over seeds, at the best and the last epoch, sorted by "
            f"{metric_table()[PRIMARY_METRIC].label}, with the paired differences between architectures.",
        ),
        Artifact("compare_models.csv", "The same per-configuration statistics (mean, std, min, max, n)."),
        Artifact(
            "paired_differences.csv",
            "Paired differences between every two architectures over matched seeds at the best and last "
            "epoch: mean, 95% confidence interval, paired t-test and Wilcoxon p-values.",
        ),
    ]
    few = differences[(differences["pairs"] < 2)] if not differences.empty else differences
    if not few.empty:
        result.notes.append("some pairs of arms share fewer than two seeds: no interval or test for them")
    return result


def breakdown_table(study: Study) -> pd.DataFrame:
    """Test metrics per arm, acceleration and acquisition: each included trial's mean over that
    acquisition's test volumes, then mean ± std over seeds; the zero-filled rows of the same volumes."""
    volumes = study.volumes
    if volumes.empty or "split" not in volumes or not (volumes["split"] == "test").any():
        return pd.DataFrame()
    test = volumes[(volumes["split"] == "test") & volumes["included"].fillna(False).astype(bool)].copy()
    test["arm"] = test["arm"].where(test["source"] == "network", "zero-filled input")
    keys = ["arm", "acceleration", "acquisition"]
    metrics = list(image_metrics())
    per_trial = test.groupby([*keys, "experiment", "trial_id"], dropna=False)[metrics].mean().reset_index()
    table = aggregate(per_trial, keys, metrics)
    volumes_per = test.groupby(keys)["file"].nunique().rename("volumes").reset_index()
    order = ["acceleration", "acquisition", f"{PRIMARY_METRIC}_mean"]
    return table.merge(volumes_per, on=keys).sort_values(order, ascending=[True, True, False])


def breakdown_markdown(table: pd.DataFrame) -> str:
    rows = []
    for _, row in table.iterrows():
        out = {"Acceleration": f"{int(row['acceleration'])}x", "Acquisition": row["acquisition"],
               "Architecture": row["arm"], "Volumes": int(row["volumes"])}  # fmt: skip
        seeds = int(row[f"{PRIMARY_METRIC}_n"])
        out["Seeds"] = "–" if row["arm"] == "zero-filled input" else seeds
        for name, metric in metric_table().items():
            out[metric.label] = mean_std_text(row[f"{name}_mean"], row.get(f"{name}_std"), metric.fmt)
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
