"""ASHA whose rung records survive an interrupted driver.

Ray does not save a scheduler's state: ``Tuner.restore`` unpickles ASHA as it was when the sweep started,
so a resumed sweep would prune from an empty history. :class:`PersistentASHAScheduler` writes the rung
records and the trials it stopped after every decision and reloads them on restore.

ASHA keeps its records in private attributes (``_brackets``, each with ``_rungs`` of ``(milestone,
recorded)``; ``_num_stopped``, ``_time_attr``, ``_max_t``). Everything that touches them is in the three
functions below, checked against the Ray versions this was read from, so a Ray upgrade fails here, clearly,
instead of resuming wrongly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ray
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from mri_models import storage
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


class PersistentASHAScheduler(ASHAScheduler):
    """ASHA whose rung records are written to ``state_path`` after every change and reloaded on restore.

    Args:
        state_path: file (local path or URI) the records are written to; not ``*.json`` (see
            :data:`mri_models.experiment.ASHA_STATE_FILE`).
        **kwargs: ASHAScheduler arguments.
    """

    def __init__(self, state_path: str, **kwargs: Any):
        _check_ray_version()
        super().__init__(**kwargs)
        self.state_path = state_path
        self.stopped_trials: list[str] = []
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the records since then
        # are in the state file.
        self.__dict__.update(state)
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
        _set_stopped_count(self, len(self.stopped_trials))

    def _save(self) -> None:
        state = {
            "brackets": [
                [{"milestone": milestone, "recorded": recorded} for milestone, recorded in rungs]
                for rungs in _rung_records(self)
            ],
            "stopped_trials": self.stopped_trials,
        }
        storage.write_text(self.state_path, json.dumps(state))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        stopped_early = action == TrialScheduler.STOP and not _reached_max_t(self, result)
        if stopped_early and trial.trial_id not in self.stopped_trials:
            self.stopped_trials.append(trial.trial_id)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
