"""The paper's Table 1 and more: NMSE, PSNR and SSIM per architecture and configuration over seeds.

For every arm (U-Net, Attention U-Net, Sparse Attention U-Net at each gamma; gamma = 0 is the Attention U-Net)
and configuration (the search keys other than the seed), the mean ± std over seeds of each metric on the
held-out test split at each test setting (4x and 8x: the checkpoint of the best validation SSIM, evaluated
on data no choice saw; what the report leads with), and on validation at the epoch of best validation SSIM
(chosen on the same data, so optimistic) and at the last epoch, sorted by SSIM. Where ASHA stopped some
trials the arms are compared at equal training first: validation at the common budget (the last epoch every
trial reached), which the verdicts and paired differences then rest on; the other readings stay, labelled.
A breakdown per acceleration and acquisition comes from the test split's per-volume rows. Then, for every
pair of arms, the paired differences over matched seeds (same seed, same other configuration keys): the
mean with its 95% t interval over seeds and its crossed bootstrap interval over seeds and test volumes
(:mod:`analysis.inference`), the variance components, the paired t-test with its Holm-adjusted p-value over
the whole table and, with at least six pairs, the Wilcoxon signed-rank test.

Errored and diverged trials are left out of the statistics (and counted in ``failed``); trials stopped by
ASHA or left unfinished count with the epochs they ran (their statuses are listed per row).

Run ``python -m analysis.compare_models --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.cli import run_step
from analysis.inference import ALPHA, estimate, holm, one_sided_p, paired_test, plan_t
from analysis.output import (
    Artifact,
    OutDir,
    StepResult,
    baseline_label,
    config_text,
    markdown_table,
    mean_std_text,
)
from analysis.points import point_column, point_label, test_points
from analysis.seed_stats import aggregate, seed_table, zero_filled_row
from analysis.study import Study, image_metrics, reported_point
from mri_models.metrics import PRIMARY_METRIC, metric_table

POINTS = {"best": f"epoch of best validation {PRIMARY_METRIC.upper()}", "last": "last epoch"}
BASELINE_STATUS = "baseline (no training)"


def points(study: Study) -> list[str]:
    """The points the tables show: the common budget where a scheduler stopped some trials (what the
    comparison then rests on), every test setting, then validation's best and last epoch."""
    tests = test_points(study.trials) if not study.trials.empty else []
    return [*(["budget"] if study.budget is not None else []), *tests, *POINTS]


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
    # The reported gain's crossed bootstrap over seeds and test volumes, beside its t interval.
    boots = [_gain_estimate(study, row, reported_point(study)) for _, row in table.iterrows()]
    table[f"{gain}_boot95_low"] = [b.boot_low for b in boots]
    table[f"{gain}_boot95_high"] = [b.boot_high for b in boots]
    for part in ("seed", "volume", "residual"):  # where the gain's spread comes from (test volumes only)
        table[f"{gain}_sd_{part}"] = [getattr(b.components, part) if b.components else np.nan for b in boots]
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
            for point in [*POINTS, "budget"]:  # validation: the baseline has no epochs
                row[f"{metric}_{point}_mean"] = baseline["metrics"].get(metric, np.nan)
            for point in test_points(study.trials) if not study.trials.empty else []:
                column = f"zero_filled_{point_column(point, metric)}"
                row[f"{metric}_{point}_mean"] = included[column].mean() if column in included else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(study: Study) -> pd.DataFrame:
    """For each pair of arms, each metric and each point: the paired difference over matched seeds.

    Per seed, the mean over test volumes of the per-volume difference (one value per trial at validation
    points); the t interval and tests over seeds, the crossed bootstrap over seeds and volumes, the
    variance components, and Holm's adjustment over every row of the table (``p_holm``, which
    ``significant_5pct`` reads).
    """
    trials = study.included_trials()
    if trials.empty or "seed" not in trials:
        return pd.DataFrame()
    match = [*study.config_keys, "seed"]
    rows = []
    for reference, other in itertools.combinations(study.arms(), 2):
        a, b = trials[trials["arm"] == reference], trials[trials["arm"] == other]
        for point in points(study):
            for metric in image_metrics():
                if point_column(point, metric) not in trials:
                    continue
                difference = seed_table(study, b, point, metric, match) - seed_table(
                    study, a, point, metric, match
                )
                rows.append({"arm": other, "reference": reference, "metric": metric, "point": point,
                             **_difference_columns(difference.dropna(how="all"))})  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # Arms that share no seed and configuration (different experiments) have nothing to compare.
    table = table[table["pairs"] > 0].reset_index(drop=True)
    table["p_holm"] = holm(table["p_ttest"].tolist())
    table["significant_5pct"] = table["p_holm"] < ALPHA
    return table


def _difference_columns(difference: pd.DataFrame) -> dict:
    result = estimate(difference)
    test = paired_test(list(result.per_seed))
    components = result.components
    return {
        "pairs": result.n, "volumes": result.volumes, "mean_difference": result.mean, "std": result.sd,
        "ci95_low": result.t_low, "ci95_high": result.t_high, "boot95_low": result.boot_low,
        "boot95_high": result.boot_high, "sd_seed": components.seed if components else np.nan,
        "sd_volume": components.volume if components else np.nan,
        "sd_residual": components.residual if components else np.nan, "t": test["t"],
        "p_ttest": test["p_ttest"], "p_wilcoxon": test["p_wilcoxon"],
    }  # fmt: skip


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
                    row[f"{gain}_mean"],
                    row[f"{gain}_ci95_low"],
                    row[f"{gain}_ci95_high"],
                    primary.fmt,
                    row.get(f"{gain}_boot95_low", np.nan),
                    row.get(f"{gain}_boot95_high", np.nan),
                )
            )
        failed = row.get("failed")
        out["Trials"] = row["statuses"] + (" (failed ones excluded)" if pd.notna(failed) and failed else "")
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def verdicts(study: Study) -> list[str]:
    """Per arm (its best configuration), whether it beats the zero-filled input on the primary metric.

    The gain per seed is its mean over test volumes of network minus zero-filled (the trial's gain at
    validation points). Beats: the one-sided t-test over seeds (gain > 0), Holm-adjusted over the arms,
    has p < 0.05; does not beat: mean gain <= 0; else inconclusive, with the seeds that would decide a
    gain of the size observed.
    """
    table = summary_table(study)
    if table.empty or not study.baselines:
        return []
    point = reported_point(study)
    trained = table[table["statuses"] != BASELINE_STATUS]
    best = [rows.iloc[0] for _, rows in trained.groupby("arm", sort=False)]  # the table is sorted best first
    gains = [_gain_estimate(study, row, point) for row in best]
    adjusted = holm([one_sided_p(g.per_seed, 0.0, "greater") for g in gains])
    strictest = ALPHA / max(len(best), 1)  # the seeds needed suffice at Holm's first step
    return [
        _verdict_line(row["arm"], g, p, point, strictest)
        for row, g, p in zip(best, gains, adjusted, strict=True)
    ]


def _gain_estimate(study: Study, row: pd.Series, point: str):
    """The gain over the zero-filled input of one arm and configuration, per seed and test volume."""
    trials = study.included_trials()
    keys = study.config_keys
    trials = trials[trials["arm"] == row["arm"]]
    for key in keys:
        trials = trials[trials[key].astype(str) == str(row[key])]
    zero_filled = zero_filled_row(study, point, PRIMARY_METRIC)
    table = seed_table(study, trials, point, PRIMARY_METRIC, ["seed"])
    if zero_filled is not None and "trial" not in table:
        sign = 1.0 if metric_table()[PRIMARY_METRIC].higher_is_better else -1.0
        return estimate(sign * table.sub(zero_filled, axis=1))
    gains = trials.set_index("seed")[[f"gain_{point_column(point, PRIMARY_METRIC)}"]]
    return estimate(gains)


def _verdict_line(arm: str, gain, p_adjusted: float, point: str, plan_alpha: float = ALPHA) -> str:
    metric = metric_table()[PRIMARY_METRIC]
    above = sum(x > 0 for x in gain.per_seed)
    if np.isnan(gain.mean):
        return f"{arm}: no gain can be computed (no matching baseline)"
    if gain.mean <= 0:
        verdict = "does **not** beat the zero-filled input"
    elif p_adjusted < ALPHA:
        verdict = "beats the zero-filled input"
    else:
        plan = plan_t(gain.mean, gain.sd, gain.n, plan_alpha)
        needed = (
            f"{plan.needed_observed} seeds would decide a gain this size"
            if plan.needed_observed
            else (
                "a second seed is needed for any test"
                if gain.n < 2
                else "no affordable number of seeds decides it"
            )
        )
        verdict = f"is inconclusive against the zero-filled input ({needed})"
    return (
        f"{arm} {verdict}: {metric.label} gain {gain.text(f'+{metric.fmt}')} over {gain.n} seed(s), "
        f"{above} of them above, Holm-adjusted p = {p_adjusted:.3g} ({point_label(point)})"
    )


def gain_text(
    mean: float, low: float, high: float, fmt: str, boot_low: float = np.nan, boot_high: float = np.nan
) -> str:
    """``+0.0412 [+0.0210, +0.0614]`` (without the interval for a single seed), with the bootstrap
    interval after it when given: ``+0.0412 [+0.0210, +0.0614; bootstrap +0.0301, +0.0533]``."""
    if pd.isna(mean):
        return "–"
    boot = "" if pd.isna(boot_low) else f"; bootstrap {boot_low:+{fmt}}, {boot_high:+{fmt}}"
    interval = "" if pd.isna(low) else f" [{low:+{fmt}}, {high:+{fmt}}{boot}]"
    return f"{mean:+{fmt}}{interval}"


def _markdown_pairs(table: pd.DataFrame, point: str, metrics: Sequence[str] | None = None) -> str:
    metrics = list(image_metrics()) if metrics is None else metrics
    shown = table[(table["point"] == point) & table["metric"].isin(metrics)].copy() if len(table) else table
    if shown.empty:
        return "_(no matched pairs of arms)_\n"
    shown["difference"] = shown["arm"] + " − " + shown["reference"]
    shown = shown[["difference", "metric", "pairs", "volumes", "mean_difference", "ci95_low", "ci95_high",
                   "boot95_low", "boot95_high", "p_ttest", "p_holm", "p_wilcoxon"]]  # fmt: skip
    formats = {c: ".4g" for c in ("mean_difference", "ci95_low", "ci95_high", "boot95_low", "boot95_high")}
    formats.update({"p_ttest": ".3g", "p_holm": ".3g", "p_wilcoxon": ".3g"})
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
        "Arm − reference over matched seeds: per seed the mean over test volumes of the per-volume "
        "difference; the 95% t interval over seeds (these test volumes) and the crossed bootstrap over seeds "
        "and volumes (new seeds and new knees); `p_holm` is Holm-adjusted over every row of "
        "`paired_differences.csv`.\n",
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
            "Paired differences between every two architectures over matched seeds at every point: mean, "
            "95% t and crossed-bootstrap intervals, variance components (seed, volume, residual), paired "
            "t-test with its Holm-adjusted p-value, and Wilcoxon p-values.",
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
