"""SSIM, PSNR and NMSE against the sparsity weight gamma, mean ± std over seeds (the paper's Figure 8).

The Attention U-Net (gamma = 0) is both the leftmost point and a horizontal reference line; the x axis is
symlog so that 0 shows next to log-spaced gammas. Two series per metric: each trial's best epoch over its
whole run, and the value at a common epoch budget, the largest epoch every completed or ASHA-stopped trial
reached (typically ASHA's grace period), because trials stopped early by ASHA had fewer epochs to reach
their best; stopped trials are drawn as crosses. A U-Net in the same experiments is a dotted reference.

Run ``python -m analysis.gamma_curves --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.cli import run_step
from analysis.output import Artifact, OutDir, StepResult, baseline_label, config_text, draw_baselines
from analysis.points import common_budget, metric_at_epoch
from analysis.seed_stats import aggregate, config_groups
from analysis.study import Study, image_metrics
from mri_models.metrics import Metric


def trial_points(study: Study) -> tuple[pd.DataFrame, int | None]:
    """Per attention trial and point (``best`` over the run, ``budget`` at the common epoch): metrics.

    Returns:
        The long table (columns ``point``, ``gamma``, config keys, ``status``, metrics) and the budget.
    """
    trials = study.included_trials()
    if trials.empty:
        return pd.DataFrame(), None
    trials = trials[trials["has_attention"]]
    budget = common_budget(trials)
    keys = ["experiment", "trial_id", "gamma", "seed", "status", *study.config_keys]
    keys = list(dict.fromkeys(k for k in keys if k in trials))
    best = trials[keys].copy()
    for metric in image_metrics():
        best[metric] = trials.get(f"best_{metric}", np.nan)
    best["epoch"] = trials["best_epoch"]
    best.insert(0, "point", "best")
    frames = [best]
    if budget is not None:
        at = metric_at_epoch(study.epochs, budget, list(image_metrics()))
        at = trials[keys].merge(at, on=["experiment", "trial_id"], how="inner")
        at["epoch"] = budget
        at.insert(0, "point", "budget")
        frames.append(at)
    return pd.concat(frames, ignore_index=True), budget


def curves_table(points: pd.DataFrame, config_keys: list[str]) -> pd.DataFrame:
    """Per configuration, point and gamma: mean/std/min/max/n of each metric, and the stopped count."""
    by = ["point", *[k for k in config_keys if k in points], "gamma"]
    table = aggregate(points, by, list(image_metrics()))
    stopped = points.groupby(by, dropna=False)["status"].apply(lambda s: int((s == "stopped").sum()))
    table = table.merge(stopped.rename("stopped").reset_index(), on=by, how="left")
    return table.sort_values(by).reset_index(drop=True)


def _unet_reference(study: Study, metric: str) -> float:
    trials = study.included_trials()
    values = trials.loc[trials["arm"] == "unet", f"best_{metric}"] if not trials.empty else []
    return float(np.nanmean(values)) if len(values) and np.isfinite(values).any() else np.nan


def plot(study: Study, points: pd.DataFrame, table: pd.DataFrame, budget: int | None) -> plt.Figure:
    """One panel per metric: the curves over gamma, the gamma = 0 reference lines, the trials."""
    gammas = sorted(points["gamma"].unique())
    metrics = image_metrics()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    styles = {
        "best": {"linestyle": "-", "marker": "o", "label": "best epoch of the run"},
        "budget": {"linestyle": "--", "marker": "s", "label": f"at epoch {budget} (common budget)"},
    }
    groups = config_groups(table, study.config_keys)
    for ax, (metric, spec) in zip(axes[0], metrics.items(), strict=True):
        _draw_curves(ax, groups, metric, styles)
        _draw_trials(ax, points[points["point"] == "best"], metric)
        unet = _unet_reference(study, metric)
        if np.isfinite(unet):
            ax.axhline(unet, color="black", linestyle=":", linewidth=1.2, label="U-Net (best epoch)")
        draw_baselines(ax, study.baselines, metric)
        _label_axes(ax, gammas, spec)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    figure.suptitle("Sparse Attention U-Net: validation metrics against γ (mean ± std over seeds)")
    figure.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 3), 1, 1))
    return figure


def _draw_curves(
    ax: plt.Axes, groups: list[tuple[dict, pd.DataFrame]], metric: str, styles: dict[str, dict[str, str]]
) -> None:
    """Per configuration and series (``best``, ``budget``): mean ± std over gamma, and its value at gamma = 0
    (the Attention U-Net) as a reference line."""
    colours = plt.get_cmap("tab10")
    for k, (config, rows) in enumerate(groups):
        suffix = f" [{config_text(config, list(config))}]" if config else ""
        for j, (point, style) in enumerate(styles.items()):
            # One configuration: colour tells the two series apart; several: it tells configurations.
            colour = colours(j) if len(groups) == 1 else colours(k % 10)
            line = rows[rows["point"] == point].sort_values("gamma")
            if line.empty:
                continue
            ax.errorbar(
                line["gamma"],
                line[f"{metric}_mean"],
                yerr=line[f"{metric}_std"].fillna(0.0),
                color=colour,
                capsize=3,
                linestyle=style["linestyle"],
                marker=style["marker"],
                ms=5,
                label=style["label"] + suffix,
                alpha=0.9 if point == "best" else 0.6,
            )
            reference = line[line["gamma"] == 0]
            if not reference.empty:
                ax.axhline(
                    reference[f"{metric}_mean"].iloc[0],
                    color=colour,
                    linestyle=style["linestyle"],
                    linewidth=0.9,
                    alpha=0.5,
                    label=f"Attention U-Net (γ=0), {point}{suffix}",
                )


def _draw_trials(ax: plt.Axes, trials: pd.DataFrame, metric: str) -> None:
    """Individual trials of the full-run series; crosses for those ASHA stopped early."""
    for stopped, marker in ((False, "."), (True, "x")):
        chosen = trials[(trials["status"] == "stopped") == stopped]
        if not chosen.empty:
            ax.scatter(
                chosen["gamma"],
                chosen[metric],
                marker=marker,
                color="black" if not stopped else "tab:red",
                s=22,
                alpha=0.6,
                zorder=3,
                label="trial stopped early by ASHA" if stopped else "trial (best epoch)",
            )


def _label_axes(ax: plt.Axes, gammas: list[float], spec: Metric) -> None:
    """A symlog gamma axis (so that 0 shows next to log-spaced gammas) ticked at the gammas run."""
    nonzero = [g for g in gammas if g > 0]
    if nonzero:
        ax.set_xscale("symlog", linthresh=min(nonzero), linscale=0.5)
    ax.set_xticks(gammas)
    ax.set_xticklabels([f"{g:g}" for g in gammas], rotation=30)
    ax.set_xlabel("γ (attention sparsity weight, symlog)")
    ax.set_ylabel(spec.label + ("" if spec.higher_is_better else " (lower is better)"))
    ax.set_title(f"{spec.label} against γ")
    ax.grid(alpha=0.3)


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``gamma_curves.csv`` and ``gamma_curves.png``."""
    result = StepResult("SSIM against gamma (Figure 8)")
    points, budget = trial_points(study)
    if points.empty or points["gamma"].nunique() < 2:
        result.notes.append(
            "gamma_curves: fewer than two gamma values among attention trials; nothing to draw"
        )
        return result
    table = curves_table(points, study.config_keys)
    # The reference the curves are read against, in the same columns: point "zero-filled", no gamma.
    baselines = [
        {
            "point": baseline_label(b, study.baselines),
            **{f"{m}_mean": b["metrics"].get(m) for m in image_metrics()},
        }
        for b in study.baselines
    ]
    out.write_csv("gamma_curves.csv", pd.concat([table, pd.DataFrame(baselines)], ignore_index=True))
    out.write_csv("gamma_trials.csv", points)
    out.save_figure(plot(study, points, table, budget), "gamma_curves.png")
    stopped = int((points[points["point"] == "best"]["status"] == "stopped").sum())
    result.artifacts += [
        Artifact(
            "gamma_curves.png",
            f"{', '.join(m.label for m in image_metrics().values())} against γ (mean ± std over seeds) at "
            "each trial's best epoch and at the "
            f"common budget of epoch {budget}, with γ=0 (Attention U-Net) as reference line; "
            f"{stopped} trial(s) stopped early by ASHA are crosses.",
        ),
        Artifact("gamma_curves.csv", "The curves' mean, std, min, max, seed count and stopped count per γ."),
        Artifact("gamma_trials.csv", "Every attention trial's metrics at its best epoch and at the budget."),
    ]
    missing = points[(points["point"] == "best")].merge(
        points[points["point"] == "budget"][["experiment", "trial_id"]], how="left", indicator=True
    )
    short = missing[missing["_merge"] == "left_only"]
    if len(short):
        result.notes.append(
            f"gamma_curves: {len(short)} trial(s) never reached the common budget of epoch {budget} "
            "(unfinished or errored) and are absent from that series"
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
