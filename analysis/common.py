"""What every analysis script shares: loading experiments into one study, seed statistics, output files.

A :class:`Study` is one or more experiment directories collected by :func:`analysis.collect.collect` and
joined with each trial's training configuration, read from the file the trial recorded
(``train_runs/<trial id>/train_config.json``, see :mod:`mri_models.experiment`), so every trial has a
``model`` and its penalty weights (``gamma``) even when neither was searched. Trials are grouped into
*arms* (:mod:`mri_models.arms`): the architecture and the penalties it trains with, so a Sparse Attention
U-Net at gamma = 0 counts as the Attention U-Net it is. The metrics shown are the metric table's
(:func:`mri_models.metrics.metric_table`), the primary one (SSIM) first.

Experiments written before trials recorded their configuration are merged from ``sweep.json`` and
``params.json`` (reported as a problem: profile defaults are then unknown). Nothing here needs Ray.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # scripts run headless on clusters and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import collect
from mri_models import experiment as storage
from mri_models.arms import arm_of, model_options, without_inapplicable
from mri_models.experiment import ASHA_STATE_FILE, BASELINE_FILE, SWEEP_FILE, ExperimentLayout
from mri_models.losses import penalty_by_weight_key
from mri_models.metrics import PRIMARY_METRIC, Metric, metric_table
from mri_models.models.registry import option_owners, reserved_penalties
from mri_models.plugins import load_plugins

# Trials whose numbers describe a (possibly partial) training run; failed ones are reported, not averaged.
INCLUDED_STATUSES = ("completed", "stopped", "unfinished")
STATUS_COLOURS = {
    "completed": "tab:green",
    "stopped": "tab:orange",
    "unfinished": "tab:gray",
    "errored": "tab:purple",
    "diverged": "tab:red",
}


def image_metrics() -> dict[str, Metric]:
    """The metric table with the primary metric (SSIM, the paper's focus) first."""
    table = metric_table()
    return {PRIMARY_METRIC: table[PRIMARY_METRIC], **table}


def weight_keys() -> list[str]:
    """The configuration keys of the penalty weights (``gamma``, ...)."""
    return list(penalty_by_weight_key())


def option_keys() -> list[str]:
    """The configuration keys of the registered architectures' own options (``psi_norm``, ...)."""
    return list(option_owners())


@dataclass
class ExperimentInfo:
    """One experiment directory as read from disk."""

    path: str
    name: str
    sweep: dict[str, Any]
    search_keys: list[str]

    @property
    def data_root(self) -> str | None:
        return self.sweep.get("data_root")


@dataclass
class Study:
    """Every trial and epoch of one or more experiments, with configuration and arm columns.

    Attributes:
        experiments: the experiment directories, in command-line order.
        trials: one row per trial: collect's columns plus ``experiment``, ``model``, ``gamma`` (every
            penalty weight), every architecture option (``psi_norm``: the model's value or default, None
            for models without it), ``arm``, ``arm_rank`` (sort order), ``included`` (counts in seed
            statistics) and the config keys.
        epochs: one row per trial and reported epoch, with the same identifying columns.
        config_keys: the columns that tell configurations of one arm apart (search keys other than seed,
            model and gamma, plus ``experiment`` when several experiments are analysed together).
        configs: resolved training configuration per ``(experiment, trial_id)``.
        baselines: the zero-filled baselines (``baseline.json``) of the experiments, one per distinct mask
            setting: ``{"metrics": {...}, "mask": {...}}``; trials carry their own as ``zero_filled_<metric>``
            columns and the primary metric's ``gain_best_<metric>`` (best epoch minus zero-filled).
        problems: everything found wrong while loading.
        volumes: one row per volume of every validation epoch and test evaluation (network and
            zero-filled), with ``experiment`` and, for trials' rows, ``arm`` and ``included``.
        budget: where a scheduler stopped some included trials, the last epoch every one of them reached
            (trials then carry ``budget_<metric>``: validation at that epoch); None otherwise.
    """

    experiments: list[ExperimentInfo]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    config_keys: list[str]
    configs: dict[tuple[str, str], dict[str, Any]]
    baselines: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    volumes: pd.DataFrame = field(default_factory=pd.DataFrame)  # collect's per-volume rows, with arms
    budget: int | None = None  # the common budget, where a scheduler stopped some trials

    def included_trials(self) -> pd.DataFrame:
        """Trials that count in seed statistics (not errored or diverged)."""
        if self.trials.empty:
            return self.trials
        return self.trials[self.trials["included"]]

    def included_epochs(self) -> pd.DataFrame:
        if self.epochs.empty:
            return self.epochs
        return self.epochs[self.epochs["included"]]

    def arms(self) -> list[str]:
        """Arm labels in display order (U-Net, Attention U-Net, Sparse by increasing gamma)."""
        if self.trials.empty:
            return []
        return list(self.trials.sort_values("arm_rank")["arm"].drop_duplicates())

    def experiment(self, name: str) -> ExperimentInfo:
        return next(e for e in self.experiments if e.name == name)


@dataclass
class Artifact:
    """A file an analysis step wrote, relative to the output directory, and what it shows."""

    path: str
    caption: str


@dataclass
class StepResult:
    """What one analysis step produced."""

    title: str
    artifacts: list[Artifact] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    markdown: str = ""  # a table to show inline in the report


# ----------------------------------------------------------------------------------------- names


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    text = text.replace("γ=", "gamma").replace("γ", "gamma")
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


# ----------------------------------------------------------------------------------------- loading


def experiment_name(path: str) -> str:
    return ExperimentLayout(path).name


def trial_config(
    layout: ExperimentLayout, trial_id: str, sweep: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """A trial's training configuration: the one it recorded, else merged from the sweep's files.

    Returns:
        The values and, when they had to be merged from ``sweep.json`` and ``params.json``, a note saying so.
    """
    recorded = storage.read_json(layout.train_run(trial_id).config_file)
    if recorded is not None:
        try:
            load_plugins(recorded.get("plugins") or ())  # their metrics and penalties join the tables
        except ValueError as err:
            return recorded, f"trial {trial_id}: {err}"
        return recorded, None
    values = {**((sweep.get("spec") or {}).get("train") or {}), **params}
    reserved = reserved_penalties()
    terms = penalty_by_weight_key()
    if "model" not in values:  # a searched weight reserved to a variant names the model (gamma: sparse)
        owners = [reserved[terms[k].name].name for k in params if k in terms and terms[k].name in reserved]
        values["model"] = owners[0] if owners else "unet"
    values = without_inapplicable(values, values["model"], searched=params)  # as the sweep did
    note = (
        "trials without train_config.json (written before trials recorded their configuration): "
        "configuration merged from sweep.json and params.json, profile defaults unknown"
    )
    return values, note


def _expected_trials(sweep: dict[str, Any]) -> int | None:
    spec = sweep.get("spec") or {}
    if "search" not in spec or "seeds" not in spec:
        return None
    sizes = [len(v) for v in spec["search"].values()] + [len(spec["seeds"])]
    return int(np.prod(sizes)) if sizes else None


def load_study(paths: Sequence[str]) -> Study:
    """Collect experiment directories (local or s3://) into one study; problems are listed, never raised.

    Raises:
        FileNotFoundError: only when none of the directories exists.
    """
    problems: list[str] = []
    infos: list[ExperimentInfo] = []
    trial_frames, epoch_frames, volume_frames = [], [], []
    configs: dict[tuple[str, str], dict[str, Any]] = {}
    baselines: list[dict[str, Any]] = []
    notes: set[str] = set()
    names = _unique_names(paths)
    for path, name in zip(paths, names, strict=True):
        try:
            experiment = collect(path)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        layout = ExperimentLayout(path)
        sweep = storage.read_json(layout.sweep_file) or {}
        if not sweep:
            problems.append(f"{name}: no {SWEEP_FILE}; search keys and epoch budget unknown")
        spec = sweep.get("spec") or {}
        asha = spec.get("scheduler", {}).get("type", "asha") == "asha"
        if asha and not storage.exists(layout.asha_state_file):
            problems.append(f"{name}: no {ASHA_STATE_FILE}; trials stopped by ASHA look unfinished")
        search_keys = list(sweep.get("search_keys") or [])
        infos.append(ExperimentInfo(path, name, sweep, search_keys))
        recorded = (storage.read_json(layout.baseline_file) or {}).get("baselines", [])
        if not recorded:
            problems.append(
                f"{name}: no {BASELINE_FILE} (written before baselines were recorded): results are not set "
                "against the zero-filled input"
            )
        baselines += [b for b in recorded if b not in baselines]
        problems.extend(f"{name}: {p}" for p in experiment.problems)
        trials = experiment.trials.copy()
        if trials.empty:
            continue
        rows = []
        for _, trial in trials.iterrows():
            params = storage.read_json(storage.join(layout.path, trial["trial_dir"], "params.json")) or {}
            values, note = trial_config(layout, trial["trial_id"], sweep, params)
            if note:
                notes.add(f"{name}: {note}")
            configs[(name, trial["trial_id"])] = values
            rows.append(values)
        for key in {k for values in rows for k in values} - set(trials.columns):
            if key in search_keys or key in ("model", "seed"):
                trials[key] = [values.get(key) for values in rows]
        trials["model"] = [values.get("model", "unet") for values in rows]
        for key in weight_keys():  # every penalty weight, 0 where the trial has none
            trials[key] = [float(values.get(key) or 0.0) for values in rows]
        options = [model_options(values["model"], values) for values in rows]  # with the model's defaults
        for key in option_keys():  # every architecture option, None where the trial's model has none
            trials[key] = [trial_options.get(key) for trial_options in options]
        arms = [
            arm_of(values["model"], {k: values.get(k) or 0.0 for k in weight_keys()}, trial_options)
            for values, trial_options in zip(rows, options, strict=True)
        ]
        trials["arm"] = [arm.name for arm in arms]
        trials["arm_rank"] = [arm.rank for arm in arms]
        trials["has_attention"] = [arm.has_attention for arm in arms]
        _add_baseline_columns(trials, rows, recorded)
        trials.insert(0, "experiment", name)
        expected = _expected_trials(sweep)
        if expected is not None and len(trials) < expected:
            problems.append(
                f"{name}: only {len(trials)} of {expected} grid trials were started (interrupted sweep?)"
            )
        unfinished = int((trials["status"] == "unfinished").sum())
        if unfinished:
            problems.append(
                f"{name}: {unfinished} trial(s) unfinished (interrupted sweep; resume it with --resume)"
            )
        trial_frames.append(trials)
        epochs = experiment.epochs.copy()
        if not epochs.empty:
            epochs.insert(0, "experiment", name)
            epoch_frames.append(epochs)
        if not experiment.volumes.empty:
            volume_frames.append(experiment.volumes.assign(experiment=name))
    if not infos:
        raise FileNotFoundError("; ".join(problems) or "no experiment directories given")
    problems.extend(sorted(notes))
    trials = pd.concat(trial_frames, ignore_index=True) if trial_frames else pd.DataFrame()
    config_keys = _config_keys(infos)
    if not trials.empty:
        for key in config_keys:
            if key not in trials:
                trials[key] = None
        trials["included"] = trials["status"].isin(INCLUDED_STATUSES)
    epochs = _join_epochs(epoch_frames, trials, config_keys)
    budget = _add_budget_columns(trials, epochs)
    volumes = pd.concat(volume_frames, ignore_index=True) if volume_frames else pd.DataFrame()
    if not volumes.empty and not trials.empty and "trial_id" in volumes:
        arms = trials[["experiment", "trial_id", "arm", "arm_rank", "included"]]
        volumes = volumes.drop(columns=[c for c in ("arm", "included") if c in volumes])
        volumes = volumes.merge(arms, on=["experiment", "trial_id"], how="left")
    return Study(infos, trials, epochs, config_keys, configs, baselines, problems, volumes, budget)


def _add_budget_columns(trials: pd.DataFrame, epochs: pd.DataFrame) -> int | None:
    """Where a scheduler stopped some trials, ``budget_<metric>`` (validation at the common budget) and
    ``gain_budget_<metric>`` over the zero-filled input; returns that epoch (None when every included trial
    ran the same number of epochs: there is nothing to equalise)."""
    included = trials[trials["included"]] if not trials.empty else trials
    if included.empty or included["epochs_run"].nunique() < 2 or epochs.empty:
        return None
    budget = common_budget(included)
    if budget is None:
        return None
    metrics = list(metric_table())
    at = metric_at_epoch(epochs, budget, metrics).rename(columns={m: f"budget_{m}" for m in metrics})
    merged = trials[["experiment", "trial_id"]].merge(at, on=["experiment", "trial_id"], how="left")
    for metric, spec in metric_table().items():
        values = pd.to_numeric(merged.get(f"budget_{metric}"), errors="coerce").to_numpy()
        trials[f"budget_{metric}"] = values
        sign = 1.0 if spec.higher_is_better else -1.0
        trials[f"gain_budget_{metric}"] = sign * (
            values - trials[f"zero_filled_{metric}"].to_numpy(dtype=float)
        )
    return budget


def matching_baseline(config: dict[str, Any], baselines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline of a trial's mask settings (the only one, when its configuration does not say)."""
    for baseline in baselines:
        if all(config.get(key) == value for key, value in baseline["mask"].items()):
            return baseline
    return (
        baselines[0] if len(baselines) == 1 and not any(k in config for k in baselines[0]["mask"]) else None
    )


def _add_baseline_columns(trials: pd.DataFrame, configs: list[dict], baselines: list[dict]) -> None:
    """``zero_filled_<metric>`` of each trial's own baseline and ``gain_best_<metric>`` over it; on the test
    split, ``gain_test_<metric>_<N>x`` over the zero-filled input of the same test volumes and setting."""
    matched = [matching_baseline(config, baselines) for config in configs]
    for metric, spec in metric_table().items():
        zero_filled = [b["metrics"].get(metric, math.nan) if b else math.nan for b in matched]
        trials[f"zero_filled_{metric}"] = zero_filled
        sign = 1.0 if spec.higher_is_better else -1.0  # a gain is always "better than zero-filled"
        best = pd.to_numeric(trials.get(f"best_{metric}"), errors="coerce")
        trials[f"gain_best_{metric}"] = sign * (best - np.asarray(zero_filled, dtype=float))
        for point in test_points(trials):
            column = point_column(point, metric)
            trials[f"gain_{column}"] = sign * (trials[column] - trials[f"zero_filled_{column}"])


def test_points(table: pd.DataFrame) -> list[str]:
    """The test settings a table of trials has results for (``test_4x``, ``test_8x``), in order."""
    prefix = f"test_{PRIMARY_METRIC}_"
    found = [c.removeprefix(prefix).removesuffix("x") for c in table.columns if c.startswith(prefix)]
    return [f"test_{n}x" for n in sorted(int(n) for n in found if n.isdigit())]


def point_column(point: str, metric: str) -> str:
    """The trial column of ``metric`` at a point: ``best_ssim``, ``last_ssim``, ``test_ssim_4x``."""
    if point.startswith("test_"):
        return f"test_{metric}_{point.removeprefix('test_')}"
    return f"{point}_{metric}"


def reported_point(study: Study) -> str:
    """What the tables report and the findings decide on: arms compared at equal training.

    Where a scheduler stopped some trials, validation at the common budget (every trial after the same
    epochs; no checkpoint is chosen there); else the first test setting (selected on validation, evaluated
    on data no choice saw) where the study has one, else the best validation epoch (optimistic: chosen on
    it).
    """
    if study.budget is not None:
        return "budget"
    points = test_points(study.trials) if not study.trials.empty else []
    return points[0] if points else "best"


def point_label(point: str) -> str:
    if point.startswith("test_"):
        return (
            f"test split at {point.removeprefix('test_')}, checkpoint of the best validation "
            f"{PRIMARY_METRIC.upper()}"
        )
    best = f"validation at the epoch of best validation {PRIMARY_METRIC.upper()}, chosen on the same data"
    budget = "validation at the common budget (the last epoch every trial reached; ASHA stopped some)"
    return {"best": best, "last": "validation, last epoch", "budget": budget}[point]


def seed_table(
    study: Study, trials: pd.DataFrame, point: str, metric: str, keys: Sequence[str]
) -> pd.DataFrame:
    """One row per block (the values of ``keys``, the seed among them) and one column per test volume: each
    trial's ``metric`` at a test point, from the per-volume rows. At other points, or without per-volume
    rows, one column (``trial``) of the trial's value. Blocks index the rows, so tables of two arms
    subtract into their paired differences."""
    volumes = study.volumes
    if point.startswith("test_") and not volumes.empty and "split" in volumes:
        acceleration = int(point.removeprefix("test_").removesuffix("x"))
        rows = volumes[(volumes["split"] == "test") & (volumes["source"] == "network")
                       & (volumes["acceleration"] == acceleration)]  # fmt: skip
        rows = rows.drop(columns=[k for k in keys if k in rows])
        rows = rows.merge(trials[["experiment", "trial_id", *keys]], on=["experiment", "trial_id"])
        if not rows.empty and metric in rows:
            return rows.pivot_table(index=list(keys), columns="file", values=metric, aggfunc="mean")
    column = point_column(point, metric)
    values = trials[[*keys, column]].rename(columns={column: "trial"})
    return values.groupby(list(keys), dropna=False)[["trial"]].mean()


def zero_filled_row(study: Study, point: str, metric: str) -> pd.Series | None:
    """The zero-filled input's ``metric`` per test volume at a test point (None elsewhere)."""
    volumes = study.volumes
    if not point.startswith("test_") or volumes.empty or "split" not in volumes:
        return None
    acceleration = int(point.removeprefix("test_").removesuffix("x"))
    rows = volumes[(volumes["split"] == "test") & (volumes["source"] == "zero_filled")
                   & (volumes["acceleration"] == acceleration)]  # fmt: skip
    return rows.groupby("file")[metric].mean() if not rows.empty and metric in rows else None


def baseline_label(baseline: dict[str, Any], baselines: list[dict[str, Any]]) -> str:
    """``zero-filled input``, with its mask settings when the study has several."""
    if len(baselines) < 2:
        return "zero-filled input"
    mask = baseline["mask"]
    return f"zero-filled input ({mask['mask_type']}, {'/'.join(f'{a}x' for a in mask['accelerations'])})"


def draw_baselines(ax, study: Study, metric: str) -> None:
    """The zero-filled input's value of ``metric`` as a horizontal reference line (one per baseline)."""
    for baseline in study.baselines:
        value = baseline["metrics"].get(metric)
        if value is not None and np.isfinite(value):
            label = baseline_label(baseline, study.baselines)
            ax.axhline(value, color="tab:red", linestyle="-.", linewidth=1.2, label=label, gid="zero-filled")


def _unique_names(paths: Sequence[str]) -> list[str]:
    names = [experiment_name(p) for p in paths]
    counts: dict[str, int] = {}
    unique = []
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}-{counts[name]}")
    return unique


def _config_keys(infos: list[ExperimentInfo]) -> list[str]:
    keys: list[str] = []
    for info in infos:
        identifying = {"seed", "model", *weight_keys()}  # the arm already tells these apart
        keys += [k for k in info.search_keys if k not in identifying and k not in keys]
    if len(infos) > 1:  # trials of different experiments are never seeds of one configuration
        keys.insert(0, "experiment")
    return keys


def _join_epochs(frames: list[pd.DataFrame], trials: pd.DataFrame, config_keys: list[str]) -> pd.DataFrame:
    if not frames or trials.empty:
        return pd.DataFrame()
    epochs = pd.concat(frames, ignore_index=True)
    meta = ["experiment", "trial_id", "model", *weight_keys(), *option_keys(), "seed", "arm", "arm_rank",
            "has_attention"]  # fmt: skip
    meta += ["status", "included"]
    meta += [k for k in config_keys if k not in meta]
    meta = [k for k in meta if k in trials]
    # The trial's identifying columns win over collect's copies of the search keys.
    epochs = epochs.drop(columns=[c for c in meta if c in epochs and c not in ("experiment", "trial_id")])
    return epochs.merge(trials[meta], on=["experiment", "trial_id"], how="left")


# ----------------------------------------------------------------------------------------- statistics


SEED_STATS = {"mean": "mean", "std": "std", "min": "min", "max": "max", "n": "count"}


def aggregate(table: pd.DataFrame, by: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: ``<metric>_mean``, ``_std`` (ddof 1), ``_min``, ``_max`` and ``_n`` over the rows
    (seeds), counting only finite values; a metric absent from the table gets NaN statistics and n = 0."""
    if table.empty:
        return pd.DataFrame(columns=by)
    values = table[[*by]].copy()
    for metric in metrics:
        column = table[metric] if metric in table else pd.Series(np.nan, index=table.index)
        values[metric] = pd.to_numeric(column, errors="coerce").replace([np.inf, -np.inf], np.nan)
    keys = by or [values.assign(_all=0)["_all"]]
    stats_table = values.groupby(keys, dropna=False, sort=False)[list(metrics)].agg(list(SEED_STATS.values()))
    stats_table.columns = [f"{metric}_{name}" for metric in metrics for name in SEED_STATS]
    return stats_table.reset_index(drop=not by)


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


def common_budget(trials: pd.DataFrame) -> int | None:
    """The largest epoch every finished-or-stopped trial reached (ASHA's lowest rung, typically)."""
    if trials.empty:
        return None
    pool = trials[trials["status"].isin(("completed", "stopped")) & (trials["epochs_run"] > 0)]
    if pool.empty:
        pool = trials[trials["epochs_run"] > 0]
    return int(pool["epochs_run"].min()) if not pool.empty else None


def at_common_budget(
    study: Study, trials: pd.DataFrame, columns: Sequence[str]
) -> tuple[pd.DataFrame, int | None]:
    """Per trial of ``trials``: its own columns and ``columns`` at the common budget of ``trials`` (the last
    epoch every completed or stopped one reached): every trial read after the same training. Returns the
    table and that epoch (None when there is none)."""
    budget = common_budget(trials)
    if budget is None or study.epochs.empty:
        return pd.DataFrame(), None
    at = metric_at_epoch(study.epochs, budget, columns)
    own = trials.drop(columns=[c for c in columns if c in trials])
    return own.merge(at, on=["experiment", "trial_id"]), budget


def metric_at_epoch(epochs: pd.DataFrame, epoch: int, metrics: Sequence[str]) -> pd.DataFrame:
    """Per trial, the metrics reported at ``epoch`` (trials that never reached it are absent)."""
    if epochs.empty or "epoch" not in epochs:
        return pd.DataFrame(columns=["experiment", "trial_id", *metrics])
    rows = epochs[epochs["epoch"] == epoch]
    columns = ["experiment", "trial_id", *[m for m in metrics if m in rows]]
    return rows[columns].drop_duplicates(["experiment", "trial_id"], keep="last")


# ----------------------------------------------------------------------------------------- output


class OutDir:
    """The analysis output directory (local path or URI): files are named relative to it."""

    def __init__(self, uri: str):
        self.uri = uri

    def join(self, relative: str) -> str:
        return storage.join(self.uri, relative)

    def write_bytes(self, relative: str, data: bytes) -> str:
        storage.write_bytes(self.join(relative), data)
        return relative

    def write_text(self, relative: str, text: str) -> str:
        return self.write_bytes(relative, text.encode())

    def write_csv(self, relative: str, table: pd.DataFrame) -> str:
        return self.write_text(relative, table.to_csv(index=False))

    def save_figure(self, figure: plt.Figure, relative: str, dpi: int = 120) -> str:
        """Write a figure as PNG and close it (figures are large; scripts draw many)."""
        buffer = io.BytesIO()
        # A constrained layout already fits everything; "tight" on top of it costs a second full draw.
        constrained = type(figure.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches=None if constrained else "tight")
        plt.close(figure)
        return self.write_bytes(relative, buffer.getvalue())

    def exists(self, relative: str) -> bool:
        return storage.exists(self.join(relative))


def markdown_table(table: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table (``DataFrame.to_markdown``); numbers in ``formats``' specs, NaN as –."""
    if table.empty:
        return "_(no rows)_\n"
    shown = table.astype(object).copy()
    for column in shown.columns:
        spec = (formats or {}).get(column)
        shown[column] = [
            "–"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else format(value, spec)
            if spec and isinstance(value, (int, float, np.number))
            else str(value).replace("|", "\\|")
            for value in shown[column]
        ]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def mean_std_text(mean: float, std: float, fmt: str) -> str:
    """``mean ± std`` (just the mean when one seed leaves the std undefined)."""
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def config_text(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """``key=value`` pairs of a configuration, or ``-`` when the arm has a single configuration."""
    parts = [f"{k}={_short(row[k])}" for k in keys if k in row]
    return ", ".join(parts) or "-"


def _short(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def config_groups(table: pd.DataFrame, keys: Sequence[str]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Rows split by configuration (one group when there are no config keys)."""
    keys = [k for k in keys if k in table]
    if not keys or table.empty:
        return [({}, table)]
    return [
        (dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)), group)
        for key, group in table.groupby(keys, dropna=False, sort=True)
    ]


def pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(items, 2))


def add_common_arguments(parser) -> None:
    parser.add_argument(
        "--experiment",
        action="append",
        required=True,
        help="experiment directory (local path or s3:// URI); repeat to analyse several together",
    )
    parser.add_argument("--out", help="output directory (default: <first experiment>/analysis)")


def default_out(experiments: Sequence[str]) -> str:
    return ExperimentLayout(experiments[0]).analysis_dir


def print_result(result: StepResult, out: OutDir) -> None:
    for artifact in result.artifacts:
        print(f"wrote {out.join(artifact.path)}")
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}")


def run_step(step, argv: Sequence[str] | None, description: str) -> int:
    """The command line of one analysis script: load the experiments, run ``step(study, out)``, print."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        study = load_study(args.experiment)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    out = OutDir(args.out or default_out(args.experiment))
    for problem in study.problems:
        print(f"problem: {problem}")
    print_result(step(study, out), out)
    return 0
