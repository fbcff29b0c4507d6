"""Checkpoint files of a training run: weights, optimiser state and the metric history so far.

A checkpoint directory holds ``checkpoint.pt`` (plain tensors, dicts and numbers only, so
``torch.load(weights_only=True)`` reads it), ``history.json`` (every epoch's metrics up to it) and
``manifest.json`` (both files' sizes: a copy cut off mid-upload is then recognised as incomplete). The names
come from :mod:`mri_models.experiment`, which the analysis reads them by.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from mri_models.experiment import CHECKPOINT_FILE, CHECKPOINT_MANIFEST, HISTORY_FILE, IN_EPOCH_STEPS_KEY
from mri_models.step_options import unwrap


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
