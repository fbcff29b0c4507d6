"""Sweeps across several nodes, and a lost node survived, on a real multi-node Ray cluster on this machine.

The cluster is what the issue measured: a head without CPUs that advertises the ``trial_driver`` resource
(so every trial function, and the Train controller Ray places beside it, runs on the head), and two worker
raylets of one CPU each started with ``ray start --address`` (their own ports, token authentication on).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.tune import TRIAL_DRIVER_RESOURCE
from tests.conftest import DriverProcess
from tests.ray_processes import BIN, free_port, head_env, head_flags, kill_sessions, own_ports, ray_start

REPO = Path(__file__).resolve().parents[1]
WORKER_MARKER = "test_worker_node_"  # a custom resource naming each worker raylet
EPOCHS = 12


@dataclass
class MultiNodeCluster:
    address: str
    dashboard_url: str
    env: dict[str, str]
    worker_ports: list[int]  # node-manager port of each worker raylet

    def raylet_pid(self, node_manager_port: int) -> int:
        """The process id of the raylet listening on ``node_manager_port`` (from /proc)."""
        flag = f"--node_manager_port={node_manager_port}".encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:  # the process ended meanwhile
                continue
            if args and args[0].endswith(b"raylet") and flag in args:
                return int(cmdline.parent.name)
        raise LookupError(f"no raylet with node manager port {node_manager_port}")

    def _list(self, kind: str, *filters: str) -> list[dict]:
        command = [BIN / "ray", "list", kind, "--address", self.dashboard_url, "--format", "json", "--detail",
                   "--limit", "1000", *(arg for f in filters for arg in ("--filter", f))]  # fmt: skip
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, check=True, timeout=60)
        return json.loads(done.stdout)

    def worker_node_ids(self) -> dict[int, str]:
        """Worker raylet index -> Ray node id (from each node's marker resource)."""
        ids = {}
        for node in self._list("nodes", "state=ALIVE"):  # not an attempt that timed out in start-up
            for key in node["resources_total"]:
                if key.startswith(WORKER_MARKER):
                    ids[int(key.removeprefix(WORKER_MARKER))] = node["node_id"]
        return ids

    def node_state(self, node_id: str) -> str:
        return next(n["state"] for n in self._list("nodes") if n["node_id"] == node_id)

    def train_worker_nodes(self, *filters: str) -> list[str]:
        """Node id of every Ray Train worker actor the cluster has seen (matching ``filters``)."""
        return [actor["node_id"] for actor in self._list("actors", "class_name=RayTrainWorker", *filters)]


@pytest.fixture
def multinode_cluster() -> Iterator[MultiNodeCluster]:
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    sessions: set[int] = set()
    try:
        resources = json.dumps({TRIAL_DRIVER_RESOURCE: 1000})
        ray_start([*head_flags(port, dashboard_port), "--num-cpus=0", f"--resources={resources}"],
                  head_env(env), sessions)
        worker_ports = []
        for index in range(2):
            node_manager_port = free_port()  # names the raylet to kill later
            marker = json.dumps({f"{WORKER_MARKER}{index}": 1})
            flags = [
                f"--address={address}",
                "--num-cpus=1",
                f"--resources={marker}",
                *own_ports(node_manager_port),
            ]
            ray_start(flags, env, sessions)
            worker_ports.append(node_manager_port)
        yield MultiNodeCluster(address, f"http://127.0.0.1:{dashboard_port}", env, worker_ports)
    finally:
        kill_sessions(sessions)


def _sweep(cluster: MultiNodeCluster, storage: Path, name: str) -> DriverProcess:
    """The smoke gamma sweep (3 trials, one seed) at full budget; chans 16 makes epochs last seconds."""
    overrides = ["seeds=[0]", f"epochs={EPOCHS}", "image_every_epochs=0", "scheduler.type=fifo",
                 "cpus_per_worker=0.75", "chans=16", "search.gamma=[0.0,1.0e-4,1.0e-2]",
                 "search.psi_norm=[instance]"]  # fmt: skip
    command = [sys.executable, str(REPO / "sweeps" / "gamma_sweep.py"), "--profile", "smoke",
               "--storage", str(storage), "--name", name]  # fmt: skip
    command += [arg for override in overrides for arg in ("--set", override)]
    return DriverProcess(command, cluster.env, storage / f"{name}.log")


def _reports(experiment: Path) -> dict[str, list[dict]]:
    """Per trial directory, its result.json lines."""
    out = {}
    for result in experiment.glob("trial_*/result.json"):
        out[result.parent.name] = [
            json.loads(line) for line in result.read_text().splitlines() if line.strip()
        ]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)  # node-loss detection, restarts and a one-node cluster afterwards take minutes
def test_sweep_spreads_over_nodes_and_survives_a_lost_node(multinode_cluster, tmp_path):
    cluster = multinode_cluster
    experiment = tmp_path / "spread"
    nodes = cluster.worker_node_ids()
    assert len(nodes) == 2, nodes
    driver = _sweep(cluster, tmp_path, "spread")
    # Once a trial has reported and is mid-run, kill the raylet of a node that hosts a live training worker
    # (the actor list is asked only then: each `ray list` costs a Python start-up on 2 cores).
    deadline, victim, seen = time.monotonic() + 400, None, []
    while victim is None and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.3)
        progress = {name: len(lines) for name, lines in _reports(experiment).items()}
        if any(1 <= done < EPOCHS - 1 for done in progress.values()):
            busy = set(cluster.train_worker_nodes("state=ALIVE"))
            victim = next((index for index, node in nodes.items() if node in busy), None)
            seen.append((round(time.monotonic() - deadline + 400), progress, sorted(busy)))
    if victim is None or driver.poll() is not None:
        driver.kill()
        out = driver.output()
        pytest.fail(f"no trial mid-run on a worker node; polls (s, epochs per trial, nodes with a live Train "
                    f"worker): {seen[-5:]}; worker nodes {nodes}; driver output:\n{out[-4000:]}")  # fmt: skip
    before = _reports(experiment)
    killed_at = time.time()
    os.kill(cluster.raylet_pid(cluster.worker_ports[victim]), signal.SIGKILL)
    while cluster.node_state(nodes[victim]) != "DEAD" and time.time() - killed_at < 120:
        time.sleep(0.5)
    detected_after = time.time() - killed_at
    out = driver.output(timeout=900)
    finished_after = time.time() - killed_at
    assert driver.returncode == 0, out[-5000:]

    trials = pd.read_csv(experiment / "results" / "trials.csv")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}, trials[["trial_id", "status"]]
    after = _reports(experiment)
    interrupted = []
    for name, lines in after.items():
        epochs = [line["epoch"] for line in lines]
        # Each epoch reported exactly once: a restarted run resumed from its own last checkpoint.
        assert epochs == list(range(EPOCHS + 1)), (name, epochs)  # from epoch 0, the untrained network
        done_before = len(before.get(name, []))
        if done_before == EPOCHS:
            assert lines == before[name], f"{name} finished before the loss and was run again"
        elif done_before:
            # The run that lost its worker shows the gap: detection, a new worker, the checkpoint loaded.
            stamps = [killed_at, *(line["timestamp"] for line in lines[done_before:])]
            gap, resumed = max((b - a, b) for a, b in itertools.pairwise(stamps))
            interrupted.append((name, done_before, gap, resumed - killed_at))
    assert interrupted, "no trial was running when the node was lost"
    lost = max(interrupted, key=lambda item: item[2])
    assert lost[2] > detected_after / 2, f"no run paused after the loss: {interrupted}"
    ran_on = set(cluster.train_worker_nodes())
    assert set(nodes.values()) <= ran_on, "the trials did not spread over both worker nodes"
    print(
        f"\nnode loss timeline: raylet SIGKILLed; marked DEAD after {detected_after:.1f} s; trial "
        f"{lost[0].split('_')[2]} (at epoch {lost[1]} of {EPOCHS}) reported again {lost[3]:.0f} s after the "
        f"kill, from its checkpoint; sweep finished {finished_after:.1f} s after the kill"
    )
