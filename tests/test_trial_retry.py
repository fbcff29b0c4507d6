"""A trial that Tune retried is judged by its retry, on a real Ray head with real trial drivers SIGKILLed.

Tune runs each trial function in an ``ImplicitFunc`` actor (the trial driver); Ray Train places the trial's
controller beside it. Killing that process is what a lost node does to a trial on a cluster without the
``trial_driver`` resource. Tune then writes the failure to the trial's ``error.txt`` and retries the trial
(``max_failures``); the retry resumes the trial's training run from its own checkpoints. The file stays.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import DriverProcess

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6


def _alive_trial_drivers(sweep_driver_pid: int) -> list[int]:
    """Process ids of the live Tune trial drivers (function trainables run in ``ImplicitFunc`` actors) of
    the sweep whose driver process is ``sweep_driver_pid``.

    Only that sweep's: the suite shares one head, and a trial actor of another test's Tune run (the suite's
    own process drives some in-process) that is still alive must not be taken for, nor hide, this one.
    """
    from ray.util.state import list_actors, list_jobs

    jobs = {job.job_id for job in list_jobs(detail=True)
            if job.driver_info is not None and str(job.driver_info.pid) == str(sweep_driver_pid)}  # fmt: skip
    filters = [("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")]
    return [actor.pid for actor in list_actors(filters=filters, detail=True) if actor.job_id in jobs]


def _checkpointed_runs(experiment: Path) -> list[str]:
    """Trial ids whose training run has written a checkpoint (an epoch done), in the order they began."""
    runs = [d for d in (experiment / "train_runs").glob("*") if any(d.glob("checkpoint_*"))]
    return [d.name for d in sorted(runs, key=lambda d: (d / "train_config.json").stat().st_mtime)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_retried_trial_counts_and_one_whose_last_attempt_failed_does_not(ray_local, ray_head, tmp_path):
    # Two trials, one after the other, one retry each. The first loses its driver once, after its first
    # epoch, and finishes on the retry; the second loses it after its first epoch and again as the retry
    # starts, so its last attempt fails.
    overrides = ["seeds=[0,1]", "search.gamma=[0.0]", "search.psi_norm=[instance]", "scheduler.type=fifo",
                 "max_failures=1",
                 "max_concurrent_trials=1", f"epochs={EPOCHS}", "chans=16",
                 "image_every_epochs=0"]  # fmt: skip
    command = [sys.executable, str(REPO / "sweeps" / "gamma_sweep.py"), "--profile", "smoke",
               "--storage", str(tmp_path), "--name", "retried"]  # fmt: skip
    command += [arg for override in overrides for arg in ("--set", override)]
    driver = DriverProcess(command, ray_head.env, tmp_path / "driver.log")
    experiment = tmp_path / "retried"
    killed: list[tuple[str, int]] = []  # (trial id, driver pid)
    deadline = time.monotonic() + 480
    while len(killed) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
        runs = _checkpointed_runs(experiment) if (experiment / "train_runs").exists() else []
        if len(killed) < 2:  # the first and the second trial, once each after their first epoch
            if len(runs) <= len(killed):
                continue
            trial_id = runs[len(killed)]
        else:  # the second trial's retry, as soon as its driver is up
            trial_id = killed[1][0]
        drivers = [pid for pid in _alive_trial_drivers(driver.pid) if pid not in {pid for _, pid in killed}]
        if len(drivers) == 1:  # one trial at a time: the live driver is this trial's
            os.kill(drivers[0], signal.SIGKILL)
            killed.append((trial_id, drivers[0]))
    out = driver.output(timeout=420)
    assert len(killed) == 3, f"killed {killed}; driver output:\n{out[-4000:]}"
    assert driver.returncode == 0, out[-4000:]

    trials = pd.read_csv(experiment / "results" / "trials.csv").set_index("trial_id")
    recovered, failed = killed[0][0], killed[1][0]
    assert recovered != failed
    assert trials.loc[recovered, "status"] == "completed", trials.loc[recovered].to_dict()
    assert trials.loc[recovered, "attempts"] == 2
    assert trials.loc[recovered, "epochs_run"] == EPOCHS
    assert "actor" in trials.loc[recovered, "earlier_error"].lower()  # Tune's ActorDiedError, retried
    assert pd.isna(trials.loc[recovered, "error"])  # an empty cell
    assert trials.loc[failed, "status"] == "errored"
    assert trials.loc[failed, "attempts"] == 2
    assert "actor" in trials.loc[failed, "error"].lower()
    # The stale error.txt is there: the status came from the final attempt, not from the file.
    assert len(list(experiment.glob("trial_*/error.txt"))) == 2
    assert "2 trials: 1 completed, 1 errored; 1 recovered after a retry" in out
    # Each epoch once in the epoch table; the retry resumed from the trial's own checkpoint.
    epochs = pd.read_csv(experiment / "results" / "epochs.csv")
    recovered_epochs = epochs.loc[epochs["trial_id"] == recovered, "epoch"].tolist()
    assert recovered_epochs == sorted(set(recovered_epochs)) and recovered_epochs[-1] == EPOCHS

    from analysis.study import load_study

    study = load_study([str(experiment)]).trials.set_index("trial_id")
    assert study.loc[recovered, "included"] and not study.loc[failed, "included"]
