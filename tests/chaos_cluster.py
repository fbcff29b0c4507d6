"""A real multi-node Ray cluster on this machine whose worker nodes can be lost and replaced, for the tests.

The head has no CPUs and, optionally, the ``trial_driver`` resource (``ray_jobs.tune.TRIAL_DRIVER_RESOURCE``:
every trial function, and the Train controller Ray places beside it, then runs on the head). Worker nodes
of one CPU each are started with ``ray start --address``, each in a session of its own with its own ports
and a marker resource naming it. Losing a node SIGKILLs every process of its session at once (raylet,
object store, workers: what a reclaimed instance does); a replacement joins as the autoscaler's would.
:class:`NodeKiller` does that at random intervals throughout a sweep.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray_jobs.tune import TRIAL_DRIVER_RESOURCE
from tests.ray_processes import BIN, free_port, head_env, head_flags, kill_sessions, own_ports, ray_start

WORKER_MARKER = "test_worker_node_"  # a custom resource naming each worker node: test_worker_node_<index>


@dataclass
class WorkerNode:
    index: int
    session: int  # the session id of its `ray start`, which all its processes keep
    node_manager_port: int


@dataclass
class NodeLoss:
    """One lost node: when it was killed, when the cluster marked it dead, when its replacement joined."""

    index: int
    node_id: str
    killed_at: float  # time.time()
    dead_after_s: float | None = None
    replaced_after_s: float | None = None


class ChaosCluster:
    """A head and worker nodes started with ``ray start``; nodes can be killed and replaced.

    Args:
        trial_driver: whether the head advertises the ``trial_driver`` resource.
        workers: worker nodes to start with.
        cpus_per_node: each worker node's CPUs.
        gpus_per_node: the GPUs each worker node advertises (``ray start --num-gpus``).
    """

    def __init__(
        self, trial_driver: bool, workers: int = 2, cpus_per_node: int = 1, gpus_per_node: int = 0
    ) -> None:
        port, dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray Train looks for drained nodes every 5 s by default; every second leaves the preemption test's
        # deadline room for the runs' next check on a loaded machine (CI saw the reclaim come first).
        env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        self.env = env
        self.cpus_per_node, self.gpus_per_node = cpus_per_node, gpus_per_node
        self.nodes: dict[int, WorkerNode] = {}  # the live worker nodes by index
        self._sessions: set[int] = set()
        self._next_index = 0
        resources = [f"--resources={json.dumps({TRIAL_DRIVER_RESOURCE: 1000})}"] if trial_driver else []
        try:
            head: set[int] = set()
            ray_start([*head_flags(port, dashboard_port), "--num-cpus=0", *resources], head_env(env), head)
            self._sessions |= head
            for _ in range(workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise

    def add_worker(self) -> WorkerNode:
        """Start one more worker node (its index is new: a replacement is another machine)."""
        index, node_manager_port = self._next_index, free_port()
        self._next_index += 1
        marker = json.dumps({f"{WORKER_MARKER}{index}": 1})
        flags = [f"--address={self.address}", f"--num-cpus={self.cpus_per_node}",
                 f"--num-gpus={self.gpus_per_node}", f"--resources={marker}",
                 *own_ports(node_manager_port)]  # fmt: skip
        session: set[int] = set()
        ray_start(flags, self.env, session)
        self._sessions |= session
        node = WorkerNode(index, session.pop(), node_manager_port)
        self.nodes[index] = node
        return node

    def kill_worker(self, index: int) -> None:
        """SIGKILL every process of the worker node at once."""
        node = self.nodes.pop(index)
        kill_sessions({node.session})

    def stop(self) -> None:
        kill_sessions(self._sessions)

    def _list(self, kind: str, *filters: str) -> list[dict]:
        command = [BIN / "ray", "list", kind, "--address", self.dashboard_url, "--format", "json", "--detail",
                   "--limit", "1000", *(arg for f in filters for arg in ("--filter", f))]  # fmt: skip
        # The state API answers through the head's dashboard, which a loaded 2-core machine sometimes
        # leaves without an answer for a moment: asked again, a few times.
        for attempt in range(6):
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
            start = done.stdout.find("[")
            if done.returncode == 0 and start >= 0:
                try:
                    return json.loads(done.stdout[start:])
                except json.JSONDecodeError:
                    pass
            time.sleep(1 + attempt)
        raise RuntimeError(f"`ray list {kind}` gave no answer: {done.stdout[-500:]} {done.stderr[-500:]}")

    def worker_node_ids(self, state: str = "ALIVE") -> dict[int, str]:
        """Worker node index -> Ray node id, for the nodes in ``state`` (from each node's marker)."""
        ids = {}
        for node in self._list("nodes", f"state={state}"):
            for key in node["resources_total"]:
                if key.startswith(WORKER_MARKER):
                    ids[int(key.removeprefix(WORKER_MARKER))] = node["node_id"]
        return ids

    def train_workers(self, *filters: str) -> list[dict]:
        """Every Ray Train worker actor the cluster has seen (matching ``filters``), as the state API lists
        it (``node_id``, ``required_resources``, ``state``, ...)."""
        return self._list("actors", "class_name=RayTrainWorker", *filters)

    def train_worker_nodes(self, *filters: str) -> list[str]:
        """Node id of every Ray Train worker actor the cluster has seen (matching ``filters``)."""
        return [actor["node_id"] for actor in self.train_workers(*filters)]


@dataclass
class NodeKiller:
    """Loses a random worker node at random intervals and starts a replacement each time, in a thread.

    Args:
        cluster: the cluster whose worker nodes it kills.
        seed: seeds the intervals and the choice of node.
        interval_s: each wait before the next loss is drawn uniformly from this range.
        started: called until it returns True before the first wait (e.g. once a trial has reported).
    """

    cluster: ChaosCluster
    seed: int
    interval_s: tuple[float, float]
    started: Callable[[], bool] = lambda: True
    losses: list[NodeLoss] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-killer", daemon=True)

    def start(self) -> NodeKiller:
        self._thread.start()
        return self

    def stop(self) -> list[NodeLoss]:
        """Stop killing (a replacement being started is waited for); the losses so far."""
        self._stop.set()
        self._thread.join(timeout=180)
        return self.losses

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.started():
                self._stop.wait(0.5)
            while not self._stop.wait(self._random.uniform(*self.interval_s)):
                self._lose_one()
        except BaseException as err:  # reported by the test, which owns the assertion
            self.errors.append(err)

    def _lose_one(self) -> None:
        ids = self.cluster.worker_node_ids()
        index = self._random.choice(sorted(set(self.cluster.nodes) & set(ids)))
        loss = NodeLoss(index, ids[index], time.time())
        self.cluster.kill_worker(index)
        self.losses.append(loss)
        while time.time() - loss.killed_at < 120:
            if loss.node_id in self.cluster.worker_node_ids("DEAD").values():
                loss.dead_after_s = time.time() - loss.killed_at
                break
            time.sleep(0.5)
        self.cluster.add_worker()
        loss.replaced_after_s = time.time() - loss.killed_at
