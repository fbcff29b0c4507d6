"""Replay one sweep trial alone: ``python -m ray_jobs.train --replay EXP/TRIAL``.

The trial's recorded configuration (``train_runs/<id>/train_config.json``) is trained again as a single
Ray Train run, on the data the sweep prepared (the sweep's spec and data root, so even a subsampled split
has the same slices), for as many epochs as the sweep ran it. Then every epoch's metrics are compared with
the sweep's own record (the history in the trial's latest checkpoint): runs are deterministic, so they must
be equal bit for bit, timings aside. The answer to "the result does not reproduce outside Tune".
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any

import ray.train

from mri_models import experiment, storage
from mri_models.experiment import ExperimentLayout, RunLayout
from ray_jobs.checkpoints import history_from_checkpoint
from ray_jobs.config import ConfigError, TrainConfig, make_train_config
from ray_jobs.data import PreparedData
from ray_jobs.sweep_config import SweepSpec, ValidatedSweep
from ray_jobs.trainer import build_trainer, check_cluster_fits, claim_run_name, connect, default_storage
from ray_jobs.tune import prepare_sweep_data

# Wall-clock measurements: they differ between any two runs.
TIMING_KEYS = frozenset({"epoch_seconds", "compute_fraction", "train_slices_per_second"})


@dataclass(frozen=True)
class RecordedTrial:
    """A trial as its sweep recorded it."""

    experiment: str
    trial_id: str
    run: RunLayout
    cfg: TrainConfig
    history: list[dict[str, Any]]  # the sweep's per-epoch metrics, epoch 0 first


def _trial_id(layout: ExperimentLayout, name: str) -> str:
    """A trial id from an id, its unique end (``00003``) or a Tune trial directory name."""
    ids = [entry.name for entry in storage.subdirectories(layout.train_runs)]
    if name in ids:
        return name
    from_dir = layout.trial_dir(name).trial_id_from_name()
    matches = [i for i in ids if i == from_dir or i.endswith(name)]
    if len(matches) != 1:
        shown = ", ".join(ids[:12]) or "none"
        problem = "ambiguous" if matches else "no such trial"
        raise ConfigError(f"--replay: {name!r} under {layout.path}: {problem}; the trials are {shown}")
    return matches[0]


def recorded_trial(target: str) -> RecordedTrial:
    """``EXP/TRIAL`` (or ``EXP/train_runs/ID``) as recorded.

    Raises:
        ConfigError: no such experiment or trial, or a trial without a checkpoint to compare with.
    """
    target = target.rstrip("/")
    parent, _, name = target.rpartition("/")
    if posixpath.basename(parent) == experiment.TRAIN_RUNS_DIR:
        parent = posixpath.dirname(parent)
    layout = ExperimentLayout(parent)
    if not storage.exists(layout.sweep_file):
        raise ConfigError(f"--replay {target}: {parent} is not a sweep (no {experiment.SWEEP_FILE})")
    trial_id = _trial_id(layout, name)
    run = layout.train_run(trial_id)
    cfg = make_train_config(storage.read_json(run.config_file))
    latest = max(run.checkpoints(), default=None)  # checkpoint_<date>: the newest sorts last
    history = storage.read_json(storage.join(latest, experiment.HISTORY_FILE)) if latest else None
    if not history:
        raise ConfigError(f"--replay {target}: the trial has no checkpoint, so no record to compare with")
    return RecordedTrial(layout.path, trial_id, run, cfg, history)


def sweep_data(trial: RecordedTrial) -> PreparedData:
    """The data as the sweep prepared it for its trials (:func:`ray_jobs.tune.prepare_sweep_data`)."""
    saved = storage.read_json(ExperimentLayout(trial.experiment).sweep_file)
    return prepare_sweep_data(ValidatedSweep.of(SweepSpec(**saved["spec"])).trials, saved["data_root"])


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or nan


def differences(replayed: list[dict[str, Any]], recorded: list[dict[str, Any]]) -> list[str]:
    """Each (epoch, key) whose value differs, timings aside; NaN equals NaN."""
    out = []
    by_epoch = {int(row["epoch"]): row for row in replayed}
    for row in recorded:
        epoch = int(row["epoch"])
        mine = by_epoch.get(epoch)
        if mine is None:
            out.append(f"epoch {epoch}: not replayed")
            continue
        for key, value in row.items():
            if key in TIMING_KEYS:
                continue
            other = mine.get(key)
            if not _same(value, other):
                out.append(f"epoch {epoch} {key}: sweep {value!r}, replay {other!r}")
    return out


def replay(target: str, storage_path: str | None, name: str | None) -> int:
    """Train the trial again alone and compare; 0 when every epoch is equal, 1 otherwise."""
    trial = recorded_trial(target)
    epochs = int(max(row["epoch"] for row in trial.history))
    cfg = trial.cfg.model_copy(update={"epochs": epochs})
    data = sweep_data(trial)
    storage_path = storage_path or default_storage()
    name = name or f"replay-{trial.trial_id}"
    if storage.exists(RunLayout(storage.join(storage_path, name)).config_file):
        raise ConfigError(
            f"run {name!r} exists under {storage_path}: a replay starts fresh; pass another --name"
        )
    connect()
    check_cluster_fits(cfg)
    claim_run_name(cfg, storage_path, name)
    print(f"replaying trial {trial.trial_id} of {trial.experiment} alone as run {name!r} ({epochs} epochs)")
    result = build_trainer(cfg, data, name, storage_path).fit()
    replayed = history_from_checkpoint(result.checkpoint) if result.checkpoint else []
    found = differences(replayed, trial.history)
    if found:
        shown = "\n  ".join(found[:20])
        print(f"NOT reproduced: {len(found)} value(s) differ from the sweep's record:\n  {shown}")
        return 1
    keys = len([k for k in trial.history[-1] if k not in TIMING_KEYS])
    print(f"reproduced: epochs 0-{epochs}, {keys} values each, the sweep's bit for bit, timings aside")
    return 0


def run_replay(target: str, storage_path: str | None, name: str | None) -> int:
    """:func:`replay` with Train's failure as exit code 1 (user errors propagate to the caller)."""
    try:
        return replay(target, storage_path, name)
    except ray.train.TrainingFailedError as err:
        print(f"replay failed: {err}", flush=True)
        return 1
