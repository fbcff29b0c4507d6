"""An experiment directory to tidy tables: one row per trial and epoch, one row per trial.

Every trial's epoch rows start at epoch 0, the untrained network's validation (trials written before it
was recorded start at 1); a trial's ``last_`` and ``best_`` columns come from its trained epochs (1 on).

Reads only files on disk (local path or s3:// through pyarrow), so it works on a laptop after the cluster is
gone, on interrupted experiments, and on trials that errored or were stopped early. Per trial directory
(the ones holding ``params.json``, see :mod:`mri_models.experiment`) it reads the searched parameters,
``result.json`` (one JSON object per reported epoch) and ``error.txt`` (every failed attempt); Tune's
experiment state says how each trial ended, and the sweep's ASHA state (``asha_state.txt``) which trials the
scheduler stopped early and every decision it made (``decisions.csv``: trial and its searched values, rung,
the trial's value, the rung's cut-off, continue, stop or complete at the epoch budget). The metric columns
follow the metric table (:func:`mri_models.metrics.metric_table`); the best epoch is the best by its
primary metric (SSIM).

Trial status, from the final attempt (:mod:`analysis.outcome`; a retried trial is judged by its retry):
- ``completed``: reached the configured number of epochs;
- ``reached_target``: ended at the epoch it reached ``target_ssim`` (``stop_at_target``);
- ``stopped``: stopped early by ASHA (``epochs_after_stop``: epochs its checkpoints hold past the stop
  decision, 0 since its workers wait for ASHA's decision at every rung);
- ``diverged``: the loss became NaN/Inf (the trainer's last report has ``diverged`` set; older trials
  failed with the divergence in ``error.txt``);
- ``errored``: the final attempt failed for any other reason;
- ``unfinished``: neither (the sweep was interrupted; ``--resume`` continues it).
``attempts`` counts the failed attempts and the final one; ``earlier_error`` is the last error of an
attempt that Tune retried, so a recovered trial shows as recovered.
``preemptions`` counts the spot warnings the trial's runs checkpointed within an epoch for (each one's
epoch, step and times are in the run's ``preemptions/`` directory); they cost no attempt.

Run ``python -m analysis.collect --experiment PATH`` to (re)write ``PATH/results/trials.csv``, ``epochs.csv``,
``volumes.csv`` and ``decisions.csv`` (and Parquet copies).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.outcome import TuneTrialState, parse_failures, trial_outcome, tune_trial_states
from mri_models import storage
from mri_models.experiment import (
    ASHA_DECISIONS_KEY,
    CANDIDATE_KEY,
    DECISION_KEYS,
    DECISION_STOP,
    DECISIONS_TABLE,
    HISTORY_FILE,
    TARGET_KEYS,
    ExperimentLayout,
    TrialDir,
)
from mri_models.losses import penalty_terms
from mri_models.metrics import PRIMARY_METRIC, metric_table

# Tune's own bookkeeping keys in result.json that are not metrics of the study.
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "checkpoint_path", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag",
}  # fmt: skip


def summarised_metrics() -> list[str]:
    """The metrics with a ``last_`` column per trial: the metric table, losses, MPAND and the penalties."""
    return [*metric_table(), "val_loss", "train_loss", "mpand", "alpha_mean", *penalty_terms()]


@dataclass
class Experiment:
    """The tables of one experiment: per trial, per trial and epoch, per volume (validation epochs and
    the final test evaluation, network and zero-filled rows)."""

    path: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    problems: list[str]
    volumes: pd.DataFrame = field(default_factory=pd.DataFrame)
    decisions: pd.DataFrame = field(default_factory=pd.DataFrame)  # decision_table


def test_columns(record: dict | None) -> dict[str, float]:
    """A trial's final evaluation as columns: ``test_<metric>_<N>x`` and ``zero_filled_test_<metric>_<N>x``
    per setting, and the selected epoch (empty for trials or experiments without one)."""
    if not record:
        return {}
    columns: dict[str, float] = {"test_epoch": record["selected_epoch"]}
    for setting in record["settings"]:
        suffix = f"{setting['acceleration']}x"
        for name in metric_table():
            columns[f"test_{name}_{suffix}"] = setting["network"][name]
            columns[f"zero_filled_test_{name}_{suffix}"] = setting["zero_filled"][name]
    return columns


def _trial_volumes(layout: ExperimentLayout, trial_id: str, config_columns: dict) -> list[pd.DataFrame]:
    frames = []
    for entry in storage.list_files(layout.train_run(trial_id).volumes_dir, suffix=".parquet"):
        data = storage.read_bytes(entry.uri)
        if data:
            frame = pd.read_parquet(io.BytesIO(data))
            for key, value in reversed([("trial_id", trial_id), *config_columns.items()]):
                frame.insert(0, key, value)
            frames.append(frame)
    return frames


def _baseline_volumes(layout: ExperimentLayout) -> list[pd.DataFrame]:
    """The zero-filled input's validation rows per volume, as the baselines record them."""
    frames = []
    for baseline in (storage.read_json(layout.baseline_file) or {}).get("baselines", []):
        rows = baseline.get("volumes") or []  # baselines recorded before per-volume rows have none
        if rows:
            mask = baseline["mask"]
            frame = pd.DataFrame(rows)
            frame.insert(0, "split", "val")
            frame.insert(1, "epoch", 0)
            frame.insert(2, "source", "zero_filled")
            frame.insert(3, "acceleration", mask["accelerations"][0])
            frame.insert(4, "center_fraction", mask["center_fractions"][0])
            frames.append(frame)
    return frames


@dataclass
class _SweepRecords:
    """What the sweep recorded about all of its trials."""

    search_keys: list[str] | None  # None for sweeps written before search keys were recorded
    max_epochs: int | None
    stopped: set[str]  # the trials ASHA stopped early
    tune_states: dict[str, TuneTrialState]
    stop_epochs: dict[str, float] = field(default_factory=dict)  # epoch of ASHA's stop decision per trial


@dataclass
class _TrialRows:
    """One trial directory's share of the experiment's tables."""

    trial: dict
    epochs: list[dict]
    volumes: list[pd.DataFrame]


def collect(path: str) -> Experiment:
    """Read an experiment directory (local or s3://) into per-epoch and per-trial tables.

    Args:
        path: the Tune experiment directory (``<storage>/<experiment name>``).

    Returns:
        The tables, plus human-readable problems found on the way (missing metrics, unreadable files).
    """
    layout = ExperimentLayout(path)
    if not storage.is_dir(path):
        raise FileNotFoundError(f"experiment directory {path} does not exist")
    sweep = storage.read_json(layout.sweep_file) or {}
    stops: dict[str, float] = {}
    for decision in layout.asha_decisions():  # the first: a trial rerun from its start can be stopped again
        if decision["decision"] == DECISION_STOP:
            stops.setdefault(decision["trial_id"], decision["epoch"])
    records = _SweepRecords(
        search_keys=sweep.get("search_keys"),
        max_epochs=sweep.get("max_epochs"),
        stopped=layout.stopped_trials(),
        tune_states=tune_trial_states(layout),
        stop_epochs=stops,
    )
    problems: list[str] = []
    trial_rows, epoch_rows, volume_frames = [], [], _baseline_volumes(layout)
    for trial_dir in _current_trial_dirs(layout.trial_dirs(), records.tune_states):
        rows = _collect_trial(layout, trial_dir, records, problems)
        trial_rows.append(rows.trial)
        epoch_rows += rows.epochs
        volume_frames += rows.volumes
    trials = pd.DataFrame(trial_rows)
    epochs = pd.DataFrame(epoch_rows)
    volumes = pd.concat(volume_frames, ignore_index=True) if volume_frames else pd.DataFrame()
    if trials.empty:
        problems.append(f"no trials found under {path}")
    elif not any(column.startswith("test_") for column in trials):
        problems.append(f"{layout.name}: no test evaluation (an experiment from before the held-out split)")
    keys = records.search_keys
    if keys is None and not trials.empty:  # the trials' own columns, between trial_id and status
        keys = list(trials.columns[1 : trials.columns.get_loc("status")])
    return Experiment(path, trials, epochs, problems, volumes, decision_table(path, trials, keys or []))


def _current_trial_dirs(dirs: list[TrialDir], states: dict[str, TuneTrialState]) -> list[TrialDir]:
    """One directory per trial. Tune makes a second one (``<name>_<4 hex>``) for a trial whose restored
    state is from before the trial started (a driver or disk lost between Tune's saves); the one Tune's
    state names is the trial's, the other holds no more than the reports before (its run resumed from its
    checkpoints, whose history the epochs are read from)."""
    by_trial: dict[str, list[TrialDir]] = {}
    for trial_dir in dirs:
        by_trial.setdefault(trial_dir.trial_id_from_name(), []).append(trial_dir)
    kept = []
    for trial_id, group in by_trial.items():
        named = states[trial_id].logdir if trial_id in states else None
        kept += [trial_dir for trial_dir in group if trial_dir.name == named] or group
    return sorted(kept, key=lambda trial_dir: trial_dir.name)


def decision_table(path: str, trials: pd.DataFrame | None = None, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Every decision ASHA made in an experiment, in order, with the trial's searched values beside it.

    Columns: ``trial_id``, the ``keys`` (from ``trials``), ``rung`` (the milestone, epochs), ``epoch`` (of
    the result decided on), ``metric`` and ``mode`` (what ASHA decides on), ``value`` (the trial's),
    ``cutoff`` (the rung's cut-off for that decision: the percentile of the other trials' records; empty when
    there were none) and ``decision``: ``continue``, ``stop`` (``value`` below the cut-off, above it for
    ``min``) or ``complete`` (the epoch budget). Empty (with the columns) for FIFO and older sweeps.

    Args:
        path: the experiment directory.
        trials: collect's trial table, for the searched values (None: without them).
        keys: its columns to put beside each decision.
    """
    state = storage.read_json(ExperimentLayout(path).asha_state_file) or {}
    frame = pd.DataFrame(state.get(ASHA_DECISIONS_KEY, []), columns=list(DECISION_KEYS))
    frame.insert(frame.columns.get_loc("value"), "metric", state.get("metric"))
    frame.insert(frame.columns.get_loc("value"), "mode", state.get("mode"))
    keys = [key for key in keys if trials is not None and key in trials and key != "trial_id"]
    if keys:
        values = trials[["trial_id", *keys]].drop_duplicates("trial_id")
        frame = frame.merge(values, on="trial_id", how="left")  # keeps the decisions' order
        frame = frame[["trial_id", *keys, *(c for c in frame.columns if c not in ("trial_id", *keys))]]
    return frame


def _collect_trial(
    layout: ExperimentLayout, trial_dir: TrialDir, records: _SweepRecords, problems: list[str]
) -> _TrialRows:
    """A trial directory's rows; what is wrong with it is added to ``problems``."""
    config = storage.read_json(trial_dir.params_file) or {}
    config = {**(config.pop(CANDIDATE_KEY, None) or {}), **config}  # a confirm stage's trial
    reports = _read_reports(trial_dir.name, storage.read_text(trial_dir.result_file) or "", problems)
    trial_id = (reports[0].get("trial_id") if reports else None) or trial_dir.trial_id_from_name()
    stopped = trial_id in records.stopped
    history = _checkpoint_history(layout, trial_id)
    after_stop = _epochs_after_stop(trial_id, reports, history, records) if stopped else math.nan
    reports = _with_checkpointed_epochs(reports, history, trial_id, stopped, problems)
    failures = parse_failures(storage.read_text(trial_dir.error_file))
    state = records.tune_states.get(trial_id)
    run = layout.train_run(trial_id)
    stops_at_target = bool((storage.read_json(run.config_file) or {}).get("stop_at_target"))
    outcome = trial_outcome(reports, failures, state, records.max_epochs, stopped, stops_at_target)
    reports = _last_report_per_epoch(reports)
    keys = records.search_keys or sorted(config)
    config_columns = {key: config.get(key) for key in keys}
    epochs = []
    for report in reports:
        row = {"trial_id": trial_id, **config_columns}
        row.update({k: v for k, v in report.items() if k not in _TUNE_KEYS and not isinstance(v, dict)})
        epochs.append(row)
    epochs_run = int(max((r.get("epoch", 0) for r in reports), default=0))
    row = {"trial_id": trial_id, **config_columns, "status": outcome.status, "epochs_run": epochs_run,
           "epochs_after_stop": after_stop, "attempts": outcome.attempts,
           "preemptions": len(run.preemptions()),
           **{key: (reports[-1] if reports else {}).get(key, math.nan) for key in TARGET_KEYS}}  # fmt: skip
    row.update(_metric_columns(trial_id, reports, problems))
    row.update(test_columns(storage.read_json(layout.train_run(trial_id).test_evaluation_file)))
    volumes = _trial_volumes(layout, trial_id, config_columns)
    row.update(error=outcome.error, earlier_error=outcome.earlier_error, trial_dir=trial_dir.name)
    if outcome.error:
        problems.append(f"trial {trial_id} {outcome.status}: {outcome.error}")
    elif outcome.earlier_error:
        problems.append(
            f"trial {trial_id} {outcome.status} after {outcome.attempts} attempts (Tune retried it; "
            f"last earlier error: {outcome.earlier_error})"
        )
    return _TrialRows(row, epochs, volumes)


def _metric_columns(trial_id: str, reports: list[dict], problems: list[str]) -> dict[str, float]:
    """``last_<metric>`` of every summarised metric, and ``best_<metric>`` of the metric table's metrics
    and the epoch at the best epoch by the primary metric."""
    # Epoch 0 is the untrained network: a row of the curves, never a trial's last or best epoch.
    trained = [r for r in reports if (r.get("epoch") or 0) >= 1]
    columns = {}
    for metric in summarised_metrics():
        values = [r.get(metric) for r in trained]
        values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        if trained and not values and metric in metric_table():
            problems.append(f"trial {trial_id}: no value of {metric} in its results")
        columns[f"last_{metric}"] = values[-1] if values else math.nan
    # The best epoch is the best by the primary metric; every metric is reported at that epoch.
    sign = 1.0 if metric_table()[PRIMARY_METRIC].higher_is_better else -1.0
    best = max(trained, key=lambda r: sign * _number(r.get(PRIMARY_METRIC), sign), default=None)
    for metric in (*metric_table(), "epoch"):
        columns[f"best_{metric}"] = _number(best.get(metric)) if best else math.nan
    return columns


def _read_reports(trial_name: str, text: str, problems: list[str]) -> list[dict]:
    """The JSON lines of a ``result.json``; an unreadable line is a problem, not an error."""
    reports = []
    for line in text.splitlines():
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:
            problems.append(f"{trial_name}: unreadable line in result.json (trial interrupted mid-write?)")
    return reports


def _checkpoint_history(layout: ExperimentLayout, trial_id: str) -> list[dict]:
    """Every epoch's report as the trial's newest checkpoint recorded it (none without a checkpoint)."""
    checkpoints = sorted(layout.train_run(trial_id).checkpoints())
    return (storage.read_json(storage.join(checkpoints[-1], HISTORY_FILE)) or []) if checkpoints else []


def _epochs_after_stop(
    trial_id: str, reports: list[dict], history: list[dict], records: _SweepRecords
) -> float:
    """Epochs a stopped trial's checkpoints hold past ASHA's stop decision (the epoch decided on; for sweeps
    without decisions its last report); NaN without a checkpoint."""
    if not history:
        return math.nan
    stop = records.stop_epochs.get(trial_id)
    if stop is None:
        stop = max((report.get("epoch", 0) for report in reports), default=0)
    return float(max(0, max(entry.get("epoch", 0) for entry in history) - stop))


def _with_checkpointed_epochs(
    reports: list[dict], history: list[dict], trial_id: str, stopped: bool, problems: list[str]
) -> list[dict]:
    """The reports, with the epochs that only the trial's newest checkpoint recorded, in epoch order.

    Tune's driver writes ``result.json`` in a staging directory and copies it to the experiment every few
    minutes, while the workers write their checkpoints (with every epoch's metrics so far) to the
    experiment themselves. A driver killed in between leaves the last reports only in the checkpoint; a
    resumed trial continues after the checkpoint and never reports those epochs again.

    A trial the scheduler stopped gains no epoch after its last report
    (:meth:`~mri_models.experiment.ExperimentLayout.stopped_trials`): its workers wait for ASHA's decision
    at every rung, so there is normally none, but one whose wait timed out, or a trial of an older sweep,
    may have checkpointed epochs Tune never received (``epochs_after_stop`` counts them).
    """
    reported = {report.get("epoch") for report in reports}
    last = max((report.get("epoch", 0) for report in reports), default=0) if stopped else math.inf
    missing = [e for e in history if e.get("epoch") not in reported and e.get("epoch", 0) < last]
    if not missing:
        return reports
    epochs = ", ".join(str(entry.get("epoch")) for entry in missing)
    problems.append(f"trial {trial_id}: epoch(s) {epochs} taken from its checkpoint (not in result.json)")
    return sorted([*missing, *reports], key=lambda report: report.get("epoch", 0))  # stable: last stays last


def _last_report_per_epoch(reports: list[dict]) -> list[dict]:
    """One report per epoch, the last one written: a retried attempt that reported an epoch again (it
    resumed from a checkpoint older than its predecessor's last report) replaces the earlier report."""
    by_epoch = {}
    for report in reports:
        by_epoch.pop(report.get("epoch"), None)  # re-insert, so the order is that of the last reports
        by_epoch[report.get("epoch")] = report
    return list(by_epoch.values())


def _number(value, sign: float = 1.0) -> float:
    """A finite reported value as float; a missing or NaN one ranks last (``-inf`` after ``sign``)."""
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return -math.inf * sign


def write_tables(path: str, out_dir: str | None = None) -> Experiment:
    """Collect an experiment and write ``trials``, ``epochs`` and ``volumes`` as CSV and Parquet into
    ``out_dir``.

    Args:
        path: the experiment directory.
        out_dir: where to write (default ``<path>/results``).
    """
    experiment = collect(path)
    out_dir = out_dir or ExperimentLayout(path).results_dir
    tables = (
        ("trials", experiment.trials),
        ("epochs", experiment.epochs),
        ("volumes", experiment.volumes),
        (DECISIONS_TABLE, experiment.decisions),
    )
    for name, table in tables:
        storage.write_text(storage.join(out_dir, f"{name}.csv"), table.to_csv(index=False))
        if not table.empty:
            storage.write_bytes(storage.join(out_dir, f"{name}.parquet"), table.to_parquet(index=False))
    return experiment


def status_counts(trials: pd.DataFrame) -> str:
    """``"3 stopped, 2 completed, 1 errored; 1 recovered after a retry"``, or ``"none"``."""
    if trials.empty:
        return "none"
    text = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    if "attempts" in trials:  # tables written before attempts were counted have no such column
        recovered = int(((trials["attempts"] > 1) & ~trials["status"].isin(("errored", "diverged"))).sum())
        if recovered:
            text += f"; {recovered} recovered after a retry"
    return text


def summary(experiment: Experiment, search_keys: list[str], top: int = 5) -> str:
    """Status counts and the best configurations by the primary metric's mean best value over seeds."""
    trials = experiment.trials
    if trials.empty:
        return "\n".join(["0 trials", *(f"note: {problem}" for problem in experiment.problems)])
    metric = metric_table()[PRIMARY_METRIC]
    column = f"best_{PRIMARY_METRIC}"
    keys = [key for key in search_keys if key != "seed" and key in trials]
    test = sorted(c for c in trials if c.startswith(f"test_{PRIMARY_METRIC}_"))
    ranked = (
        trials.groupby(keys, dropna=False)[[column, *test]]
        .mean()
        .join(trials.groupby(keys, dropna=False)[column].agg(["std", "count"]))
        .sort_values(column, ascending=not metric.higher_is_better)
        if keys
        else trials[[column, *test]].describe().T
    )
    return "\n".join(
        [
            f"\n{len(trials)} trials: {status_counts(trials)}",
            f"best configurations, chosen by validation {metric.label} (mean over seeds"
            + ("; the test columns report them on the held-out split):" if test else "):"),
            ranked.head(top).to_string(),
            f"tables: {ExperimentLayout(experiment.path).results_dir}/trials.csv and epochs.csv",
            *(f"note: {problem}" for problem in experiment.problems),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="experiment directory (local path or s3:// URI)")
    parser.add_argument("--out", help="output directory (default: <experiment>/results)")
    args = parser.parse_args(argv)
    try:
        experiment = write_tables(args.experiment, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    for problem in experiment.problems:
        print(f"warning: {problem}")
    print(
        f"{len(experiment.trials)} trials ({status_counts(experiment.trials)}), {len(experiment.epochs)} "
        "epoch rows written to "
        f"{args.out or ExperimentLayout(args.experiment).results_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
