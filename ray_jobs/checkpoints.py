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

from mri_models.experiment import CHECKPOINT_FILE, CHECKPOINT_MANIFEST, HISTORY_FILE
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
) -> None:
    """Write the run's state after ``epoch`` (0-based) into ``directory``.

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
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(history, f)
    # Last: what makes the directory a complete checkpoint wherever it is copied to.
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in (CHECKPOINT_FILE, HISTORY_FILE)}
    with open(os.path.join(directory, CHECKPOINT_MANIFEST), "w") as f:
        json.dump({"files": sizes}, f)


def load_checkpoint(checkpoint, model, optimizer, scheduler, scaler=None) -> tuple[int, list[dict[str, Any]]]:
    """Restore a run from a Ray Train checkpoint; returns the next epoch and the metric history so far."""
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            history = json.load(f)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, history


def history_from_checkpoint(checkpoint) -> list[dict[str, Any]]:
    """The per-epoch metrics stored with a Ray Train checkpoint."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            return json.load(f)
