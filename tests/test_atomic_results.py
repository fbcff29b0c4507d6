"""Results and checkpoints interrupted mid-write are never read back, and a full disk is one line.

A checkpoint cut off mid-copy (a node lost while Ray uploaded it, a disk that filled) is a directory with
some of its files, or a file cut short. Such a directory must not count as a checkpoint: not for the
analysis's epochs, the final evaluation's choice, the export, or a resume; the last complete one stands.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
