"""The final evaluation: a finished run's selected checkpoint on the held-out test split, once.

The selected checkpoint is the one of the epoch with the best validation SSIM (validation makes every
choice; :mod:`ray_jobs.splits`). It is evaluated on every test volume under each of the configuration's
test settings (fastMRI's 4x / 0.08 and 8x / 0.04 by default), with fastMRI's fixed per-volume masks, and
the zero-filled input of the same volumes beside it. It is scored as ``fastmri.evaluate`` scores a
submission: against the target as stored. (Validation scores against the training transform's target,
clamped to 6 standard deviations of the input, as fastMRI's ``MriModule`` does; that clamp touches few
pixels, so the two differ slightly: ``docs/best_model.md``.) The volumes are dealt to ``num_workers`` Ray
tasks holding what one training worker holds (its GPU on GPU clusters). A run's evaluation is written once
(``test_evaluation.json`` and ``volumes/test.parquet`` in the run directory) and skipped when it is there
for the same selected epoch, so a resumed sweep evaluates what is missing and nothing twice.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import ray
import torch

from mri_models import experiment, storage
from mri_models.experiment import RunLayout
from mri_models.metrics import PRIMARY_METRIC, metric_table, primary_objective
from mri_models.models import build_model
from mri_models.plugins import load_plugins
from mri_models.reconstruct import (
    MaskSetting,
    read_volume,
    reconstruct_volume,
    volume_metrics,
    zero_filled_volume,
)
from ray_jobs.config import TrainConfig
from ray_jobs.data import PreparedData, data_cache, val_read_tasks

logger = logging.getLogger(__name__)

SELECTION_RULE = (
    f"checkpoint of the epoch with the best validation {PRIMARY_METRIC.upper()}; the test split is read only "
    "by this evaluation, after training"
)
NETWORK, ZERO_FILLED = "network", "zero_filled"
SCORED_AGAINST = "the stored target (reconstruction_esc), as fastmri.evaluate scores a submission"


@dataclass(frozen=True)
class SelectedCheckpoint:
    """The checkpoint a run is evaluated with, and why."""

    path: str
    epoch: int
    val_metric: float


def selected_checkpoint(run: RunLayout, last_epoch: int | None = None) -> SelectedCheckpoint | None:
    """The run's checkpoint of its best validation epoch up to ``last_epoch`` (None: no checkpoint, or it
    was not kept).

    ``last_epoch`` is the last epoch the scheduler saw: a trial ASHA stopped may have trained on until the
    stop reached it, and epochs beyond its budget are not its to choose from.
    """
    histories = {}
    for path in run.checkpoints():
        history = storage.read_json(storage.join(path, experiment.HISTORY_FILE))
        if history:
            histories[path] = history
    if not histories:
        return None
    full = max(histories.values(), key=len)  # the latest checkpoint holds every epoch so far
    sign = primary_objective().sign
    # Trained epochs only (epoch 0, the untrained network, has no checkpoint), with a finite metric.
    finite = [h for h in full if h["epoch"] >= 1 and h.get(PRIMARY_METRIC) == h.get(PRIMARY_METRIC)]
    finite = [h for h in finite if last_epoch is None or h["epoch"] <= last_epoch]
    if not finite:
        return None
    best = max(finite, key=lambda h: sign * h[PRIMARY_METRIC])
    for path, history in histories.items():
        if history[-1]["epoch"] == best["epoch"]:
            return SelectedCheckpoint(path, int(best["epoch"]), float(best[PRIMARY_METRIC]))
    return None  # the trainer keeps the best checkpoint; a run without it predates that


def _setting_label(setting: dict[str, Any]) -> dict[str, Any]:
    return {"acceleration": setting["accelerations"][0], "center_fraction": setting["center_fractions"][0]}


def load_network(cfg: TrainConfig, checkpoint: str, device: torch.device) -> torch.nn.Module:
    """The network of a run's checkpoint (a directory, local or a URI), in evaluation mode on ``device``."""
    load_plugins(cfg.plugins)  # a plugin architecture, in this task's process
    network = build_model(cfg.model, **cfg.model_hparams())
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(checkpoint, experiment.CHECKPOINT_FILE))),
        map_location="cpu",
        weights_only=True,
    )
    network.load_state_dict(state["model"])
    return network.to(device).eval()


def evaluate_volumes(
    cfg: TrainConfig, checkpoint: str, slices: Sequence[tuple[str, int]], use_gpu: bool
) -> list[dict[str, Any]]:
    """Per-volume metrics of the network and of its zero-filled input on ``slices`` (whole volumes), for
    every test setting of ``cfg``: one row per (source, setting, volume).

    Each volume is reconstructed as ``mri-reconstruct`` does (:mod:`mri_models.reconstruct`, one slice per
    forward pass) and scored against its stored target, as ``fastmri.evaluate`` scores a submission.
    """
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    network = load_network(cfg, checkpoint, device)
    settings = [
        (setting, MaskSetting(cfg.mask_type, setting["accelerations"][0], setting["center_fractions"][0]))
        for setting in cfg.test_settings()
    ]
    rows = []
    for path in sorted({path for path, _ in slices}):
        volume = read_volume(path, data_cache(cfg))  # remote test files: the node's cache, as training
        for setting, mask in settings:
            outputs = {
                NETWORK: reconstruct_volume(network, volume, mask, cfg.transform, device),
                ZERO_FILLED: zero_filled_volume(volume, mask, cfg.transform),
            }
            for source, values in outputs.items():
                metrics = volume_metrics(volume, values)
                rows.append({"source": source, **_setting_label(setting), "file": volume.fname, **metrics})
    return rows


def _shards(slices: Sequence[tuple[str, int]], count: int) -> list[list[tuple[str, int]]]:
    """Whole volumes dealt to ``count`` shards, as validation deals them to ranks."""
    shards = [
        [(task["path"], int(i)) for task in val_read_tasks(slices, rank, count, 1) for i in task["slices"]]
        for rank in range(count)
    ]
    return [shard for shard in shards if shard]


@dataclass(frozen=True)
class PendingRun:
    """A run to evaluate: its configuration, directory and selected checkpoint."""

    cfg: TrainConfig
    run: RunLayout
    selected: SelectedCheckpoint


def pending(
    cfg: TrainConfig, run: RunLayout, data: PreparedData, last_epoch: int | None = None
) -> PendingRun | None:
    """The run, when it has a test split, a selected checkpoint and no evaluation of that epoch yet."""
    if not data.test_slices or not cfg.test_settings():
        return None
    selected = selected_checkpoint(run, last_epoch)
    if selected is None:
        logger.warning("%s: no kept checkpoint of its best validation epoch; not evaluated", run.path)
        return None
    done = storage.read_json(run.test_evaluation_file)
    if done and done.get("selected_epoch") == selected.epoch:
        return None
    return PendingRun(cfg, run, selected)


def evaluate_runs(runs: Sequence[PendingRun], data: PreparedData, use_gpu: bool) -> None:
    """Evaluate every run on the test split at once (their shards share the cluster), then write each."""
    task = ray.remote(evaluate_volumes)
    submitted = []
    for item in runs:
        options = {"num_cpus": item.cfg.cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
        refs = [
            task.options(**options).remote(item.cfg, item.selected.path, shard, use_gpu)
            for shard in _shards(data.test_slices, item.cfg.num_workers)
        ]
        submitted.append((item, refs))
    for item, refs in submitted:
        record = write_evaluation(item, data, [row for shard in ray.get(refs) for row in shard])
        logger.info("%s: %s", item.run.path, format_evaluation(record))


def write_volume_rows(uri: str, rows: list[dict[str, Any]], data: PreparedData, split: str, epoch: int):
    """One Parquet file of per-volume rows (``source``, setting, ``file``, metrics), with the split, the
    epoch and each volume's patient, acquisition and slice count; returns the table."""
    table = pd.DataFrame(rows)
    for key in ("patient_id", "acquisition", "slices"):
        table[key] = [getattr(data.volumes.get(f), key, None) for f in table["file"]]
    table.insert(0, "split", split)
    table.insert(1, "epoch", epoch)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(uri, buffer.getvalue())
    return table


def validation_rows(per_volume: dict[str, dict[str, float]], cfg: TrainConfig) -> list[dict[str, Any]]:
    """A validation epoch's per-volume rows (its masks: the configuration's first setting)."""
    setting = {"accelerations": cfg.accelerations, "center_fractions": cfg.center_fractions}
    return [{"source": NETWORK, **_setting_label(setting), "file": f, **m} for f, m in per_volume.items()]


def write_evaluation(item: PendingRun, data: PreparedData, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``volumes/test.parquet`` (one row per source, setting and volume) and ``test_evaluation.json``;
    returns the latter's record."""
    table = write_volume_rows(item.run.test_volumes_file, rows, data, "test", item.selected.epoch)
    settings = []
    for (acceleration, fraction), group in table.groupby(["acceleration", "center_fraction"], sort=True):
        means = {
            source: {name: float(rows[name].mean()) for name in metric_table()} | {"volumes": len(rows)}
            for source, rows in group.groupby("source")
        }
        settings.append({"acceleration": int(acceleration), "center_fraction": float(fraction), **means})
    record = {
        "selected_epoch": item.selected.epoch,
        f"selected_val_{PRIMARY_METRIC}": item.selected.val_metric,
        "selection_rule": SELECTION_RULE,
        "scored_against": SCORED_AGAINST,
        "checkpoint": os.path.basename(item.selected.path.rstrip("/")),
        "test_source": data.test_source,
        "settings": settings,
    }
    storage.write_json(item.run.test_evaluation_file, record)  # last: its presence means done
    return record


def format_evaluation(record: dict[str, Any]) -> str:
    """A ``test_evaluation.json`` as lines for a terminal: each setting, network and zero-filled."""
    lines = [f"final evaluation on the test split ({record['test_source']}; {record['selection_rule']}):"]
    for setting in record["settings"]:
        values = ", ".join(
            f"{key.upper()} {format(setting[NETWORK][key], m.fmt)} (zero-filled "
            f"{format(setting[ZERO_FILLED][key], m.fmt)})"
            for key, m in metric_table().items()
        )
        lines.append(f"  {setting['acceleration']}x / {setting['center_fraction']:g}: {values}")
    return "\n".join(lines)
