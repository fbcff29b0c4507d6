"""The attention coefficients' distribution against epoch and against gamma, per level.

Every attention trial reports, per validation epoch from epoch 0 (the untrained network), the mean of its
coefficients alpha, their 10/50/90% quantiles and the fractions below 0.1 and above 0.9, pooled over levels
and per level (level 1 the finest; :mod:`mri_models.attention_metrics`). This step draws

- ``attention_curves.png``: per level, the mean alpha (line, mean over seeds) inside its 10-90% quantile
  band against epoch, one colour per arm and configuration, the lowest mean the paper's gate allows
  (:data:`INSTANCE_BOUND`) dotted;
- ``attention_gamma.png``: per level, mean alpha and the fraction below 0.1 against gamma at the common
  budget (the last epoch every trial reached: what the penalty did after the same training, not at an
  epoch chosen by SSIM), mean ± std over seeds, one line per configuration (gate);

and writes both tables as CSV (``attention_curves.csv``, ``attention_gamma.csv``).

Run ``python -m analysis.attention_curves --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis.cli import run_step
from analysis.output import Artifact, OutDir, StepResult, config_text, markdown_table, mean_std_text
from analysis.seed_stats import aggregate, at_common_budget, config_groups
from analysis.study import Study, option_keys
from mri_models.models import INSTANCE_NORM_FLOOR

# The least mean alpha the paper's gate (psi followed by an instance norm without affine parameters) can
# reach, whatever its logits (docs/attention.md).
INSTANCE_BOUND = INSTANCE_NORM_FLOOR
STATISTICS = ("alpha_mean", "alpha_q10", "alpha_q50", "alpha_q90", "alpha_below_0_1", "alpha_above_0_9")


def levels(table: pd.DataFrame) -> list[str]:
    """Column suffixes of the pooled statistics (``""``) and of each reported level, in level order."""
    matches = [(re.fullmatch(r"alpha_mean_level_(\d+)", c), c) for c in table]
    found = sorted({int(m.group(1)) for m, c in matches if m and table[c].notna().any()})
    return ["", *(f"_level_{level}" for level in found)]


def _columns(suffixes: Sequence[str]) -> list[str]:
    return [f"{name}{suffix}" for suffix in suffixes for name in STATISTICS]


def epoch_table(study: Study) -> pd.DataFrame:
    """Per arm, configuration and epoch: mean/std/min/max/n over seeds of every coefficient statistic."""
    epochs = study.included_epochs()
    if epochs.empty or "alpha_mean" not in epochs:
        return pd.DataFrame()
    epochs = epochs[epochs["has_attention"].astype(bool) & epochs["alpha_mean"].notna()]
    if epochs.empty:
        return pd.DataFrame()
    keys = [k for k in study.config_keys if k in epochs]
    table = aggregate(epochs, ["arm", *keys, "epoch"], _columns(levels(epochs)))
    rank = epochs.drop_duplicates("arm").set_index("arm")["arm_rank"]
    table["_rank"] = table["arm"].map(rank)
    return table.sort_values(["_rank", *keys, "epoch"]).drop(columns="_rank").reset_index(drop=True)


def gamma_table(study: Study) -> pd.DataFrame:
    """Per configuration and gamma: the statistics at the common budget, over seeds (``attrs["epoch"]``)."""
    trials = study.included_trials()
    if trials.empty or "gamma" not in trials:
        return pd.DataFrame()
    trials = trials[trials["has_attention"].astype(bool)]
    columns = _columns(levels(study.epochs)) if not study.epochs.empty else []
    at, budget = at_common_budget(study, trials, columns)
    if at.empty or "alpha_mean" not in at:
        return pd.DataFrame()
    keys = [k for k in study.config_keys if k in at]
    table = aggregate(at, [*keys, "gamma"], _columns(levels(at))).sort_values([*keys, "gamma"])
    table.attrs["epoch"] = budget
    return table


def _level_title(suffix: str) -> str:
    if not suffix:
        return "all levels"
    level = suffix.rsplit("_", 1)[1]
    return f"level {level}" + (" (finest)" if level == "1" else "")


def plot_epochs(table: pd.DataFrame, keys: list[str]) -> plt.Figure:
    suffixes = levels(table.rename(columns=lambda c: c.removesuffix("_mean")))
    figure, axes = plt.subplots(1, len(suffixes), figsize=(4.4 * len(suffixes), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    groups = table.groupby(["arm", *keys], dropna=False, sort=False)
    shown = [k for k in keys if k not in option_keys()]  # the arm's name already shows the options
    for ax, suffix in zip(axes[0], suffixes, strict=True):
        for k, (group, rows) in enumerate(groups):
            values = dict(zip(["arm", *keys], group if isinstance(group, tuple) else (group,), strict=True))
            label = values["arm"] + (f" [{config_text(values, shown)}]" if shown else "")
            colour = colours(k % 10)
            ax.plot(
                rows["epoch"], rows[f"alpha_mean{suffix}_mean"], marker="o", ms=3, color=colour, label=label
            )
            low, high = rows[f"alpha_q10{suffix}_mean"], rows[f"alpha_q90{suffix}_mean"]
            ax.fill_between(rows["epoch"], low, high, color=colour, alpha=0.12, linewidth=0)
        ax.axhline(
            INSTANCE_BOUND, color="grey", linestyle=":", linewidth=1, label="lowest mean, paper's gate"
        )
        ax.set_title(_level_title(suffix))
        ax.set_xlabel("epoch (0: untrained)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_ylabel("alpha: mean, 10-90% band")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 3)
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.suptitle("Attention coefficients against epoch (mean over seeds of each statistic)")
    figure.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return figure


def plot_gamma(table: pd.DataFrame, keys: list[str]) -> plt.Figure:
    suffixes = levels(table.rename(columns=lambda c: c.removesuffix("_mean")))
    figure, axes = plt.subplots(2, len(suffixes), figsize=(4.4 * len(suffixes), 6.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    rows_of = [("alpha_mean", "mean alpha"), ("alpha_below_0_1", "fraction of alpha < 0.1")]
    positive = table.loc[table["gamma"] > 0, "gamma"]
    linthresh = float(positive.min()) if len(positive) else 1e-7
    for column, suffix in enumerate(suffixes):
        for row, (name, label) in enumerate(rows_of):
            ax = axes[row, column]
            for k, (config, rows) in enumerate(config_groups(table, keys)):
                text = config_text(config, list(config)) or "all trials"
                mean, std = rows[f"{name}{suffix}_mean"], rows[f"{name}{suffix}_std"].fillna(0.0)
                ax.errorbar(rows["gamma"], mean, yerr=std, marker="o", ms=4, capsize=3, color=colours(k % 10),
                            label=text)  # fmt: skip
            if name == "alpha_mean":
                ax.axhline(INSTANCE_BOUND, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlim(-0.5 * linthresh, 2 * table["gamma"].max())
            ax.set_ylim(0, 1)
            ax.set_xlabel("γ")
            ax.set_ylabel(label)
            ax.set_title(_level_title(suffix))
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(
        f"Attention coefficients against γ at epoch {table.attrs.get('epoch')}, the common budget "
        "(mean ± std over seeds)"
    )
    figure.tight_layout()
    return figure


def markdown(table: pd.DataFrame, keys: list[str]) -> str:
    """The gamma table in words: per configuration and gamma, the pooled statistics."""
    rows = []
    for _, row in table.iterrows():
        out = {"Configuration": config_text(row, keys) or "–", "γ": f"{row['gamma']:g}"}
        out["Seeds"] = int(row["alpha_mean_n"])
        labels = {"alpha_mean": "mean α", "alpha_q10": "10%", "alpha_q50": "median", "alpha_q90": "90%",
                  "alpha_below_0_1": "< 0.1", "alpha_above_0_9": "> 0.9"}  # fmt: skip
        for name, label in labels.items():
            out[label] = mean_std_text(row[f"{name}_mean"], row[f"{name}_std"], ".3f")
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def run(study: Study, out: OutDir) -> StepResult:
    """Write the attention figures and tables (nothing when no trial has attention statistics)."""
    result = StepResult("Attention coefficients")
    epochs = epoch_table(study)
    if epochs.empty:
        result.notes.append("attention_curves: no trial with attention reported coefficient statistics")
        return result
    keys = [k for k in study.config_keys if k in epochs]
    out.write_csv("attention_curves.csv", epochs)
    out.save_figure(plot_epochs(epochs, keys), "attention_curves.png")
    result.artifacts.append(Artifact(
        "attention_curves.png",
        "The attention coefficients against epoch from epoch 0 (the untrained network), per level (1 the "
        "finest): mean alpha inside its 10-90% quantile band, mean over seeds. Dotted: the least mean alpha "
        f"the paper's gate can reach ({INSTANCE_BOUND}), whatever the penalty.",
    ))  # fmt: skip
    gammas = gamma_table(study)
    if not gammas.empty and gammas["gamma"].nunique() > 1:
        out.write_csv("attention_gamma.csv", gammas)
        out.save_figure(plot_gamma(gammas, [k for k in keys if k in gammas]), "attention_gamma.png")
        result.artifacts.append(Artifact(
            "attention_gamma.png",
            "Mean alpha and the fraction of coefficients below 0.1 against γ, per level, after the same "
            f"training for every trial (epoch {gammas.attrs.get('epoch')}), mean ± std over seeds, one line "
            "per gate.",
        ))  # fmt: skip
        result.markdown = markdown(gammas, [k for k in keys if k in gammas])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
