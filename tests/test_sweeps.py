"""Sweeps end to end on a real Ray head: job submission, ASHA, a killed driver and --resume, bad configs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from analysis.collect import write_tables
from mri_models.experiment import ASHA_STATE_FILE, HISTORY_FILE, ExperimentLayout
from mri_models.models import INSTANCE_NORM_FLOOR
from ray_jobs.images import image_epochs
from sweeps.sweep_command import sweep_main

REPO = Path(__file__).resolve().parents[1]
GAMMA_SWEEP = REPO / "sweeps" / "gamma_sweep.py"
GAMMA_CONFIG = REPO / "sweeps" / "configs" / "gamma_sweep.yaml"


def _trials(experiment: Path) -> pd.DataFrame:
    return pd.read_csv(experiment / "results" / "trials.csv")


def _check_decisions(experiment: Path, rungs: dict[int, float], max_t: int) -> pd.DataFrame:
    """``results/decisions.csv`` against the trials: one decision per trial and rung it reached (``rungs``:
    epoch -> milestone) and one at the budget for those that reached it; every stop at the trial's last
    epoch, below the rung's cut-off; every continue at or above it."""
    trials = _trials(experiment).set_index("trial_id")
    decisions = pd.read_csv(experiment / "results" / "decisions.csv")
    stopped = ExperimentLayout(str(experiment)).stopped_trials()
    at_rungs = decisions[decisions["decision"] != "complete"]
    assert not at_rungs.duplicated(["trial_id", "rung"]).any(), at_rungs
    assert set(decisions["trial_id"]) == set(trials.index)
    for trial_id, trial in trials.iterrows():
        rows = at_rungs[at_rungs["trial_id"] == trial_id]
        assert list(rows["rung"]) == [m for epoch, m in rungs.items() if epoch <= trial["epochs_run"]], rows
        complete = decisions[(decisions["trial_id"] == trial_id) & (decisions["decision"] == "complete")]
        assert len(complete) == int(trial["epochs_run"] == max_t)
        stops = rows[rows["decision"] == "stop"]
        assert (trial_id in stopped) == (not stops.empty)
        assert stops.empty or stops["epoch"].max() == trial["epochs_run"]
    stops, continues = (at_rungs[at_rungs["decision"] == d] for d in ("stop", "continue"))
    assert (stops["value"] < stops["cutoff"]).all(), stops
    assert (continues["cutoff"].isna() | (continues["value"] >= continues["cutoff"])).all(), continues
    return decisions


@pytest.mark.slow
def test_smoke_gamma_sweep_submitted_as_a_job(ray_head, tmp_path):
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "sweeps/gamma_sweep.py",
        "--profile",
        "smoke",
        "--storage",
        str(tmp_path),
        "--name",
        "job",
        # One slice per step: 32 steps in the smoke profile's 2 epochs, enough for Oktay's gate to move.
        "--set",
        "batch_size=1",
        # One seed: every gamma and gate once (the seeds are the analysis's, tested on its own tables).
        "--set",
        "seeds=[0]",
    ]
    done = subprocess.run(command, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    # Clean job log: no deprecation warning from our calls, each progress line once, none merged away.
    log = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # without the terminal colours
    assert "deprecated" not in log.lower()
    progress = re.findall(r"\(RayTrainWorker pid=\d+\) epoch \d+/2 .*", log)
    assert progress and len(progress) == len(set(progress)), progress
    assert "repeated" not in log
    trials = _trials(tmp_path / "job")
    assert len(trials) == 4  # 2 gammas x 2 gates (psi_norm, the gate's own hyper-parameter)
    assert set(trials["status"]) <= {"completed", "stopped"}
    assert (trials["status"] == "stopped").any(), "ASHA stopped no trial"
    assert set(trials.loc[trials["status"] == "completed", "epochs_run"]) == {2}
    assert set(trials.loc[trials["status"] == "stopped", "epochs_run"]) == {1}
    # Every decision on record, with the trial's searched values; a stop ends the trial at its rung: its
    # workers waited for the decision, so no checkpoint holds an epoch after it.
    decisions = _check_decisions(tmp_path / "job", {1: 1.0}, max_t=2)
    assert {"gamma", "psi_norm", "seed", "cutoff"} <= set(decisions.columns)
    stopped = trials[trials["status"] == "stopped"]
    assert (stopped["epochs_after_stop"] == 0).all()
    assert trials.loc[trials["status"] == "completed", "epochs_after_stop"].isna().all()
    for trial_id in stopped["trial_id"]:
        run = ExperimentLayout(str(tmp_path / "job")).train_run(trial_id)
        latest = sorted(run.checkpoints())[-1]
        history = json.loads((Path(latest) / HISTORY_FILE).read_text())
        assert [entry["epoch"] for entry in history] == [0, 1]
    epochs = pd.read_csv(tmp_path / "job" / "results" / "epochs.csv")
    assert len(epochs) == trials["epochs_run"].sum() + len(trials)  # and epoch 0, the untrained network
    # The penalty switches Oktay's gate off, far below what the paper's gate can reach at all; the paper's
    # gate stays at or above its floor whatever gamma is.
    last = epochs.sort_values("epoch").groupby("trial_id").tail(1)
    oktay = last[(last["psi_norm"] == "none") & (last["gamma"] > 0)]
    assert len(oktay) == 1 and (oktay["alpha_mean"] < INSTANCE_NORM_FLOOR - 0.05).all(), oktay["alpha_mean"]
    assert (epochs.loc[epochs["psi_norm"] == "instance", "alpha_mean"] >= INSTANCE_NORM_FLOOR).all()
    # The final evaluation: every trial on the test split at 4x and 8x, one row per volume and setting.
    assert trials[["test_ssim_4x", "test_ssim_8x", "zero_filled_test_ssim_4x"]].notna().all().all()
    volumes = pd.read_parquet(tmp_path / "job" / "results" / "volumes.parquet")
    test = volumes[(volumes["split"] == "test") & (volumes["source"] == "network")]
    assert len(test) == 4 * 2 * 2  # trials x settings x the smoke data's test volumes
    trial_dirs = sorted((tmp_path / "job").glob("trial_*"))
    assert len(trial_dirs) == 4
    epochs_run = dict(zip(trials["trial_id"], trials["epochs_run"], strict=True))
    for trial_dir in trial_dirs:
        reported = list(range(epochs_run["_".join(trial_dir.name.split("_")[1:3])] + 1))  # from epoch 0
        assert list(trial_dir.glob("events.out.tfevents.*")), f"no TensorBoard scalars in {trial_dir.name}"
        # Rank 0's validation images, a TensorBoard run of their own beside the trial's scalars.
        images = EventAccumulator(str(trial_dir / "images"), size_guidance={"images": 0})
        images.Reload()
        assert {"reconstruction", "attention/level_1", "attention/level_2"} <= set(images.Tags()["images"])
        steps = [event.step for event in images.Images("reconstruction")]
        expected = image_epochs(1, 2)
        assert steps == expected[: len(steps)] and len(steps) >= 1  # stopped trials write fewer
        histograms = EventAccumulator(str(trial_dir / "images"), size_guidance={"histograms": 0})
        histograms.Reload()
        steps = [event.step for event in histograms.Histograms("alpha/level_1")]
        # Every reported epoch from 0, and no other: a stopped trial's workers end at the rung.
        assert steps == reported
        # Tune's scalars step by epoch, from 0, in line with the images and histograms.
        scalars = EventAccumulator(str(trial_dir))
        scalars.Reload()
        assert [event.step for event in scalars.Scalars("ray/tune/ssim")] == reported
    # Directory (and TensorBoard run) names carry the exact grid values, never a rounded 0.0000.
    assert {d.name.split("_", 3)[3].rsplit(",", 1)[0] for d in trial_dirs} == {
        "gamma=0,psi_norm=instance",
        "gamma=0,psi_norm=none",
        "gamma=0.01,psi_norm=instance",
        "gamma=0.01,psi_norm=none",
    }

    # The analysis runs on the real sweep output without Ray and links every figure it made.
    out = tmp_path / "out"
    command = [sys.executable, "-m", "analysis", "--experiment", str(tmp_path / "job"), "--out", str(out)]
    analysis = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert {"gamma_curves.png", "mpand_curves.png", "sweep_parallel.png", "learning_curves.png"} <= set(pngs)
    assert all(name in report for name in pngs)
    # The sweep overview lists the stops: trial, its values, rung, SSIM and the cut-off it fell below.
    overview = pd.read_csv(out / "sweep_decisions.csv")
    assert len(overview) == len(decisions) and f"stopped {len(stopped)} trial(s)" in report
    assert all(trial_id in report for trial_id in stopped["trial_id"])


@pytest.mark.slow
def test_asha_state_survives_a_killed_driver(ray_head, tmp_path):
    driver_script = Path(__file__).with_name("asha_driver.py")

    def run(mode: str, experiment: Path, kill_after_records: int | None = None) -> list[dict] | None:
        process = subprocess.Popen(
            [sys.executable, str(driver_script), mode, str(experiment)],
            env=ray_head.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if kill_after_records is None:
            assert process.wait(timeout=600) == 0
            return None
        state = experiment / ASHA_STATE_FILE
        while process.poll() is None:
            if state.exists():
                recorded = json.loads(state.read_text())["brackets"][0][-1]["recorded"]  # the first rung
                if len(recorded) >= kill_after_records:
                    break
            time.sleep(0.05)
        assert process.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return json.loads(state.read_text())["decisions"]

    def stopped_x(experiment: Path) -> set[int]:
        stopped = set(json.loads((experiment / ASHA_STATE_FILE).read_text())["stopped_trials"])
        xs = set()
        for params in experiment.glob("*/params.json"):
            trial_id = params.parent.name.split("_")[1] + "_" + params.parent.name.split("_")[2]
            if trial_id in stopped:
                xs.add(json.loads(params.read_text())["x"])
        return xs

    def decisions_by_x(experiment: Path) -> list[tuple]:
        xs = {}
        for params in experiment.glob("*/params.json"):
            xs["_".join(params.parent.name.split("_")[1:3])] = json.loads(params.read_text())["x"]
        table = pd.read_csv(experiment / "results" / "decisions.csv")
        return [(xs[row.trial_id], row.rung, row.decision) for row in table.itertuples()]

    run("run", tmp_path / "straight")
    straight = stopped_x(tmp_path / "straight")
    # Every trial is worse than all before it, so ASHA stops each one after the first at its first rung.
    assert straight == {1, 2, 3, 4, 5, 6, 7}
    # Each decision on record: the first trial continues at rungs 1 and 2 and completes at the budget.
    write_tables(str(tmp_path / "straight"))
    _check_decisions(tmp_path / "straight", {1: 1.0, 2: 2.0}, max_t=4)
    first = [(0, 1.0, "continue"), (0, 2.0, "continue"), (0, 4.0, "complete")]
    assert decisions_by_x(tmp_path / "straight") == [*first, *((x, 1.0, "stop") for x in range(1, 8))]

    before_kill = run("run", tmp_path / "interrupted", kill_after_records=4)
    run("resume", tmp_path / "interrupted")
    assert stopped_x(tmp_path / "interrupted") == straight
    # The resumed sweep keeps the decisions made before the kill, and makes none of them twice.
    after = json.loads((tmp_path / "interrupted" / ASHA_STATE_FILE).read_text())["decisions"]
    assert after[: len(before_kill)] == before_kill and len(before_kill) >= 4
    keys = [(d["trial_id"], d["rung"]) for d in after]
    assert len(keys) == len(set(keys))
    assert all(d["value"] < d["cutoff"] for d in after if d["decision"] == "stop")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--set", "learning_rate=1e-3"], "learning_rate: Extra inputs are not permitted"),
        (["--set", "search.gamma=[]"], "empty grid for gamma"),
        (["--set", "search.gamma=[0.0, -1.0]"], "gamma: Input should be greater than or equal to 0"),
        (["--set", "seeds=[]"], "empty grid for seeds"),
        (["--set", "search.drop_prob=[1.0]"], "drop_prob: Input should be less than 1"),
        (["--set", "scheduler.kind=hyperband"], "scheduler.kind: Extra inputs are not permitted"),
    ],
)
def test_bad_sweep_configs_fail_before_any_trial(tmp_path, capsys, overrides, message):
    code = sweep_main(GAMMA_CONFIG, ["--profile", "smoke", "--storage", str(tmp_path), *overrides])
    assert code == 2
    assert message in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "a bad config must not create the experiment"


@pytest.mark.slow
def test_more_workers_per_trial_than_the_cluster_fails_before_any_trial(ray_head, tmp_path, capsys):
    code = sweep_main(
        GAMMA_CONFIG, ["--profile", "smoke", "--storage", str(tmp_path), "--workers-per-trial", "4"]
    )
    assert code == 2
    assert "needs 2.35 CPUs but the cluster has 2" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_trial_directory_names_keep_small_gammas_distinct():
    from types import SimpleNamespace

    from ray_jobs.tune import trial_dirname

    names = {
        trial_dirname(SimpleNamespace(trial_id="a1b2c_00001", evaluated_params={"gamma": gamma, "seed": 0}))
        for gamma in (0.0, 1e-6, 2e-6, 1e-5)
    }
    assert names == {f"trial_a1b2c_00001_gamma={g},seed=0" for g in ("0", "1e-06", "2e-06", "1e-05")}


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"; a grid of [0, "1e-4"] then reached Tune and the
    # result tables (a column of mixed types that Parquet refuses). Both --set and sweep files use YAML 1.2.
    from ray_jobs.cli import parse_overrides
    from ray_jobs.sweep_config import load_sweep

    overrides = parse_overrides(["search.gamma=[0,1e-4]", "lr=3e-3"])
    assert overrides == {"search.gamma": [0, 1e-4], "lr": 3e-3}
    spec = load_sweep(GAMMA_CONFIG, "smoke", overrides).spec
    assert spec.search["gamma"] == [0, 1e-4]
    assert all(isinstance(g, (int, float)) for g in spec.search["gamma"])
    config = tmp_path / "sweep.yaml"
    config.write_text("experiment: e\ntrain: {model: sparse_attention_unet}\nsearch: {gamma: [0, 2e-6]}\n")
    assert load_sweep(config, "smoke").spec.search["gamma"] == [0, 2e-6]
