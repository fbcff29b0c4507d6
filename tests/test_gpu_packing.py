"""Several trials on one GPU: a fractional ``gpus_per_worker`` on a node that advertises a GPU.

This machine has none: the worker node advertises one (``ray start --num-gpus=1``) and the test switch
``MRI_MODELS_GPUS_AS_CPU`` (:data:`ray_jobs.worker.GPUS_AS_CPU_VARIABLE`) has the workers Ray gives a share
of it train on the CPU over gloo. What is tested is the scheduling: Ray's placement of two trials' workers
on one GPU at once, with a Ray Data task's CPUs budgeted for each. What packing buys in speed is measured
on a GPU (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.worker import GPUS_AS_CPU_VARIABLE
from tests.chaos_cluster import ChaosCluster

REPO = Path(__file__).resolve().parents[1]


def _span(result: Path) -> tuple[float, float]:
    """When a trial reported first and last."""
    stamps = [json.loads(line)["timestamp"] for line in result.read_text().splitlines() if line.strip()]
    return min(stamps), max(stamps)


@pytest.mark.slow
def test_two_trials_train_on_one_gpu_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(GPUS_AS_CPU_VARIABLE, "1")  # the raylet's workers inherit it
    cluster = ChaosCluster(trial_driver=True, workers=1, cpus_per_node=2, gpus_per_node=1)
    try:
        overrides = ["use_gpu=true", "gpus_per_worker=0.5", "cpus_per_worker=0.5", "seeds=[0]",
                     "search.gamma=[0,1.0e-4]", "search.psi_norm=[instance]", "epochs=3",
                     "image_every_epochs=0", "scheduler.type=fifo"]  # fmt: skip
        command = [sys.executable, str(REPO / "sweeps" / "gamma_sweep.py"), "--profile", "smoke",
                   "--storage", str(tmp_path), "--name", "packed",
                   *(arg for override in overrides for arg in ("--set", override))]  # fmt: skip
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=600)
        workers = cluster.train_workers()
    finally:
        cluster.stop()
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    trials = pd.read_csv(tmp_path / "packed" / "results" / "trials.csv")
    assert list(trials["status"]) == ["completed", "completed"], trials
    assert len(workers) == 2, workers
    # A placement group's bundle resources: GPU_group_<bundle>_<group id> is the worker's share of the GPU.
    required = [worker["required_resources"] for worker in workers]
    shares = [sum(v for k, v in r.items() if re.match(r"GPU_group_\d+_", k)) for r in required]
    assert shares == [0.5, 0.5], required
    first, second = sorted(_span(result) for result in (tmp_path / "packed").glob("trial_*/result.json"))
    assert second[0] < first[1], f"the second trial began after the first had ended: {first} {second}"
