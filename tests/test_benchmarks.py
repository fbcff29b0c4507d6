"""The benchmark scripts still import and parse their flags (they are run by hand); the GPU step benchmark
also runs its tiny CPU setting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_benchmark_script_starts(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.slow
def test_gpu_step_benchmark_runs_its_tiny_setting_on_cpu():
    """The GPU benchmark's code path (fp32 eager against bf16 + channels_last + compile, both networks,
    peak memory) runs end to end on CPU, so it is known to work before anyone takes it to a GPU node."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    command = [sys.executable, str(script), "--tiny"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    models = ("U-Net", "Sparse Attention U-Net")
    rows = [line for line in done.stdout.splitlines() if line.startswith(models)]
    assert len(rows) == 4 and all(re.search(r"\d\.\d\dx", row) for row in rows), done.stdout  # ratios


@pytest.mark.slow
def test_evaluation_cost_benchmark_runs_on_the_smoke_data():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation_cost.py"
    done = subprocess.run([sys.executable, str(script), "--profile", "smoke", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(re.findall(r"\d\.\d+x", done.stdout)) == 8, done.stdout  # references and ratios
