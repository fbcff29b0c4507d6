"""Results and checkpoints interrupted mid-write are never read back, and a full disk is one line.

A checkpoint cut off mid-copy (a node lost while Ray uploaded it, a disk that filled) is a directory with
some of its files, or a file cut short. Such a directory must not count as a checkpoint: not for the
analysis's epochs, the final evaluation's choice, the export, or a resume; the last complete one stands.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from mri_models.experiment import (
    CHECKPOINT_FILE,
    CHECKPOINT_MANIFEST,
    HISTORY_FILE,
    RunLayout,
    is_complete_checkpoint,
)
from ray_jobs.checkpoints import save_checkpoint
from ray_jobs.final_evaluation import selected_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(directory: Path, epoch: int, ssim: float) -> Path:
    """A real checkpoint of a small network after ``epoch`` (0-based), its history ending with ``ssim``."""
    directory.mkdir(parents=True)
    model = torch.nn.Conv2d(1, 4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    history = [{"epoch": e, "ssim": ssim - 0.1 * (epoch + 1 - e)} for e in range(epoch + 2)]
    save_checkpoint(str(directory), model, optimizer, scheduler, epoch, history)
    return directory


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "cut",
    ["weights missing", "history missing", "weights cut short", "history cut short", "manifest only"],
)
def test_a_checkpoint_cut_off_mid_copy_is_not_one_and_the_last_complete_one_stands(tmp_path, cut):
    run = RunLayout(str(tmp_path / "run"))
    good = _checkpoint(tmp_path / "run" / "checkpoint_2026-12-07_10-00-00.000000", epoch=1, ssim=0.6)
    newer = _checkpoint(tmp_path / "run" / "checkpoint_2026-12-07_10-01-00.000000", epoch=2, ssim=0.7)
    manifest = json.loads((newer / CHECKPOINT_MANIFEST).read_text())
    assert manifest["files"].keys() == {CHECKPOINT_FILE, HISTORY_FILE}
    assert sorted(run.checkpoints()) == [str(good), str(newer)]
    if cut == "weights missing":
        (newer / CHECKPOINT_FILE).unlink()
    elif cut == "history missing":
        (newer / HISTORY_FILE).unlink()
    elif cut == "weights cut short":
        _cut_short(newer / CHECKPOINT_FILE)
    elif cut == "history cut short":
        _cut_short(newer / HISTORY_FILE)
    else:
        (newer / CHECKPOINT_FILE).unlink()
        (newer / HISTORY_FILE).unlink()
    assert not is_complete_checkpoint(str(newer))
    assert run.checkpoints() == [str(good)]
    selected = selected_checkpoint(run)
    assert selected is not None and selected.path == str(good) and selected.epoch == 2  # its best epoch


def test_a_checkpoint_written_before_manifests_counts_when_it_has_weights_and_history(tmp_path):
    old = _checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000", epoch=0, ssim=0.5)
    (old / CHECKPOINT_MANIFEST).unlink()
    assert is_complete_checkpoint(str(old))
    (old / HISTORY_FILE).unlink()
    assert not is_complete_checkpoint(str(old))
    shutil.rmtree(old)
    assert RunLayout(str(tmp_path / "run")).checkpoints() == []


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own (root only: the test is skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path) -> None:
    """Write to ``disk`` until it is full."""
    with (disk / "filler").open("wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


@pytest.mark.slow
def test_a_disk_filling_mid_run_is_one_line_and_the_last_checkpoint_survives(ray_head, tiny_root, small_disk):
    command = [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", str(tiny_root),
               "--storage", str(small_disk), "--name", "full", "--set", "epochs=6", "--set", "max_failures=0",
               "--set", "chans=4", "--set", "num_pool_layers=2", "--set", "cpus_per_worker=0.5"]  # fmt: skip
    log = small_disk.parent / "train.log"
    run = RunLayout(str(small_disk / "full"))
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=ray_head.env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while process.poll() is None and not run.checkpoints() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None and run.checkpoints(), log.read_text()[-3000:]
    _fill(small_disk)  # the disk is full from the next checkpoint on
    assert process.wait(timeout=300) == 1, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("run 'full' failed")]
    assert lines == [
        f"run 'full' failed: {run.path}: No space left on device (its last complete checkpoint is kept: make "
        "room, then run the same command to resume it)"
    ], log.read_text()[-3000:]
    survivors = run.checkpoints()
    assert survivors, "the last good checkpoint was lost"
    latest = Path(max(survivors))
    state = torch.load(latest / CHECKPOINT_FILE, weights_only=True)  # whole, not cut short
    history = json.loads((latest / HISTORY_FILE).read_text())
    assert history[-1]["epoch"] == state["epoch"] + 1 >= 1


@pytest.mark.slow
def test_a_disk_filling_mid_sweep_is_one_line_and_the_last_checkpoints_survive_then_it_resumes(
    ray_head, small_disk
):
    """The disk fills during the first trial's epochs, while Tune copies its experiment state: Tune's files
    and Ray Train's record of the run come out cut short. After room is made, ``--resume`` finishes the
    sweep with the same trials (ids), each epoch once, from the kept copy of Tune's state and the run's last
    complete checkpoint (without them Tune started a new experiment, and Ray Train refused the run)."""
    settings = ["seeds=[0]", "search.gamma=[0,1.0e-2]", "search.psi_norm=[instance]", "epochs=6",
                "max_failures=0", "image_every_epochs=0", "scheduler.type=fifo",
                "max_concurrent_trials=1"]  # fmt: skip
    command = [sys.executable, str(REPO / "sweeps" / "gamma_sweep.py"), "--profile", "smoke", "--storage",
               str(small_disk), "--name", "full", *(a for s in settings for a in ("--set", s))]  # fmt: skip
    log, experiment = small_disk.parent / "sweep.log", small_disk / "full"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=ray_head.env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    runs = lambda: [RunLayout(str(run)) for run in (experiment / "train_runs").glob("*")]  # noqa: E731
    while process.poll() is None and not any(r.checkpoints() for r in runs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()[-3000:]
    _fill(small_disk)
    assert process.wait(timeout=300) == 1, log.read_text()[-3000:]
    text = log.read_text()
    # The line names the experiment, or the file under it whose write the disk refused.
    lines = [line for line in text.splitlines() if line.startswith(f"sweep 'full' stopped: {experiment}")]
    assert len(lines) == 1, text[-3000:]
    assert ": No space left on device (" in lines[0] and lines[0].endswith(
        "last complete checkpoint is kept: make room, then run the same command with --resume)"
    ), lines[0]
    assert "Traceback" not in text.split("sweep 'full' stopped")[-1]
    runs = [run for run in runs() if run.checkpoints()]
    assert runs, "the last good checkpoint was lost"
    for run in runs:  # each kept checkpoint whole
        latest = Path(max(run.checkpoints()))
        assert torch.load(latest / CHECKPOINT_FILE, weights_only=True)["epoch"] >= 0
        assert json.loads((latest / HISTORY_FILE).read_text())
    trial_ids = {path.name for path in (experiment / "train_runs").iterdir()}

    (small_disk / "filler").unlink()
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=ray_head.env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_csv(experiment / "results" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials
    assert trial_ids <= set(trials["trial_id"]), (trial_ids, trials["trial_id"])  # the trials Tune had
    epochs = pd.read_csv(experiment / "results" / "epochs.csv")
    for trial_id, rows in epochs.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(7)), (trial_id, sorted(rows["epoch"]))
