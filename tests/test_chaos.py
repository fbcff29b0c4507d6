"""A sweep under repeated node loss and a killed driver ends with exactly the numbers of an undisturbed run.

Real clusters, real kills (:mod:`tests.chaos_cluster`): a CPU-less head and one-CPU worker nodes started
with ``ray start``; a node killer loses a random worker node (every process of it at once) at random
intervals throughout the sweep and starts a replacement each time, as an autoscaler would; the sweep's
driver is SIGKILLed once and the sweep resumed with ``--resume``. Two clusters: the head advertises the
``trial_driver`` resource (a loss costs only training workers, which Ray Train restarts) or it does not
(trial drivers die with their node and Tune retries them). The runs are deterministic, so the disturbed
sweep must equal the undisturbed one number for number: every trial ends as it did there, every epoch is
reported exactly once, and every metric column of ``trials.csv`` and ``epochs.csv`` is bit-equal (timing
and failure bookkeeping aside).

``make test`` runs the cluster without ``trial_driver`` and the preemptions; ``make chaos`` runs every case,
with more kills (``CHAOS_KILLS``), and prints the timelines.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.chaos_cluster import ChaosCluster, NodeKiller, NodeLoss
from tests.conftest import DriverProcess
from tests.sweep_tables import comparable

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
KILLS = int(os.environ.get("CHAOS_KILLS", "3"))  # node losses per disturbed sweep, at least
INTERVAL_S = (15.0, 25.0)  # between node losses
SEARCHED = ["gamma", "seed"]
# Every trial's budget of retries: several losses may hit one trial (Ray Train's restarts of its workers
# and, without `trial_driver`, Tune's of its driver count against it: docs/cluster.md).
MAX_FAILURES = 10


def _sweep_command(
    storage: Path, name: str, resume: bool = False, max_failures: int = MAX_FAILURES, check_steps: int = 2
) -> list[str]:
    """The smoke gamma sweep: 2 gammas x 2 seeds at full budget (FIFO), 2 trials at a time on 2 nodes;
    chans 16 makes an epoch (16 slices, 4 steps) last seconds; the preemption handler asks every
    ``check_steps`` steps. A worker's 0.65 CPU leaves a one-CPU node room for one Ray Data task (0.25)
    beside a trial driver (0.1): with 0.75, trials with their drivers on the worker nodes waited for data
    forever (docs/cluster.md)."""
    overrides = ["seeds=[0,1]", f"epochs={EPOCHS}", "image_every_epochs=0", "scheduler.type=fifo",
                 "cpus_per_worker=0.65", "chans=16", "search.gamma=[0.0,1.0e-2]",
                 "search.psi_norm=[instance]", f"max_failures={max_failures}",
                 f"preemption_check_steps={check_steps}"]  # fmt: skip
    command = [sys.executable, str(REPO / "sweeps" / "gamma_sweep.py"), "--profile", "smoke",
               "--storage", str(storage), "--name", name, *(["--resume"] if resume else [])]  # fmt: skip
    return command + [arg for override in overrides for arg in ("--set", override)]


def _reports(experiment: Path) -> dict[str, list[dict]]:
    """Per trial directory, its result.json lines."""
    out = {}
    for result in experiment.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        out[result.parent.name] = [json.loads(line) for line in lines if line.strip()]
    return out


def _tables(experiment: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``trials.csv`` and ``epochs.csv`` keyed by the searched values (trial ids differ between runs), their
    timing and failure columns left out."""
    results = experiment / "results"
    trials, epochs = pd.read_csv(results / "trials.csv"), pd.read_csv(results / "epochs.csv")
    return comparable(trials, SEARCHED), comparable(epochs, [*SEARCHED, "epoch"])


@dataclass(frozen=True)
class SweepRun:
    experiment: Path
    trials: pd.DataFrame
    epochs: pd.DataFrame
    reports: dict[str, list[dict]]
    seconds: float


def _finish(experiment: Path, driver: DriverProcess, started: float) -> SweepRun:
    out = driver.output(timeout=1200)
    assert driver.returncode == 0, out[-6000:]
    trials, epochs = _tables(experiment)
    return SweepRun(experiment, trials, epochs, _reports(experiment), time.monotonic() - started)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> SweepRun:
    """The sweep on a cluster nobody disturbs (the head with `trial_driver`), stopped before the tests start
    theirs: two clusters beside the suite's own once left a new head's GCS without an answer for 30 s."""
    storage = tmp_path_factory.mktemp("undisturbed")
    cluster = ChaosCluster(trial_driver=True)
    try:
        started = time.monotonic()
        driver = DriverProcess(_sweep_command(storage, "chaos"), cluster.env, storage / "driver.log")
        run = _finish(storage / "chaos", driver, started)
    finally:
        cluster.stop()
    return run


def _some_trial_reported(experiment: Path) -> bool:
    return any(len(lines) >= 2 for lines in _reports(experiment).values())


def _kill_driver_mid_sweep(driver: DriverProcess, killer: NodeKiller, experiment: Path) -> float:
    """SIGKILL the driver's process group once the first node was lost and before the sweep ends; when."""
    deadline = time.monotonic() + 600
    while not killer.losses and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    _assert_running(driver)
    while not _progress_between_trials(experiment) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    _assert_running(driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    return time.time()


def _assert_running(driver: DriverProcess) -> None:
    if driver.poll() is not None:
        pytest.fail("the sweep ended before its driver could be killed:\n" + driver.output()[-4000:])


def _progress_between_trials(experiment: Path) -> bool:
    """Some trial is past its first trained epoch (so the resumed driver has work done to keep)."""
    return any(len(lines) >= 3 for lines in _reports(experiment).values())


def _disturbed(tmp_path: Path, trial_driver: bool) -> tuple[SweepRun, list[NodeLoss], float]:
    """The sweep under node loss (at least KILLS) with its driver killed once and resumed."""
    cluster = ChaosCluster(trial_driver=trial_driver)
    experiment = tmp_path / "chaos"
    try:
        started = time.monotonic()
        log = tmp_path / "driver.log"
        driver = DriverProcess(_sweep_command(tmp_path, "chaos"), cluster.env, log)
        killer = NodeKiller(cluster, seed=int(trial_driver), interval_s=INTERVAL_S,
                            started=lambda: _some_trial_reported(experiment)).start()  # fmt: skip
        driver_killed_at = _kill_driver_mid_sweep(driver, killer, experiment)
        resumed = DriverProcess(_sweep_command(tmp_path, "chaos", resume=True), cluster.env,
                                tmp_path / "resumed.log")  # fmt: skip
        while resumed.poll() is None and len(killer.losses) < KILLS:
            time.sleep(1)
        losses = killer.stop()
        assert not killer.errors, killer.errors
        run = _finish(experiment, resumed, started)
    finally:
        cluster.stop()
    assert len(losses) >= KILLS, f"only {len(losses)} node losses before the sweep ended"
    return run, losses, driver_killed_at


@dataclass(frozen=True)
class Interruption:
    """A trial interrupted at ``at``: its last epoch reported before, about how many slices it had trained
    since (what resuming from that epoch's checkpoint trains again: the time since the report at the
    epoch's training speed, at most one epoch's), and when it reported again."""

    epoch: int
    slices_since: float
    again_after_s: float


def _interruption(reports: list[dict], at: float) -> Interruption | None:
    """How ``at`` interrupted a trial, or None: it had finished, or its next report came in about an epoch's
    usual time (it was not interrupted)."""
    before = [r for r in reports if r["timestamp"] <= at]
    after = [r for r in reports if r["timestamp"] > at]
    if not before or not after or len(before) >= EPOCHS + 1:
        return None
    stamps = [r["timestamp"] for r in reports[1:]]
    usual = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    if after[0]["timestamp"] - before[-1]["timestamp"] < 1.5 * usual:
        return None
    speed, slices = after[0]["train_slices_per_second"], after[0]["train_slices"]
    since = min(slices, (at - before[-1]["timestamp"]) * speed)
    return Interruption(before[-1]["epoch"], since, after[0]["timestamp"] - at)


def _timeline(run: SweepRun, losses: list[NodeLoss], driver_killed_at: float) -> str:
    """When each loss was detected, and when each trial it interrupted reported again."""
    lines = []
    for loss in losses:
        resumed = []
        for name, reports in run.reports.items():
            if (hit := _interruption(reports, loss.killed_at)) is not None:
                resumed.append(
                    f"{name.split('_')[2]} after epoch {hit.epoch} (~{hit.slices_since:.0f} slices trained "
                    f"since) reported again after {hit.again_after_s:.0f} s"
                )
        dead = f"{loss.dead_after_s:.1f} s" if loss.dead_after_s is not None else "never (120 s)"
        lines.append(f"node {loss.index} killed; dead after {dead}, replaced after "
                     f"{loss.replaced_after_s:.1f} s; " + ("; ".join(resumed) or "no trial"))  # fmt: skip
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "trial_driver",
    # `make test` runs the harder case (a loss also kills trial drivers, which Tune retries); the head with
    # `trial_driver` is what the preemption test runs, and `make chaos` runs both.
    [pytest.param(True, marks=pytest.mark.chaos), False],
    ids=["trial_driver_head", "drivers_anywhere"],
)
def test_sweep_under_node_loss_and_a_killed_driver_equals_the_undisturbed_sweep(
    undisturbed, tmp_path, trial_driver
):
    run, losses, driver_killed_at = _disturbed(tmp_path, trial_driver)
    assert set(run.trials["status"]) == {"completed"} and len(run.trials) == 4, run.trials
    for name, reports in run.reports.items():
        epochs = [report["epoch"] for report in reports]
        assert epochs == list(range(EPOCHS + 1)), (name, epochs)  # each epoch exactly once, from epoch 0
    pd.testing.assert_frame_equal(run.trials, undisturbed.trials, check_exact=True)
    pd.testing.assert_frame_equal(run.epochs, undisturbed.epochs, check_exact=True)
    for column in ("ssim", "nmse", "psnr", "train_loss"):
        assert column in run.epochs.columns, column
    print(
        f"\n{'trial_driver head' if trial_driver else 'trial drivers anywhere'}: {len(losses)} node losses, "
        f"driver killed once; sweep {run.seconds:.0f} s (undisturbed {undisturbed.seconds:.0f} s)\n"
        + _timeline(run, losses, driver_killed_at)
    )


def _guard(cluster: ChaosCluster, node_id: str, deadline_s: float, log: Path) -> subprocess.Popen:
    """``ray_jobs.spot_guard`` for one worker node, as a spot node runs it beside ``ray start``."""
    command = [sys.executable, "-m", "ray_jobs.spot_guard", "--address", cluster.address,
               "--node-id", node_id, "--deadline-s", str(deadline_s)]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _node_hosting_a_mid_epoch_run(cluster: ChaosCluster, experiment: Path, deadline: float) -> int:
    """A worker node index whose Train worker is in the middle of a trial, at a moment when every running
    trial has an epoch done and two or more to go: whichever trial's worker the node hosts then trains on
    past the warning (a trial in its last epoch may finish before it is asked, and leave no record)."""
    while time.monotonic() < deadline:
        reports = [len(lines) for lines in _reports(experiment).values()]  # epochs done + 1 (epoch 0)
        running = [done for done in reports if done < EPOCHS + 1]
        if running and all(2 <= done <= EPOCHS - 1 for done in running):
            busy = set(cluster.train_worker_nodes("state=ALIVE"))
            found = [index for index, node in cluster.worker_node_ids().items() if node in busy]
            if found:
                return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no trial mid-run on a worker node: {_reports(experiment).keys()}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    "check_steps", [2, pytest.param(0, marks=pytest.mark.chaos)], ids=["in_epoch_checkpoint", "without"]
)
def test_preempted_nodes_cost_no_failure_and_the_sweep_equals_the_undisturbed_one(
    undisturbed, tmp_path, check_steps
):
    """Twice, the spot warning (SIGTERM to the node's spot guard, which drains the node as preempted), then
    the reclaim at the deadline (every process of the node killed) and a replacement. With max_failures 0,
    a preemption counted as a failure would end its trial as errored. With the handler asking every
    ``check_steps`` the run on the node checkpoints within the epoch and resumes at that very step; without
    it (0) it resumes from its last epoch checkpoint (``make chaos`` measures what that costs)."""
    cluster = ChaosCluster(trial_driver=True)
    # 25 s: a CI run with 12 s reclaimed both warned nodes before their runs had checkpointed (the drain seen
    # up to 5 s late, then an epoch's validation before the next check).
    experiment, deadline_s, guards, warned = tmp_path / "chaos", 25.0, {}, []
    try:
        driver = DriverProcess(_sweep_command(tmp_path, "chaos", max_failures=0, check_steps=check_steps),
                               cluster.env, tmp_path / "driver.log")  # fmt: skip
        for _ in range(2):
            for index, node_id in cluster.worker_node_ids().items():
                if index not in guards:
                    guards[index] = _guard(cluster, node_id, deadline_s, tmp_path / f"guard{index}.log")
            index = _node_hosting_a_mid_epoch_run(cluster, experiment, time.monotonic() + 600)
            guards[index].send_signal(signal.SIGTERM)  # the spot warning
            warned.append(time.time())
            assert guards[index].wait(timeout=120) == 0, (tmp_path / f"guard{index}.log").read_text()
            time.sleep(max(0.0, warned[-1] + deadline_s - time.time()))
            cluster.kill_worker(index)  # the reclaim
            cluster.add_worker()
        run = _finish(experiment, driver, time.monotonic())
    finally:
        for guard in guards.values():
            guard.kill()
        cluster.stop()
    assert set(run.trials["status"]) == {"completed"}, run.trials
    table = pd.read_csv(experiment / "results" / "trials.csv")
    assert (table["attempts"] == 1).all(), table["attempts"]  # no failed attempt anywhere
    pd.testing.assert_frame_equal(run.trials, undisturbed.trials, check_exact=True)
    pd.testing.assert_frame_equal(run.epochs, undisturbed.epochs, check_exact=True)
    records = [json.loads(f.read_text()) for f in sorted(experiment.glob("train_runs/*/preemptions/*.json"))]
    assert table["preemptions"].sum() == len(records)
    print(f"\npreemptions with preemption_check_steps={check_steps}:\n" + _preemption_timeline(run, warned,
          records, deadline_s))  # fmt: skip
    if not check_steps:
        assert not records
        return
    # Each warning: one run checkpointed within its epoch, and resumed elsewhere at that step (a record
    # written at another step would be a file without the checkpoint's fields).
    assert len(records) == len(warned), records
    for record in records:
        assert {"checkpointed_at", "resumed_at", "nodes"} <= set(record), record
        assert record["checkpointed_at"] < record["resumed_at"]


def _preemption_timeline(run: SweepRun, warned: list[float], records: list[dict], deadline_s: float) -> str:
    """Per warning: what the run on the node had done, when it checkpointed and resumed, the steps lost."""
    lines, records = [], sorted(records, key=lambda record: record.get("checkpointed_at", 0))
    for at, record in zip(warned, [*records, *([None] * len(warned))], strict=False):
        if record is not None:
            lines.append(
                f"warned; checkpointed at step {record['step']} of epoch {record['epoch'] + 1} after "
                f"{record['checkpointed_at'] - at:.1f} s ({record['slices']} slices in), resumed at that "
                f"step after {record['resumed_at'] - at:.1f} s (reclaim at {deadline_s:.0f} s): nothing "
                "trained again"
            )  # fmt: skip
            continue
        for reports in run.reports.values():
            if (hit := _interruption(reports, at + deadline_s)) is not None:
                lines.append(f"warned; no in-epoch checkpoint; reclaimed after epoch {hit.epoch}: "
                             f"~{hit.slices_since:.0f} slices trained again, reported again "
                             f"{hit.again_after_s:.0f} s after the reclaim")  # fmt: skip
    return "\n".join(lines)


@pytest.mark.slow
def test_trials_that_would_leave_no_node_room_for_their_data_are_refused_before_any_trial(tmp_path):
    """Two one-CPU nodes, trial drivers on them: a worker of 0.75 CPU and a driver of 0.1 leave 0.15 CPU on
    a node, less than a Ray Data task's 0.25, although the cluster has 0.3 CPU free in all (this sweep
    waited for data forever before the nodes were checked)."""
    cluster = ChaosCluster(trial_driver=False)
    try:
        command = [*_sweep_command(tmp_path, "starved"), "--set", "cpus_per_worker=0.75"]
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "leave no room for a Ray Data task (0.25 CPU) on the nodes (the largest has 1 CPUs)" in out, out
    assert "Traceback" not in out and not (tmp_path / "starved").exists()
