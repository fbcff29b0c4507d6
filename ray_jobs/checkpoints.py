"""Checkpoint files of a training run: weights, optimiser state and the metric history so far.

A checkpoint directory holds ``checkpoint.pt`` (plain tensors, dicts and numbers only, so
``torch.load(weights_only=True)`` reads it), ``history.json`` (every epoch's metrics up to it) and
``manifest.json`` (both files' sizes: a copy cut off mid-upload is then recognised as incomplete). The names
come from :mod:`mri_models.experiment`, which the analysis reads them by.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from mri_models import storage
from mri_models.experiment import (
    CHECKPOINT_FILE,
    CHECKPOINT_MANIFEST,
    HISTORY_FILE,
    IN_EPOCH_STEPS_KEY,
    RunLayout,
)
from mri_models.step_options import unwrap

logger = logging.getLogger(__name__)


def save_checkpoint(
    directory: str,
    model,
    optimizer,
    scheduler,
    epoch: int,
    history: list[dict],
    scaler=None,
    model_spec: dict[str, Any] | None = None,
    in_epoch: list[dict[str, Any]] | None = None,
) -> None:
    """Write the run's state after ``epoch`` (0-based) into ``directory``.

    ``in_epoch``: a checkpoint within the epoch after ``epoch`` (a preemption's), with every rank's
    :class:`ray_jobs.preemption.EpochProgress` state, in rank order; the manifest says so
    (``in_epoch_steps``), so the analysis never takes its weights for an epoch's.

    The weights are the bare network's (no DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix), so
    a checkpoint loads into an eager network whatever options trained it; an fp16 run's loss scale too.
    ``model_spec`` (``{"model": name, "hparams": {...}}``, :meth:`ray_jobs.config.TrainConfig.model_spec`)
    records which network the weights are for, its architecture options included.
    """
    state = {
        "model_spec": model_spec or {},
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
    }
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if in_epoch is not None:
        state["in_epoch"] = in_epoch
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(history, f)
    # Last: what makes the directory a complete checkpoint wherever it is copied to.
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in (CHECKPOINT_FILE, HISTORY_FILE)}
    manifest = {"files": sizes, **({IN_EPOCH_STEPS_KEY: in_epoch[0]["steps"]} if in_epoch else {})}
    with open(os.path.join(directory, CHECKPOINT_MANIFEST), "w") as f:
        json.dump(manifest, f)


def load_checkpoint(
    checkpoint, model, optimizer, scheduler, scaler=None
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Restore a run from a Ray Train checkpoint; returns the next epoch, the metric history so far and,
    for a checkpoint within that epoch, every rank's progress in it (None: the epoch starts afresh)."""
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            history = json.load(f)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, history, state.get("in_epoch")


def history_from_checkpoint(checkpoint) -> list[dict[str, Any]]:
    """The per-epoch metrics stored with a Ray Train checkpoint."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            return json.load(f)


# Ray Train's record of a run's reported checkpoints, in the run's directory. Ray writes it in place, not
# atomically: a full disk leaves it cut short, and Ray Train then refuses to start the run at all.
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
SET_ASIDE_DIR = "set_aside"


def recover_damaged_snapshot(run_dir: str) -> str | None:
    """Where Ray Train's checkpoint record of the run is damaged: move it aside and name the run's latest
    complete epoch checkpoint, for the workers to resume from (Ray Train then starts with no record).

    Returns:
        That checkpoint's directory; None where the record is whole or absent, or the run has no complete
        checkpoint (it then starts afresh).
    """
    snapshot = storage.join(run_dir, TRAIN_SNAPSHOT_FILE)
    data = storage.read_bytes(snapshot)
    if data is None:
        return None
    try:
        json.loads(data)
        return None
    except ValueError:
        pass
    storage.write_bytes(storage.join(run_dir, SET_ASIDE_DIR, TRAIN_SNAPSHOT_FILE), data)
    fs, path = storage.filesystem(snapshot)
    fs.delete_file(path)
    complete = sorted(RunLayout(run_dir).checkpoints())
    logger.warning(
        "Ray Train's record of the checkpoints of %s was damaged (moved to %s/): resuming from %s",
        run_dir, SET_ASIDE_DIR, complete[-1] if complete else "the start, as no checkpoint is complete",
    )  # fmt: skip
    return complete[-1] if complete else None
