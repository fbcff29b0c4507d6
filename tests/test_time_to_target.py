"""Time to target: when a trial's validation SSIM first reached ``target_ssim``, and stopping it there.

A smoke sweep of one trial runs its 4 epochs; a target between its epochs is read off its curve, and the
same sweep with that target and ``stop_at_target`` must end at the epoch that first reached it, with the
same SSIM curve up to there (the runs are deterministic), ``target_slices`` the training slices seen until
then and ``target_seconds`` the seconds its epochs took until then.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import time_to_target
from analysis.study import load_study
from ray_jobs.worker import with_time_to_target
from sweeps.sweep_command import sweep_main

REPO = Path(__file__).resolve().parents[1]
GAMMA_CONFIG = REPO / "sweeps" / "configs" / "gamma_sweep.yaml"
EPOCHS = 4


def _sweep(storage: Path, name: str, *overrides: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    settings = ["seeds=[0]", "search.gamma=[0]", "search.psi_norm=[instance]", f"epochs={EPOCHS}",
                "image_every_epochs=0", "scheduler.type=fifo", *overrides]  # fmt: skip
    argv = ["--profile", "smoke", "--storage", str(storage), "--name", name]
    assert sweep_main(GAMMA_CONFIG, argv + [arg for s in settings for arg in ("--set", s)]) == 0
    results = storage / name / "results"
    return pd.read_csv(results / "trials.csv"), pd.read_csv(results / "epochs.csv").sort_values("epoch")


@pytest.mark.slow
def test_a_trial_stops_at_the_epoch_it_first_reaches_its_target(ray_head, tmp_path):
    trials, epochs = _sweep(tmp_path, "full")
    assert trials["target_epoch"].isna().all()  # no target, nothing timed
    ssim = epochs.set_index("epoch")["ssim"]
    # The best trained epoch before the last: a target the curve reaches before its end.
    target = float(ssim.loc[1 : EPOCHS - 1].max())
    first = int(ssim[ssim >= target].index.min())

    stopped_trials, stopped = _sweep(tmp_path, "to_target", f"target_ssim={target!r}", "stop_at_target=true")
    trial = stopped_trials.iloc[0]
    assert trial["target_epoch"] == first and trial["epochs_run"] == max(first, 1)
    assert trial["status"] == ("reached_target" if first < EPOCHS else "completed")
    assert list(stopped["epoch"]) == list(range(max(first, 1) + 1))  # no epoch after the one that reached it
    pd.testing.assert_series_equal(stopped.set_index("epoch")["ssim"], ssim.loc[: max(first, 1)])
    until = stopped[stopped["epoch"] <= first]
    assert trial["target_slices"] == until["train_slices"].fillna(0).sum()
    assert math.isclose(trial["target_seconds"], until["epoch_seconds"].sum(), rel_tol=1e-9)
    reached = stopped["epoch"] >= first  # every report from then on carries when it was reached
    assert stopped[~reached]["target_epoch"].isna().all()
    assert (stopped[reached]["target_epoch"] == first).all()

    study = load_study([str(tmp_path / "to_target")])
    table = time_to_target.table(study)
    assert len(table) == 1 and table.iloc[0]["reached"] == 1 and table.iloc[0]["seeds"] == 1
    assert table.iloc[0]["target_epoch_mean"] == first and table.iloc[0]["target_ssim"] == target
    assert time_to_target.table(load_study([str(tmp_path / "full")])).empty  # no target, no table


def test_the_time_to_target_counts_from_the_start_of_the_run():
    history = [
        {"epoch": 0, "ssim": 0.30, "train_slices": 0, "epoch_seconds": 1.0},  # the untrained network
        {"epoch": 1, "ssim": 0.50, "train_slices": 16, "epoch_seconds": 2.0},
        {"epoch": 2, "ssim": math.nan, "train_slices": 16, "epoch_seconds": 2.0},  # never "reached"
    ]

    def timed(ssim: float, target: float | None) -> tuple[float, float, float]:
        report = with_time_to_target(
            {"epoch": 3, "ssim": ssim, "train_slices": 16, "epoch_seconds": 2.5}, history, target
        )
        return report["target_epoch"], report["target_slices"], report["target_seconds"]

    assert timed(0.60, 0.55) == (3, 48, 7.5)  # this report: 3 epochs of 16 slices, 1 + 2 + 2 + 2.5 s
    assert timed(0.60, 0.50) == (1, 16, 3.0)  # reached before: when it first was
    assert all(math.isnan(v) for v in timed(0.54, 0.55))  # not yet
    assert all(math.isnan(v) for v in timed(0.60, None))  # no target
