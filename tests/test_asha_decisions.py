"""ASHA's decisions on record: Ray's real scheduler fed real trials, its record checked against its rungs.

No Tune run: :class:`ray_jobs.asha.PersistentASHAScheduler` gets ``on_trial_add``/``on_trial_result`` calls
for stub trials as Tune's controller makes them, so every rung, cut-off and stop is Ray's own. The analysis
side reads the record from a canned experiment directory (:mod:`tests.analysis_fixtures`).
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from mri_models.experiment import ASHA_STATE_FILE, ExperimentLayout, read_asha_decisions
from ray_jobs.asha import PersistentASHAScheduler, asha_options, rung_epochs
from ray_jobs.worker import RungWait
from tests.analysis_fixtures import gamma_sweep


def _scheduler(path: Path, mode: str = "max", **options) -> PersistentASHAScheduler:
    settings = asha_options(**{"max_epochs": 8, "grace_period": 1, "reduction_factor": 2.0, **options})
    return PersistentASHAScheduler(state_path=str(path), metric="ssim", mode=mode, **settings)


def _trial(index: int) -> Trial:
    return Trial("__fake", trial_id=f"abcde_{index:05d}", stub=True)


def _run(scheduler: PersistentASHAScheduler, curves: dict[Trial, list[float]]) -> dict[tuple[str, int], str]:
    """Every trial's results, one epoch of every live trial in turn (as concurrent trials report), each
    trial stopped when ASHA says so; returns every action by (trial id, epoch)."""
    for trial in curves:
        scheduler.on_trial_add(None, trial)
    actions, live = {}, list(curves)
    for epoch in range(1, max(len(curve) for curve in curves.values()) + 1):
        for trial in list(live):
            result = {"epoch": epoch, "ssim": curves[trial][epoch - 1]}
            action = actions[(trial.trial_id, epoch)] = scheduler.on_trial_result(None, trial, result)
            if action == TrialScheduler.STOP:
                scheduler.on_trial_complete(None, trial, result)
                live.remove(trial)
    return actions


def _curves(count: int, epochs: int, seed: int = 0) -> dict[Trial, list[float]]:
    rng = np.random.default_rng(seed)
    return {_trial(i): list(np.cumsum(rng.uniform(0.0, 0.1, size=epochs))) for i in range(count)}


# Integer and fractional milestones, a budget on a rung and between rungs, a grace period past the budget.
SETTINGS = [(2, 1, 2.0), (4, 1, 2.0), (8, 1, 2.0), (10, 1, 3.0), (20, 2, 3.0), (10, 1, 1.5), (7, 1, 2.5),
            (3, 5, 2.0)]  # fmt: skip


@pytest.mark.parametrize(("max_epochs", "grace_period", "reduction_factor"), SETTINGS)
def test_rung_epochs_are_where_ray_decides(tmp_path, max_epochs, grace_period, reduction_factor):
    # One trial that improves every epoch is never stopped: ASHA decides on it at every rung it reaches.
    options = {"max_epochs": max_epochs, "grace_period": grace_period, "reduction_factor": reduction_factor}
    scheduler = _scheduler(tmp_path / ASHA_STATE_FILE, **options)
    _run(scheduler, {_trial(0): [0.1 * epoch for epoch in range(1, max_epochs + 1)]})
    decided = {int(d["epoch"]): d["rung"] for d in scheduler.decisions if d["decision"] == "continue"}
    assert decided == rung_epochs(asha_options(max_epochs, grace_period, reduction_factor))
    assert [d["decision"] for d in scheduler.decisions][-1] == "complete"
    # The rungs ASHA recorded the trial in are those of its decisions, and at most one more: where Tune's
    # completion at the budget records it (the highest rung not yet recorded), without a decision.
    state = json.loads((tmp_path / ASHA_STATE_FILE).read_text())
    recorded = {rung["milestone"] for rung in state["brackets"][0] if "abcde_00000" in rung["recorded"]}
    assert set(decided.values()) <= recorded and len(recorded - set(decided.values())) <= 1


@pytest.mark.parametrize("mode", ["max", "min"])
def test_every_decision_is_rays_cutoff_and_rung_record(tmp_path, mode):
    state_file = tmp_path / ASHA_STATE_FILE
    scheduler = _scheduler(state_file, mode=mode, max_epochs=8)
    actions = _run(scheduler, _curves(12, 8))
    decisions = read_asha_decisions(str(state_file))
    assert decisions == scheduler.decisions and len(decisions) > 12
    sign = 1.0 if mode == "max" else -1.0
    for index, decision in enumerate(decisions):
        if decision["decision"] == "complete":
            assert decision["epoch"] == 8 and decision["cutoff"] is None
            continue
        # The cut-off is the median (reduction factor 2) of the values recorded at that rung before it.
        earlier = [d["value"] for d in decisions[:index] if d["rung"] == decision["rung"]]
        expected = sign * np.nanpercentile([sign * v for v in earlier], 50) if earlier else None
        assert decision["cutoff"] == pytest.approx(expected)
        below = expected is not None and sign * decision["value"] < sign * expected
        assert decision["decision"] == ("stop" if below else "continue")
        assert actions[(decision["trial_id"], decision["epoch"])] == decision["decision"].upper()
    # One decision per trial per rung it reached, each of them ASHA's rung record of the trial.
    state = json.loads(state_file.read_text())
    records = {
        (trial_id, rung["milestone"]): sign * value
        for rung in state["brackets"][0]
        for trial_id, value in rung["recorded"].items()
    }
    at_rungs = [d for d in decisions if d["decision"] != "complete"]
    rung_decisions = {(d["trial_id"], d["rung"]): d["value"] for d in at_rungs}
    assert len(rung_decisions) == len(at_rungs)
    assert rung_decisions == {key: value for key, value in records.items() if key[1] < 8}
    stopped = {d["trial_id"] for d in decisions if d["decision"] == "stop"}
    assert stopped and stopped == set(state["stopped_trials"])


def test_a_restored_scheduler_keeps_its_decisions_once(tmp_path):
    state_file = tmp_path / ASHA_STATE_FILE
    scheduler = _scheduler(state_file)
    pickled = pickle.dumps(scheduler)  # as Tune saves it when the sweep starts
    curves = _curves(6, 8, seed=1)
    _run(scheduler, dict(list(curves.items())[:3]))
    before = list(scheduler.decisions)
    restored = pickle.loads(pickled)  # Tuner.restore: the scheduler as it was, then the state file
    assert restored.decisions == before
    # A trial Tune runs again from its start (without checkpoints): ASHA decided on all of it already. The
    # first trial is first at every rung, so it completes.
    first = next(iter(curves))
    assert [d["decision"] for d in before if d["trial_id"] == first.trial_id][-1] == "complete"
    _run(restored, {_trial(0): curves[first]})
    assert restored.decisions == before
    _run(restored, dict(list(curves.items())[3:]))
    keys = [(d["trial_id"], d["rung"]) for d in restored.decisions]
    assert restored.decisions[: len(before)] == before and len(keys) == len(set(keys))
    assert {d["trial_id"] for d in restored.decisions} == {trial.trial_id for trial in curves}


def test_workers_read_the_decision_of_their_rung(tmp_path):
    state_file = tmp_path / ASHA_STATE_FILE
    scheduler = _scheduler(state_file, max_epochs=4)
    rungs = tuple(rung_epochs(asha_options(4, 1, 2.0)).items())
    assert rungs == ((1, 1.0), (2, 2.0))
    missing = RungWait(str(state_file), "abcde_00001", rungs, timeout_s=0.3, poll_s=0.05)
    started = time.monotonic()
    assert missing.wait(1.0) is None and 0.3 <= time.monotonic() - started < 5  # nothing recorded yet
    _run(scheduler, {_trial(0): [0.5, 0.6, 0.7, 0.8], _trial(1): [0.4, 0.5, 0.6, 0.7]})
    first, second = (RungWait(str(state_file), f"abcde_{i:05d}", rungs, timeout_s=5.0) for i in (0, 1))
    assert [first.milestone(epoch) for epoch in range(5)] == [None, 1.0, 2.0, None, None]
    assert (first.wait(1.0), first.wait(2.0)) == ("continue", "continue")
    assert (second.wait(1.0), second.recorded(2.0)) == ("stop", None)


def test_collect_writes_the_decisions_and_counts_epochs_after_a_stop(tmp_path):
    from analysis import sweep_overview
    from analysis.collect import write_tables
    from analysis.output import OutDir
    from analysis.study import load_study

    experiment = gamma_sweep(tmp_path, tmp_path / "no-such-data")
    layout = ExperimentLayout(str(experiment.path))
    stopped = next(plan for plan in experiment.trials if plan.stopped)
    reached = [plan for plan in experiment.trials if plan.ssim]
    decisions, values = [], []  # rung 1 of grace 1, reduction factor 2, in the trials' order
    for plan in reached:
        cutoff = float(np.nanpercentile(values, 50)) if values else None
        decision = "stop" if plan is stopped else "continue"
        decisions.append({"trial_id": plan.trial_id, "rung": 1.0, "epoch": 1, "value": plan.ssim[0],
                          "cutoff": cutoff, "decision": decision})  # fmt: skip
        values.append(plan.ssim[0])
    state = json.loads(Path(layout.asha_state_file).read_text())
    Path(layout.asha_state_file).write_text(json.dumps({**state, "metric": "ssim", "mode": "max",
                                                        "decisions": decisions}))  # fmt: skip
    tables = write_tables(layout.path)
    table = pd.read_csv(Path(layout.results_dir) / "decisions.csv")
    assert list(table.columns) == ["trial_id", "gamma", "seed", "rung", "epoch", "metric", "mode", "value",
                                   "cutoff", "decision"]  # fmt: skip
    assert list(table["trial_id"]) == [plan.trial_id for plan in reached]
    assert list(table["gamma"]) == [plan.params["gamma"] for plan in reached]
    trials = tables.trials.set_index("trial_id")
    assert trials.loc[stopped.trial_id, "epochs_after_stop"] == 0
    assert trials.drop(index=stopped.trial_id)["epochs_after_stop"].isna().all()
    # A worker that trained an epoch past the stop (as they did before they waited at the rungs) is counted.
    run = Path(layout.train_run(stopped.trial_id).path)
    latest = sorted(run.glob("checkpoint_*"))[-1]
    later = run / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(latest, later)
    history = json.loads((later / "history.json").read_text())
    (later / "history.json").write_text(json.dumps([*history, {**history[-1], "epoch": 2}]))
    trials = write_tables(layout.path).trials.set_index("trial_id")
    assert trials.loc[stopped.trial_id, ["epochs_after_stop", "epochs_run"]].tolist() == [1, 1]
    # The report's sweep overview: every decision with the trial's values, and a table of the stops.
    result = sweep_overview.run(load_study([layout.path]), OutDir(str(tmp_path / "out")))
    overview = pd.read_csv(tmp_path / "out" / "sweep_decisions.csv")
    assert len(overview) == len(reached) and {"gamma", "seed", "cutoff"} <= set(overview.columns)
    assert "sweep_decisions.csv" in [artifact.path for artifact in result.artifacts]
    assert "stopped 1 trial(s)" in result.markdown and stopped.trial_id in result.markdown
