"""Drain this Ray node as preempted when its spot instance is about to be reclaimed.

    python -m ray_jobs.spot_guard [--address HOST:PORT] [--node-id ID] [--deadline-s 120] [--imds]

Run it beside ``ray start`` on a spot worker node (``cluster.yaml``'s ``worker_start_ray_commands``). On
SIGTERM (what a node-termination handler, systemd or Kubernetes sends when the machine is going) or, with
``--imds``, when EC2's instance metadata announces a spot interruption (``spot/instance-action``, two
minutes ahead), it asks Ray to drain the node with reason ``PREEMPTION`` and that deadline, then exits.
Ray then schedules nothing new there, and Ray Train's runs on it checkpoint at their next step boundary and
are restarted elsewhere without counting against ``max_failures`` (:mod:`ray_jobs.preemption`).

The drain is Ray's own ``ray drain-node`` (what the autoscaler and KubeRay do on a preemption).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

logger = logging.getLogger(__name__)

IMDS_URL = "http://169.254.169.254"
DEFAULT_DEADLINE_S = 120  # AWS's spot interruption notice
POLL_S = 5.0


def imds_interruption(base_url: str = IMDS_URL, timeout_s: float = 2.0) -> float | None:
    """Seconds until EC2 reclaims this spot instance, from its instance metadata (IMDSv2); None while no
    interruption is announced (or there is no metadata service)."""
    try:
        token_request = urllib.request.Request(
            f"{base_url}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
        )  # fmt: skip
        with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
            token = response.read().decode()
        action_request = urllib.request.Request(
            f"{base_url}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
        )
        with urllib.request.urlopen(action_request, timeout=timeout_s) as response:
            action = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):  # 404: no interruption; no service; bad answer
        return None
    when = datetime.fromisoformat(action["time"].replace("Z", "+00:00"))
    return max(0.0, when.timestamp() - time.time())


def drain(address: str, node_id: str | None, deadline_s: float, reason: str) -> int:
    """``ray drain-node`` for this node with reason PREEMPTION; its exit code."""
    command = [shutil.which("ray") or "ray", "drain-node", "--address", address, "--reason",
               "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", reason,
               "--deadline-remaining-seconds", str(int(deadline_s))]  # fmt: skip
    if node_id:
        command += ["--node-id", node_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    logger.warning("drained node %s (%s, deadline in %d s): %s", node_id or "(local)", reason, deadline_s,
                   (done.stdout + done.stderr).strip()[-300:] or done.returncode)  # fmt: skip
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="the cluster's GCS address (default: this node's)")
    parser.add_argument("--node-id", help="the Ray node to drain (default: the node this runs on)")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds from a SIGTERM until the node goes")  # fmt: skip
    parser.add_argument("--imds", action="store_true", help="also poll EC2's spot interruption notice")
    parser.add_argument("--imds-url", default=IMDS_URL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spot_guard %(message)s", stream=sys.stdout)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    print(f"spot_guard: watching {'SIGTERM and EC2 spot notices' if args.imds else 'SIGTERM'}", flush=True)
    while True:
        if terminated.wait(POLL_S if args.imds else None):
            return drain(args.address, args.node_id, args.deadline_s, "SIGTERM: the machine is going")
        seconds = imds_interruption(args.imds_url) if args.imds else None
        if seconds is not None:
            return drain(args.address, args.node_id, seconds, "EC2 spot interruption notice")


if __name__ == "__main__":
    raise SystemExit(main())
