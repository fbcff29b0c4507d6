"""How a trial ended: its final attempt's outcome, not the traces an earlier attempt left behind.

Tune retries a trial whose driver died (``FailureConfig(max_failures)``): the retry resumes the trial's
training run from its own checkpoints and may well finish. Tune appends every failure to the trial's
``error.txt`` and never removes it, so the file says that *some* attempt failed, not that the trial did.
What decides, in this order:

1. the last attempt's reports: a last report with ``diverged`` set is a diverged trial;
2. Tune's final trial state in its experiment state file (``TERMINATED`` or ``ERROR``), where the
   experiment records one;
3. otherwise (an experiment whose driver was killed, or one written before Tune recorded states), whether
   any report came after the last failure: a failure after the last report ended the trial;
4. then the number of epochs reached and the scheduler's decision (:func:`analysis.collect.collect`).

The attempts are the failed ones plus the final one, unless the final one is the last failure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from mri_models import storage
from mri_models.experiment import ExperimentLayout

# Tune's header of each failure in error.txt: "Failure # 1 (occurred at 2026-11-24_02-41-00)".
_FAILURE_HEADER = re.compile(r"^Failure # (\d+) \(occurred at ([0-9_-]+)\)$", re.MULTILINE)
_TUNE_FINAL = ("TERMINATED", "ERROR")
_SUMMARY_CHARS = 300


@dataclass(frozen=True)
class Failure:
    """One failed attempt as Tune recorded it in ``error.txt``."""

    occurred: str  # Tune's date_str(), "%Y-%m-%d_%H-%M-%S" (sorts as it reads), "" when not given
    text: str

    def summary(self) -> str:
        """The error's last line (the exception itself), shortened for a table cell."""
        lines = self.text.strip().splitlines()
        return lines[-1][:_SUMMARY_CHARS] if lines else ""


@dataclass(frozen=True)
class TuneTrialState:
    """A trial's entry in Tune's experiment state."""

    status: str  # PENDING, RUNNING, PAUSED, TERMINATED or ERROR
    num_failures: int
    logdir: str | None = None  # its trial directory's name


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, for ``trials.csv``."""

    status: str  # completed, reached_target, stopped, diverged, errored, unfinished
    attempts: int
    error: str  # the final attempt's error ("" when it did not fail)
    earlier_error: str  # the last error of an earlier attempt that was retried ("" when none)


def parse_failures(text: str | None) -> list[Failure]:
    """The failures of Tune's ``error.txt``, oldest first; text without Tune's headers is one failure."""
    if not text or not text.strip():
        return []
    headers = list(_FAILURE_HEADER.finditer(text))
    if not headers:
        return [Failure("", text)]
    ends = [h.start() for h in headers[1:]] + [len(text)]
    return [Failure(h.group(2), text[h.end() : end]) for h, end in zip(headers, ends, strict=True)]


def tune_trial_states(layout: ExperimentLayout) -> dict[str, TuneTrialState]:
    """Trial id -> Tune's recorded state, from the newest experiment state file (empty when none)."""
    path = layout.tune_state_file()
    try:
        state = storage.read_json(path) if path else None
        trial_data = (state or {}).get("trial_data", [])
        states = {}
        for trial_json, metadata_json in trial_data:
            trial, metadata = json.loads(trial_json), json.loads(metadata_json)
            states[trial["trial_id"]] = TuneTrialState(
                trial["status"], int(metadata.get("num_failures", 0)), trial.get("relative_logdir")
            )
        return states
    except (ValueError, KeyError, TypeError):  # a state of another Tune version: decide without it
        return {}


def trial_outcome(
    reports: list[dict[str, Any]],
    failures: list[Failure],
    tune_state: TuneTrialState | None,
    max_epochs: int | None,
    stopped_by_asha: bool,
    stops_at_target: bool = False,
) -> Outcome:
    """The final outcome of one trial.

    Args:
        reports: the trial's reports (``result.json`` lines) in the order they were written.
        failures: its failed attempts (:func:`parse_failures` of ``error.txt``).
        tune_state: Tune's recorded state of the trial, when the experiment has one.
        max_epochs: the sweep's epoch budget.
        stopped_by_asha: whether the scheduler stopped the trial.
        stops_at_target: whether its runs end at the epoch they reach ``target_ssim``.
    """
    last_failed = _last_attempt_failed(reports, failures, tune_state)
    recorded = tune_state.num_failures if tune_state else 0
    failed = max(len(failures), recorded, 1 if last_failed else 0)
    attempts = failed if last_failed else failed + 1
    retried = failures[:-1] if last_failed else failures
    earlier_error = retried[-1].summary() if retried else ""
    epochs_run = max((int(r.get("epoch", 0)) for r in reports), default=0)
    if reports and reports[-1].get("diverged"):
        error = f"training diverged at epoch {reports[-1].get('epoch')} (loss NaN or Inf)"
        return Outcome("diverged", attempts, error, earlier_error)
    if last_failed:
        error = failures[-1].summary() if failures else "the trial failed (Tune recorded no error text)"
        status = "diverged" if failures and "diverged" in failures[-1].text else "errored"
        return Outcome(status, attempts, error, earlier_error)
    reached = reports and math.isfinite(reports[-1].get("target_epoch", math.nan))
    if max_epochs is not None and epochs_run >= max_epochs:
        status = "completed"
    elif stops_at_target and reached:
        status = "reached_target"
    else:
        status = "stopped" if stopped_by_asha else "unfinished"
    return Outcome(status, attempts, "", earlier_error)


def _last_attempt_failed(
    reports: list[dict[str, Any]], failures: list[Failure], tune_state: TuneTrialState | None
) -> bool:
    if tune_state is not None and tune_state.status in _TUNE_FINAL:
        return tune_state.status == "ERROR"
    if not failures:
        return False
    last_report = max((str(r.get("date", "")) for r in reports), default="")
    # A failure in the same second as the last report came after it: reports precede the failure they
    # report nothing of. Without dates the failure is taken as final.
    return not last_report or not failures[-1].occurred or failures[-1].occurred >= last_report
