"""The whole sweep at a glance: every trial's hyper-parameters, its best SSIM and its learning curve.

- ``sweep_parallel.png``: parallel coordinates, one polyline per trial through its hyper-parameter values
  (each axis normalised to [0, 1]; axes with few values, and the model, are drawn as evenly spaced
  categories) ending at its best validation SSIM, coloured by that SSIM; failed trials are dashed.
- ``learning_curves.png``: validation SSIM (and loss) against epoch of every trial, coloured by status
  (completed, stopped by ASHA, unfinished, errored, diverged); a cross marks where a trial ended early. On
  the axis of ASHA's metric a dash marks the rung's cut-off at each of its decisions, and a dotted line
  joins a stopped trial's value to the cut-off it fell below.
- ``sweep_decisions.csv``: every ASHA decision (:func:`analysis.collect.decision_table`) with the trial's
  hyper-parameters; the report lists the stops (trial, rung, value, cut-off) under the figures.

Run ``python -m analysis.sweep_overview --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.cli import run_step
from analysis.collect import decision_table
from analysis.output import Artifact, OutDir, StepResult, draw_baselines, markdown_table
from analysis.study import Study
from mri_models.experiment import DECISION_STOP
from mri_models.models import model_names

MAX_CATEGORIES = 12  # axes with at most this many distinct values are drawn as evenly spaced categories
MAX_STOPS_SHOWN = 20  # rows of the report's table of stops; sweep_decisions.csv has them all
STATUS_COLOURS = {
    "completed": "tab:green",
    "reached_target": "tab:olive",
    "stopped": "tab:orange",
    "unfinished": "tab:gray",
    "errored": "tab:purple",
    "diverged": "tab:red",
}


def hyperparameter_axes(study: Study) -> list[str]:
    """The trial columns to draw: experiment (several), every search key, and model/gamma when they vary."""
    trials = study.trials
    axes = ["experiment"] if len(study.experiments) > 1 else []
    for info in study.experiments:
        axes += [k for k in info.search_keys if k not in axes]
    for key in ("model", "gamma"):
        if key not in axes and key in trials and trials[key].nunique(dropna=False) > 1:
            axes.append(key)
    if "seed" in axes:  # the seed last, next to the result it scatters
        axes.append(axes.pop(axes.index("seed")))
    return [k for k in axes if k in trials]


def _sort_key(value) -> tuple:
    names = model_names()
    if isinstance(value, str) and value in names:
        return (0, names.index(value), "")
    if isinstance(value, (int, float, np.number)) and not pd.isna(value):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def normalise_axis(values: pd.Series) -> tuple[np.ndarray, list[float], list[str]]:
    """Positions in [0, 1] of a column's values, and the tick positions and labels of its axis."""
    numeric = pd.to_numeric(values, errors="coerce")
    distinct = sorted(values.drop_duplicates().tolist(), key=_sort_key)
    if numeric.notna().all() and len(distinct) > MAX_CATEGORIES:
        low, high = float(numeric.min()), float(numeric.max())
        span = high - low or 1.0
        ticks = np.linspace(low, high, 5)
        return ((numeric - low) / span).to_numpy(), list((ticks - low) / span), [f"{t:.3g}" for t in ticks]
    spacing = {v: (i / (len(distinct) - 1) if len(distinct) > 1 else 0.5) for i, v in enumerate(distinct)}
    positions = np.asarray([spacing[v] for v in values], dtype=float)
    labels = [f"{v:g}" if isinstance(v, float) else str(v) for v in distinct]
    return positions, [spacing[v] for v in distinct], labels


def plot_parallel(study: Study) -> plt.Figure:
    """Parallel coordinates of every trial's hyper-parameters and best SSIM."""
    trials = study.trials.reset_index(drop=True)
    axes_keys = hyperparameter_axes(study)
    names = [*axes_keys, "best SSIM"]
    columns = [trials[k] for k in axes_keys]
    ssim = pd.to_numeric(trials["best_ssim"], errors="coerce")
    finite = ssim[np.isfinite(ssim)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.01, high + 0.01
    positions, ticks = [], []
    for column in columns:
        pos, tick_pos, tick_labels = normalise_axis(column)
        positions.append(pos)
        ticks.append((tick_pos, tick_labels))
    ssim_pos = ((ssim - low) / (high - low)).to_numpy()
    ssim_ticks = np.linspace(low, high, 5)
    positions.append(ssim_pos)
    ticks.append((list((ssim_ticks - low) / (high - low)), [f"{t:.3f}" for t in ssim_ticks]))

    figure, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(names) + 2), 5.0))
    cmap, norm = plt.get_cmap("viridis"), plt.Normalize(low, high)
    rng = np.random.default_rng(0)  # a little jitter separates trials sharing every category
    data = np.vstack(positions).T if positions else np.zeros((len(trials), 0))
    jitter = rng.uniform(-0.015, 0.015, size=data.shape)
    jitter[:, -1] = 0.0
    for i, trial in trials.iterrows():
        y = data[i] + jitter[i]
        failed = trial["status"] in ("errored", "diverged")
        colour = cmap(norm(ssim[i])) if np.isfinite(ssim[i]) else "lightgray"
        ax.plot(range(len(names)), y, color=colour, linestyle="--" if failed else "-", alpha=0.8, lw=1.4)
    for x, (tick_pos, tick_labels) in enumerate(ticks):
        ax.axvline(x, color="black", lw=0.8)
        for p, label in zip(tick_pos, tick_labels, strict=True):
            ax.text(
                x - 0.04, p, label, ha="right", va="center", fontsize=8, color="dimgray",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
            )  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=10)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlim(-0.6, len(names) - 0.8)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    colourbar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    colourbar.set_label("best validation SSIM")
    handles = [
        Line2D([], [], color="gray", label="trial"),
        Line2D([], [], color="gray", linestyle="--", label="errored / diverged"),
        Line2D([], [], color="lightgray", label="no SSIM reported"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    ax.set_title(f"Every trial's hyper-parameters and best validation SSIM ({len(trials)} trials)")
    return figure


def study_decisions(study: Study) -> pd.DataFrame:
    """Every ASHA decision of the study's experiments, each with ``experiment`` and the trial's
    hyper-parameter values (:func:`hyperparameter_axes`); empty where no scheduler decided."""
    frames = [decision_table(info.path).assign(experiment=info.name) for info in study.experiments]
    frames = [frame for frame in frames if not frame.empty]
    if not frames or study.trials.empty:
        return pd.DataFrame()
    decisions = pd.concat(frames, ignore_index=True)
    keys = [key for key in hyperparameter_axes(study) if key != "experiment"]
    values = study.trials[["experiment", "trial_id", *keys]].drop_duplicates(["experiment", "trial_id"])
    decisions = decisions.merge(values, on=["experiment", "trial_id"], how="left")
    first = ["experiment", "trial_id", *keys]
    return decisions[[*first, *(c for c in decisions.columns if c not in first)]]


def draw_decisions(ax: plt.Axes, decisions: pd.DataFrame) -> list[Line2D]:
    """Each decision's cut-off at its epoch, and every stop's shortfall; the legend entries they need."""
    cut = decisions[decisions["cutoff"].notna()]
    ax.scatter(cut["epoch"], cut["cutoff"], marker="_", s=160, color="black", alpha=0.6, zorder=4)
    stops, colour = cut[cut["decision"] == DECISION_STOP], STATUS_COLOURS["stopped"]
    ax.vlines(stops["epoch"], stops["value"], stops["cutoff"], colors=colour, linestyles=":", lw=1.5)
    handles = [Line2D([], [], color="black", marker="_", ms=12, ls="", label="ASHA's cut-off at a decision")]
    if not stops.empty:
        handles.append(Line2D([], [], color=colour, ls=":", label="stopped: its value below the cut-off"))
    return handles


def stops_markdown(study: Study, decisions: pd.DataFrame) -> str:
    """The report's table of ASHA's stops: trial, hyper-parameters, rung, value, cut-off (the first
    :data:`MAX_STOPS_SHOWN`), after a line counting the decisions."""
    stops = decisions[decisions["decision"] == DECISION_STOP]
    metric = decisions["metric"].dropna().iloc[0] if decisions["metric"].notna().any() else "value"
    stopped = stops["trial_id"].nunique()
    text = (
        f"ASHA made {len(decisions)} decisions on validation {metric} and stopped {stopped} trial(s), each "
        f"at the rung where its {metric} fell short of the rung's cut-off (every decision, with the trial's "
        "hyper-parameters: `sweep_decisions.csv`).\n"
    )
    if stops.empty:
        return text
    columns = [c for c in stops.columns if c not in ("epoch", "metric", "mode", "decision")]
    if len(study.experiments) < 2:
        columns.remove("experiment")
    table = stops[columns].rename(columns={"value": metric, "cutoff": "cut-off"}).head(MAX_STOPS_SHOWN)
    more = len(stops) - len(table)
    text += "\n" + markdown_table(table, {metric: ".4f", "cut-off": ".4f", "rung": "g"})
    return text + (f"\n… and {more} more stops in `sweep_decisions.csv`.\n" if more > 0 else "")


def plot_learning_curves(study: Study, decisions: pd.DataFrame | None = None) -> plt.Figure:
    """Validation SSIM and loss against epoch of every trial, coloured by status; on the axis of ASHA's
    metric, its ``decisions`` (:func:`study_decisions`) as cut-offs and stops."""
    epochs = study.epochs
    metrics = [m for m in ("ssim", "val_loss") if m in epochs]
    figure, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(6.0 * max(1, len(metrics)), 4.2), squeeze=False
    )
    counts = study.trials["status"].value_counts().to_dict()
    decision_handles: list[Line2D] = []
    for ax, metric in zip(axes[0], metrics, strict=False):
        if decisions is not None and not decisions.empty and set(decisions["metric"]) == {metric}:
            decision_handles = draw_decisions(ax, decisions)
        for _, rows in epochs.sort_values("epoch").groupby(["experiment", "trial_id"], sort=False):
            status = rows["status"].iloc[0]
            colour = STATUS_COLOURS.get(status, "black")
            ax.plot(rows["epoch"], rows[metric], color=colour, alpha=0.7, lw=1.2, marker=".", ms=4)
            if status != "completed" and rows[metric].notna().any():
                last = rows[rows[metric].notna()].iloc[-1]
                ax.scatter([last["epoch"]], [last[metric]], marker="x", color=colour, s=40, zorder=3)
        if metric == "ssim":
            draw_baselines(ax, study.baselines, metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"ssim": "validation SSIM", "val_loss": "validation L1 loss"}[metric])
        ax.set_title({"ssim": "Validation SSIM", "val_loss": "Validation loss"}[metric] + " per trial")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=colour, label=f"{status} ({counts[status]})")
        for status, colour in STATUS_COLOURS.items()
        if status in counts
    ]
    handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="ended before the budget"))
    handles += [line for line in axes[0, 0].get_lines() if line.get_gid() == "zero-filled"]
    handles += decision_handles
    axes[0, 0].legend(handles=handles, fontsize=8)
    figure.suptitle("Learning curves of all trials, coloured by status")
    figure.tight_layout()
    return figure


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``sweep_parallel.png``, ``learning_curves.png`` and, under ASHA, ``sweep_decisions.csv`` (its
    stops shown in the report)."""
    result = StepResult("Sweep overview")
    if study.trials.empty:
        result.problems.append("sweep_overview: no trials to draw")
        return result
    out.save_figure(plot_parallel(study), "sweep_parallel.png")
    result.artifacts.append(
        Artifact(
            "sweep_parallel.png",
            "Parallel coordinates of every trial's hyper-parameters (normalised axes, categories evenly "
            "spaced) ending at its best validation SSIM, coloured by that SSIM; failed trials dashed.",
        )
    )
    if study.epochs.empty or "epoch" not in study.epochs:
        result.problems.append("sweep_overview: no epoch was reported by any trial; no learning curves")
        return result
    decisions = study_decisions(study)
    out.save_figure(plot_learning_curves(study, decisions), "learning_curves.png")
    result.artifacts.append(
        Artifact(
            "learning_curves.png",
            "Validation SSIM and loss against epoch for every trial, coloured by status (completed, stopped "
            "by ASHA, unfinished, errored, diverged); crosses mark trials that ended early"
            + ("; dashes ASHA's cut-off at each decision, dotted lines how far a stopped trial fell short."
               if not decisions.empty else "."),
        )
    )  # fmt: skip
    if not decisions.empty:
        out.write_csv("sweep_decisions.csv", decisions)
        result.artifacts.append(
            Artifact(
                "sweep_decisions.csv",
                "Every ASHA decision: trial, hyper-parameters, rung, the trial's value, the rung's cut-off, "
                "continue, stop or complete (the epoch budget).",
            )
        )
        result.markdown = stops_markdown(study, decisions)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
