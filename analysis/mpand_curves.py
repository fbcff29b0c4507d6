"""MPAND against epoch per architecture or gamma, mean ± std over seeds (the paper's Figure 6).

MPAND (Mean Post Attention Norm Difference, ``docs/attention.md``) in its relative form, the percentage by
which attention shrinks a skip connection's norm, and its per-level values ``mpand_level_k`` (level 1 is
the finest, full-resolution skip) are averaged over seeds per epoch from epoch 0, the untrained network;
the band is ± one standard deviation, and the CSV also has the min and max, and the paper's absolute form
(``mpand_absolute``, in feature units). When an arm was run at
several configurations the curve is that of its best configuration by mean best SSIM, as the paper shows the
best configuration of each model. The plain U-Net has no attention (MPAND is NaN) and is skipped.

Run ``python -m analysis.mpand_curves --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis.cli import run_step
from analysis.output import Artifact, OutDir, StepResult, config_text
from analysis.seed_stats import aggregate, config_groups
from analysis.study import Study


def mpand_columns(epochs: pd.DataFrame) -> list[str]:
    """``mpand`` then ``mpand_level_1`` ... in level order, those present."""
    levels = sorted(
        (c for c in epochs.columns if c.startswith("mpand_level_")), key=lambda c: int(c.rsplit("_", 1)[1])
    )
    return (["mpand"] if "mpand" in epochs else []) + levels


def best_configuration(study: Study, arm: str) -> dict:
    """The configuration of an arm with the highest mean best SSIM over seeds."""
    trials = study.included_trials()
    trials = trials[trials["arm"] == arm]
    best, best_ssim = {}, -np.inf
    for config, group in config_groups(trials, study.config_keys):
        ssim = group["best_ssim"].mean()
        if np.isfinite(ssim) and ssim > best_ssim:
            best, best_ssim = config, ssim
    return best


def curves_table(study: Study) -> pd.DataFrame:
    """Per arm with MPAND and epoch: mean/std/min/max/n over seeds of every MPAND column."""
    epochs = study.included_epochs()
    columns = mpand_columns(epochs) if not epochs.empty else []
    if not columns:
        return pd.DataFrame()
    columns += [c for c in epochs if c.startswith("mpand_absolute")]
    frames = []
    for arm in study.arms():
        rows = epochs[epochs["arm"] == arm]
        if rows[columns].notna().sum().sum() == 0:
            continue  # U-Net: no attention gates, MPAND undefined
        config = best_configuration(study, arm)
        for key, value in config.items():
            rows = rows[rows[key].isna()] if pd.isna(value) else rows[rows[key] == value]
        table = aggregate(rows.sort_values("epoch"), ["epoch"], columns)
        table.insert(0, "arm", arm)
        table.insert(1, "configuration", config_text(config, list(config)))
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot(table: pd.DataFrame, columns: list[str]) -> plt.Figure:
    """One panel for MPAND and one per level; one line per arm with a ± std band over seeds."""
    figure, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for index, column in enumerate(columns):
        ax = axes[0, index]
        for k, (arm, rows) in enumerate(table.groupby("arm", sort=False)):
            x, mean, std = rows["epoch"], rows[f"{column}_mean"], rows[f"{column}_std"].fillna(0.0)
            n = int(rows[f"{column}_n"].max())
            ax.plot(
                x, mean, marker="o", ms=3, color=colours(k % 10), label=f"{arm} ({n} seed{'s' * (n != 1)})"
            )
            ax.fill_between(x, mean - std, mean + std, color=colours(k % 10), alpha=0.2, linewidth=0)
        title = "MPAND (mean over levels)" if column == "mpand" else f"level {column.rsplit('_', 1)[1]}"
        if column != "mpand" and column.endswith("_1"):
            title += " (finest)"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("skip norm change by attention (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("Relative MPAND against epoch, from the untrained network (mean ± std over seeds)")
    figure.tight_layout()
    return figure


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``mpand_curves.csv`` and ``mpand_curves.png``."""
    result = StepResult("MPAND curves (Figure 6)")
    table = curves_table(study)
    if table.empty:
        result.notes.append("mpand_curves: no trial with attention reported MPAND; nothing to draw")
        return result
    columns = [c for c in mpand_columns(study.epochs) if table[f"{c}_n"].max() > 0]
    out.write_csv("mpand_curves.csv", table)
    out.save_figure(plot(table, columns), "mpand_curves.png")
    result.artifacts += [
        Artifact(
            "mpand_curves.png",
            "Relative MPAND (and its per-level values, level 1 the finest) against epoch from epoch 0 (the "
            "untrained network) for each attention architecture or gamma, mean ± std over seeds: the "
            "percentage by which the gates shrink the skip features' norm; falling values mean they "
            "suppress more.",
        ),
        Artifact(
            "mpand_curves.csv",
            "The MPAND curves' mean, std, min, max and seed count per epoch, with the paper's absolute form.",
        ),
    ]
    skipped = [a for a in study.arms() if a not in set(table["arm"])]
    if skipped:
        result.notes.append(f"mpand_curves: no MPAND for {', '.join(skipped)} (no attention gates)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
