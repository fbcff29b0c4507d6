"""Local Ray clusters for the tests, started with ``ray start`` and ended by process id, never by name.

Each ``ray start`` runs in a session of its own; the daemons it starts (GCS, raylet, dashboard, agents) and
the workers they spawn keep that session id, so killing the session's processes ends that cluster and
nothing else: not a second test run's cluster, not the user's own Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = "The current node timed out during startup"  # ray start's fixed 30 s wait for the GCS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_start(args: list[str], env: dict[str, str], sessions: set[int], attempts: int = 3) -> None:
    """``ray start ...`` in a session of its own, added to ``sessions`` (the id its daemons keep).

    ``ray start`` gives a new raylet a fixed 30 s to appear in the GCS; on 2 loaded cores (the suite's own
    head beside this cluster) that wait once ran out in CI. Such an attempt is killed whole and made again:
    the start-up is the fixture's, not the behaviour under test. Any other failure fails at once.
    """
    for attempt in range(attempts):
        process = subprocess.Popen(
            [BIN / "ray", "start", *args, "--disable-usage-stats"], env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        out, _ = process.communicate(timeout=120)
        if process.returncode == 0:
            sessions.add(process.pid)
            return
        kill_sessions({process.pid})  # whatever the failed attempt left running
        if STARTUP_TIMEOUT not in out or attempt == attempts - 1:
            raise AssertionError(out)


def kill_sessions(sessions: set[int]) -> None:
    """SIGKILL every process in these sessions: this cluster's daemons and workers, and nothing else.

    Not ``ray stop``, which stops every Ray process on the machine by name.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions:  # field 6 of /proc/<pid>/stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def own_ports(node_manager_port: int) -> list[str]:
    """``ray start`` flags giving a node free ports of its own for every server it starts (its raylet on
    ``node_manager_port``).

    Another cluster on the same machine (a second test run, the user's own) may hold Ray's default ports;
    a node must not race it for them (a node whose metrics agent cannot bind leaves its workers logging
    export errors).
    """
    flags = ["object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]  # fmt: skip
    return [f"--node-manager-port={node_manager_port}", *(f"--{flag}={free_port()}" for flag in flags)]


def head_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus free ports for the head's dashboard and autoscaler metrics servers, which take their
    ports from the environment only."""
    return {**env, "DASHBOARD_METRIC_PORT": str(free_port()), "AUTOSCALER_METRIC_PORT": str(free_port())}


def head_flags(port: int, dashboard_port: int) -> list[str]:
    """``ray start --head`` flags for a head on its own ports, its dashboard on loopback."""
    return ["--head", f"--port={port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}", *own_ports(free_port())]  # fmt: skip
