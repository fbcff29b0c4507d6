"""Loading experiment directories into one :class:`Study`: every trial with its configuration and arm.

A :class:`Study` is one or more experiment directories collected by :func:`analysis.collect.collect` and
joined with each trial's training configuration, read from the file the trial recorded
(``train_runs/<trial id>/train_config.json``, see :mod:`mri_models.experiment`), so every trial has a
``model`` and its penalty weights (``gamma``) even when neither was searched. Trials are grouped into
*arms* (:mod:`mri_models.arms`): the architecture and the penalties it trains with, so a Sparse Attention
U-Net at gamma = 0 counts as the Attention U-Net it is. The metrics shown are the metric table's
(:func:`mri_models.metrics.metric_table`), the primary one (SSIM) first.

Experiments written before trials recorded their configuration are merged from ``sweep.json`` and
``params.json`` (reported as a problem: profile defaults are then unknown; see :func:`trial_config`).
Nothing here needs Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.collect import Experiment, collect
from analysis.points import common_budget, metric_at_epoch, point_column, test_points
from mri_models import storage
from mri_models.arms import arm_of, model_options, without_inapplicable
from mri_models.experiment import ASHA_STATE_FILE, BASELINE_FILE, SWEEP_FILE, ExperimentLayout
from mri_models.losses import penalty_by_weight_key
from mri_models.metrics import PRIMARY_METRIC, Metric, metric_table
from mri_models.models.registry import option_owners, reserved_penalties
from mri_models.plugins import load_plugins

# Trials whose numbers describe a (possibly partial) training run; failed ones are reported, not averaged.
INCLUDED_STATUSES = ("completed", "reached_target", "stopped", "unfinished")


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


# ----------------------------------------------------------------------------------------- loading


@dataclass
class _ExperimentPart:
    """One experiment's share of a study, before the experiments are joined.

    Attributes:
        info: the experiment directory.
        problems: what was found wrong in it, in the order found.
        notes: problems shared by many trials (a legacy configuration), reported once per experiment.
        baselines: its recorded zero-filled baselines.
        trials, epochs, volumes: its rows with the ``experiment`` column (empty without trials).
        configs: resolved training configuration per ``(experiment, trial_id)``.
    """

    info: ExperimentInfo
    problems: list[str]
    notes: set[str] = field(default_factory=set)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)
    volumes: pd.DataFrame = field(default_factory=pd.DataFrame)
    configs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def experiment_name(path: str) -> str:
    return ExperimentLayout(path).name


def load_study(paths: Sequence[str]) -> Study:
    """Collect experiment directories (local or s3://) into one study; problems are listed, never raised.

    Raises:
        FileNotFoundError: only when none of the directories exists.
    """
    problems: list[str] = []
    parts: list[_ExperimentPart] = []
    for path, name in zip(paths, _unique_names(paths), strict=True):
        try:
            experiment = collect(path)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        part = _experiment_part(path, name, experiment)
        problems.extend(part.problems)
        parts.append(part)
    if not parts:
        raise FileNotFoundError("; ".join(problems) or "no experiment directories given")
    problems.extend(sorted(set().union(*(part.notes for part in parts))))
    return _joined_study(parts, problems)


def _experiment_part(path: str, name: str, experiment: Experiment) -> _ExperimentPart:
    """One collected experiment with its sweep's files read and every trial's configuration and arm."""
    layout = ExperimentLayout(path)
    sweep = storage.read_json(layout.sweep_file) or {}
    part = _ExperimentPart(ExperimentInfo(path, name, sweep, list(sweep.get("search_keys") or [])), [])
    part.problems += _missing_file_problems(layout, name, sweep)
    part.baselines = (storage.read_json(layout.baseline_file) or {}).get("baselines", [])
    if not part.baselines:
        part.problems.append(
            f"{name}: no {BASELINE_FILE} (written before baselines were recorded): results are not set "
            "against the zero-filled input"
        )
    part.problems.extend(f"{name}: {p}" for p in experiment.problems)
    if experiment.trials.empty:
        return part
    trials = experiment.trials.copy()
    configs = _trial_configs(layout, part.info, trials, part.notes)
    part.configs = {(name, tid): values for tid, values in zip(trials["trial_id"], configs, strict=True)}
    _add_config_columns(trials, configs, part.info.search_keys)
    _add_baseline_columns(trials, configs, part.baselines)
    trials.insert(0, "experiment", name)
    part.problems += _progress_problems(name, trials, sweep)
    part.trials = trials
    epochs = experiment.epochs.copy()
    if not epochs.empty:
        epochs.insert(0, "experiment", name)
        part.epochs = epochs
    if not experiment.volumes.empty:
        part.volumes = experiment.volumes.assign(experiment=name)
    return part


def _missing_file_problems(layout: ExperimentLayout, name: str, sweep: dict[str, Any]) -> list[str]:
    """The sweep's own files an experiment lacks, and what is unknown without them."""
    problems = []
    if not sweep:
        problems.append(f"{name}: no {SWEEP_FILE}; search keys and epoch budget unknown")
    spec = sweep.get("spec") or {}
    asha = spec.get("scheduler", {}).get("type", "asha") == "asha"
    if asha and not storage.exists(layout.asha_state_file):
        problems.append(f"{name}: no {ASHA_STATE_FILE}; trials stopped by ASHA look unfinished")
    return problems


def _progress_problems(name: str, trials: pd.DataFrame, sweep: dict[str, Any]) -> list[str]:
    """An interrupted sweep: grid trials never started, trials never finished."""
    problems = []
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
    return problems


def _expected_trials(sweep: dict[str, Any]) -> int | None:
    spec = sweep.get("spec") or {}
    if "search" not in spec or "seeds" not in spec:
        return None
    sizes = [len(v) for v in spec["search"].values()] + [len(spec["seeds"])]
    return int(np.prod(sizes)) if sizes else None


def _trial_configs(
    layout: ExperimentLayout, info: ExperimentInfo, trials: pd.DataFrame, notes: set[str]
) -> list[dict[str, Any]]:
    """Every trial's training configuration, in the table's order; legacy notes are added to ``notes``."""
    configs = []
    for _, trial in trials.iterrows():
        params = storage.read_json(storage.join(layout.path, trial["trial_dir"], "params.json")) or {}
        values, note = trial_config(layout, trial["trial_id"], info.sweep, params)
        if note:
            notes.add(f"{info.name}: {note}")
        configs.append(values)
    return configs


def trial_config(
    layout: ExperimentLayout, trial_id: str, sweep: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """A trial's training configuration: the one it recorded, else merged from the sweep's files.

    The merge is the fallback for experiments written before trials recorded ``train_config.json``.

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


def _add_config_columns(trials: pd.DataFrame, configs: list[dict[str, Any]], search_keys: list[str]) -> None:
    """The configuration's columns (searched keys, model, every penalty weight and architecture option)
    and the arm's (``arm``, ``arm_rank``, ``has_attention``)."""
    for key in {k for values in configs for k in values} - set(trials.columns):
        if key in search_keys or key in ("model", "seed"):
            trials[key] = [values.get(key) for values in configs]
    trials["model"] = [values.get("model", "unet") for values in configs]
    for key in weight_keys():  # every penalty weight, 0 where the trial has none
        trials[key] = [float(values.get(key) or 0.0) for values in configs]
    options = [model_options(values["model"], values) for values in configs]  # with the model's defaults
    for key in option_keys():  # every architecture option, None where the trial's model has none
        trials[key] = [trial_options.get(key) for trial_options in options]
    arms = [
        arm_of(values["model"], {k: values.get(k) or 0.0 for k in weight_keys()}, trial_options)
        for values, trial_options in zip(configs, options, strict=True)
    ]
    trials["arm"] = [arm.name for arm in arms]
    trials["arm_rank"] = [arm.rank for arm in arms]
    trials["has_attention"] = [arm.has_attention for arm in arms]


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


def _joined_study(parts: list[_ExperimentPart], problems: list[str]) -> Study:
    """The experiments' tables joined into one study, with the columns that need all of them."""
    infos = [part.info for part in parts]
    baselines: list[dict[str, Any]] = []
    for part in parts:
        baselines += [b for b in part.baselines if b not in baselines]
    frames = [part.trials for part in parts if not part.trials.empty]
    trials = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    config_keys = _config_keys(infos)
    if not trials.empty:
        for key in config_keys:
            if key not in trials:
                trials[key] = None
        trials["included"] = trials["status"].isin(INCLUDED_STATUSES)
    epochs = _join_epochs([part.epochs for part in parts if not part.epochs.empty], trials, config_keys)
    budget = _add_budget_columns(trials, epochs)
    volumes = _join_volumes([part.volumes for part in parts if not part.volumes.empty], trials)
    configs = {key: values for part in parts for key, values in part.configs.items()}
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


def _join_volumes(frames: list[pd.DataFrame], trials: pd.DataFrame) -> pd.DataFrame:
    """The per-volume rows of every experiment, each trial's with its arm and whether it is included."""
    volumes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not volumes.empty and not trials.empty and "trial_id" in volumes:
        arms = trials[["experiment", "trial_id", "arm", "arm_rank", "included"]]
        volumes = volumes.drop(columns=[c for c in ("arm", "included") if c in volumes])
        volumes = volumes.merge(arms, on=["experiment", "trial_id"], how="left")
    return volumes
