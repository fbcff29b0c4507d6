"""ASHA whose rung records survive an interrupted driver.

Ray does not save a scheduler's state: ``Tuner.restore`` unpickles ASHA as it was when the sweep started,
so a resumed sweep would prune from an empty history. :class:`PersistentASHAScheduler` writes the rung
records, the trials it stopped and every decision it made (trial, rung, value, the rung's cut-off, continue
or stop: :data:`mri_models.experiment.ASHA_DECISIONS_KEY`) after every result and reloads them on restore.
The trials' workers read the decisions too: one that reported a rung's epoch waits for its decision before
training on (:class:`ray_jobs.worker.RungWait`, laid out by :func:`rung_epochs`).

ASHA keeps its records in private attributes (``_brackets``, each with ``_rungs`` of ``(milestone,
recorded)`` and ``cutoff()``; ``_trial_info``, ``_num_stopped``, ``_time_attr``, ``_max_t``, ``_metric``,
``_metric_op``). Everything that touches them is in the small functions below, checked against the Ray
versions this was read from, so a Ray upgrade fails here, clearly, instead of resuming wrongly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ray
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from mri_models import storage
from mri_models.experiment import (
    ASHA_DECISIONS_KEY,
    DECISION_COMPLETE,
    DECISION_CONTINUE,
    DECISION_STOP,
)
from ray_jobs.config import ConfigError

# Read in ray/tune/schedulers/async_hyperband.py of these releases.
SUPPORTED_RAY = ("2.60.",)


def _check_ray_version() -> None:
    if not ray.__version__.startswith(SUPPORTED_RAY):
        raise RuntimeError(
            f"ray_jobs.asha reads ASHAScheduler's private rung records as Ray {', '.join(SUPPORTED_RAY)}x "
            f"lays them out; Ray {ray.__version__} is installed: check async_hyperband.py and update "
            "SUPPORTED_RAY"
        )


def _rung_records(scheduler: ASHAScheduler) -> list[list[tuple[float, dict[str, float]]]]:
    """Per bracket, per rung: the milestone and the live ``{trial_id: score}`` dict ASHA records into."""
    return [list(bracket._rungs) for bracket in scheduler._brackets]


def _reached_max_t(scheduler: ASHAScheduler, result: dict) -> bool:
    return result.get(scheduler._time_attr, 0) >= scheduler._max_t


def _set_stopped_count(scheduler: ASHAScheduler, count: int) -> None:
    scheduler._num_stopped = count


def _trial_rungs(scheduler: ASHAScheduler, trial_id: str) -> list[tuple[float, dict[str, float]]]:
    """The milestone and records of every rung of the trial's bracket (none before Tune added it)."""
    bracket = scheduler._trial_info.get(trial_id)
    return list(bracket._rungs) if bracket is not None else []


def _cutoff(scheduler: ASHAScheduler, trial_id: str, recorded: dict[str, float]) -> float | None:
    """The cut-off ASHA compared the trial's value with at a rung, in the metric's own units.

    ASHA computes it over the rung's records before adding the trial's, so it is the same percentile over
    the other trials' records; None where the rung had none (ASHA then never stops).
    """
    others = {key: value for key, value in recorded.items() if key != trial_id}
    cutoff = scheduler._trial_info[trial_id].cutoff(others)
    # ASHA records the metric times +1 (max) or -1 (min), so it always stops below the cut-off.
    return None if cutoff is None else float(cutoff) * scheduler._metric_op


def _objective(scheduler: ASHAScheduler) -> tuple[str, str]:
    """The metric and mode ASHA decides on (set by the Tuner's TuneConfig when not given to ASHA)."""
    return scheduler._metric, scheduler._mode


def _time(scheduler: ASHAScheduler, result: dict) -> float | None:
    return result.get(scheduler._time_attr)


def asha_options(max_epochs: int, grace_period: int, reduction_factor: float) -> dict[str, Any]:
    """ASHA's arguments for a sweep: ``epoch`` as time attribute, one bracket, ``max_t`` the epoch budget.

    The driver builds its scheduler from them and every trial lays out its rungs from them
    (:func:`rung_epochs`), so both see the same rungs.
    """
    return {
        "time_attr": "epoch",
        "max_t": max_epochs,
        "grace_period": min(grace_period, max_epochs),
        "reduction_factor": reduction_factor,
    }


def rung_epochs(options: dict[str, Any]) -> dict[int, float]:
    """The epochs at which ASHA decides about a trial that reports every epoch, each with its rung.

    The rungs are those Ray lays out for these :func:`asha_options` (read from a scheduler built with them);
    a result is decided at the highest rung at or below its epoch that has no record of the trial yet, as
    ``_Bracket.on_result`` does, so a fractional milestone is decided at the first epoch past it. The epoch
    budget itself is left out: there Tune stops every trial, and its loop ends anyway.
    """
    _check_ray_version()
    milestones = sorted(milestone for milestone, _ in _rung_records(ASHAScheduler(**options))[0])
    decided: dict[int, float] = {}
    for epoch in range(1, int(options["max_t"])):
        open_rungs = [m for m in milestones if m <= epoch and m not in decided.values()]
        if open_rungs:
            decided[epoch] = max(open_rungs)
    return decided


class PersistentASHAScheduler(ASHAScheduler):
    """ASHA whose rung records are written to ``state_path`` after every change and reloaded on restore.

    Args:
        state_path: file (local path or URI) the records are written to; not ``*.json`` (see
            :data:`mri_models.experiment.ASHA_STATE_FILE`).
        stops_in_workers: the trials' workers wait at every rung for the recorded decision and end the run
            themselves when it is a stop (:class:`ray_jobs.worker.RungWait`), so Tune is always told to
            continue; False: Tune stops the trial, as plain ASHA does.
        **kwargs: ASHAScheduler arguments.
    """

    def __init__(self, state_path: str, stops_in_workers: bool = False, **kwargs: Any):
        _check_ray_version()
        super().__init__(**kwargs)
        self.state_path = state_path
        self.stops_in_workers = stops_in_workers
        self.stopped_trials: list[str] = []
        self.decisions: list[dict[str, Any]] = []
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the records since then
        # are in the state file.
        self.__dict__.update({"decisions": [], "stops_in_workers": False, **state})
        self._load()

    def _load(self) -> None:
        saved = storage.read_json(self.state_path)
        if saved is None:
            return
        for rungs, saved_rungs in zip(_rung_records(self), saved["brackets"], strict=True):
            for (milestone, recorded), saved_rung in zip(rungs, saved_rungs, strict=True):
                if not math.isclose(milestone, saved_rung["milestone"]):
                    raise ConfigError(
                        f"{self.state_path} was written for other ASHA rungs ({saved_rung['milestone']} vs "
                        f"{milestone}); the sweep's scheduler settings changed"
                    )
                recorded.clear()
                recorded.update(saved_rung["recorded"])
        self.stopped_trials = list(saved.get("stopped_trials", []))
        self.decisions = list(saved.get(ASHA_DECISIONS_KEY, []))
        _set_stopped_count(self, len(self.stopped_trials))

    def _save(self) -> None:
        # One file for records and decisions, written whole: a killed driver never leaves them disagreeing,
        # so a resumed sweep neither repeats a decision nor loses one.
        metric, mode = _objective(self)
        state = {
            "brackets": [
                [{"milestone": milestone, "recorded": recorded} for milestone, recorded in rungs]
                for rungs in _rung_records(self)
            ],
            "stopped_trials": self.stopped_trials,
            "metric": metric,
            "mode": mode,
            ASHA_DECISIONS_KEY: self.decisions,
        }
        storage.write_text(self.state_path, json.dumps(state))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        trial_id = trial.trial_id
        recorded_before = {m for m, recorded in _trial_rungs(self, trial_id) if trial_id in recorded}
        action = super().on_trial_result(tune_controller, trial, result)
        decision = self._decision(trial_id, result, action, recorded_before)
        if decision is not None:
            self.decisions.append(decision)
        stopped_early = action == TrialScheduler.STOP and not _reached_max_t(self, result)
        if stopped_early and trial_id not in self.stopped_trials:
            self.stopped_trials.append(trial_id)
        self._save()
        # Workers that wait for the recorded decision end their run themselves, at the rung (or after the
        # last epoch): Tune's own stop would kill the trial while its Train controller shuts down, which in
        # Ray 2.60 leaves the worker group's placement group reserved (on 2 CPUs, every later trial then
        # waited for CPUs forever: benchmarks/sweep_efficiency.py).
        return TrialScheduler.CONTINUE if self.stops_in_workers else action

    def _decision(
        self, trial_id: str, result: dict, action: str, recorded_before: set[float]
    ) -> dict[str, Any] | None:
        """The decision ASHA just made on the trial's result: at the rung it recorded the result in, or at
        the epoch budget (where Tune ends every trial); None for a result between rungs."""
        epoch, value = _time(self, result), result.get(_objective(self)[0])
        for milestone, recorded in _trial_rungs(self, trial_id):
            if trial_id in recorded and milestone not in recorded_before:
                decision = DECISION_STOP if action == TrialScheduler.STOP else DECISION_CONTINUE
                cutoff = _cutoff(self, trial_id, recorded)
                return _decision_row(trial_id, milestone, epoch, value, cutoff, decision)
        # Once per trial: a rerun from its start after a restore (a trainable without checkpoints) reaches
        # the budget again, where ASHA's rung records keep it from deciding twice.
        completed = {d["trial_id"] for d in self.decisions if d["decision"] == DECISION_COMPLETE}
        if action == TrialScheduler.STOP and _reached_max_t(self, result) and trial_id not in completed:
            return _decision_row(trial_id, epoch, epoch, value, None, DECISION_COMPLETE)
        return None

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def _decision_row(
    trial_id: str, rung: float, epoch: float, value: Any, cutoff: float | None, decision: str
) -> dict[str, Any]:
    """One decision as :data:`mri_models.experiment.DECISION_KEYS` lays it out."""
    number = float(value) if isinstance(value, (int, float)) else None
    return {"trial_id": trial_id, "rung": rung, "epoch": epoch, "value": number, "cutoff": cutoff,
            "decision": decision}  # fmt: skip
