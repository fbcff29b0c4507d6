"""The benchmark scripts still import and parse their flags (they are run by hand); the GPU check also runs
its tiny CPU setting."""

from __future__ import annotations

import json
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
def test_the_gpu_check_runs_its_tiny_setting_on_cpu(tmp_path):
    """The GPU check's code path (the step benchmark of both networks in three variants, the batched device
    transform against the read tasks', 1, 2 and 4 processes sharing the device) runs end to end on CPU and
    writes its JSON and tables, so it is known to work before anyone takes it to a GPU node."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    command = [sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--time-limit", "500"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {row["model"] for row in check["step"]} == {"U-Net", "Sparse Attention U-Net"}
    assert len(check["step"]) == 6 and not check["skipped"]
    assert check["transform"]["equal_within_tolerance"], check["transform"]
    assert [row["processes"] for row in check["packing"]] == [1, 2, 4]
    assert all(row["slices_per_second"] > 0 for row in check["packing"])
    tables = (tmp_path / "gpu_check.md").read_text()
    assert tables.count("\n## ") == 3 and len(re.findall(r"\d\.\d\dx", tables)) >= 12, tables  # ratios


@pytest.mark.slow
def test_evaluation_cost_benchmark_runs_on_the_smoke_data():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation_cost.py"
    done = subprocess.run([sys.executable, str(script), "--profile", "smoke", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(re.findall(r"\d\.\d+x", done.stdout)) == 8, done.stdout  # references and ratios
