"""The zero-filled baseline: the validation metrics of the networks' own input, computed once and cached.

Every result is judged against it: a network that does not beat the zero-filled image (the magnitude of
the inverse FFT of the masked k-space) has learned nothing worth reporting. It is evaluated exactly as
validation evaluates a network, on the same rows (same files, fixed per-volume masks, un-normalised input
against the un-normalised target) with the same volume metrics, so ``network - baseline`` is a like-for-like
gain; the result equals ``fastmri.evaluate`` on the zero-filled volumes (``tests/test_baseline.py``).

It depends only on the validation slices (and their files' contents) and the mask settings, so it is cached
under the cache directory by a key of those, and recorded in each run and experiment directory
(``baseline.json``) for the analysis.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from mri_models import storage
from mri_models.data.slice_dataset import default_cache_dir
from mri_models.metrics import VolumeMetricAccumulator, metric_table
from ray_jobs.config import TrainConfig
from ray_jobs.data import PreparedData, iter_rows_locally, val_read_tasks

MASK_KEYS = ("mask_type", "center_fractions", "accelerations")


def mask_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration values the zero-filled input depends on (besides the data)."""
    values = cfg.model_dump(mode="json")
    return {key: values[key] for key in MASK_KEYS}


def _cache_key(data: PreparedData, mask: dict[str, Any]) -> str:
    files = sorted({path for path, _ in data.val_slices})
    stats = [(path, entry.size, entry.mtime_ns) for path in files for entry in [storage.stat(path)]]
    # "volumes": the record holds per-volume rows since that version (older cached records lack them).
    text = json.dumps([sorted(data.val_slices), stats, mask, sorted(metric_table()), "volumes"])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def compute_zero_filled(data: PreparedData, cfg: TrainConfig) -> VolumeMetricAccumulator:
    """The zero-filled input's slices of the validation split, computed here (no Ray)."""
    accumulator = VolumeMetricAccumulator()
    # fastMRI's own operations, whatever transform the runs train with: the baseline is the reference line
    # of every table, and the fast transform's inputs differ from it only by float32 rounding.
    exact = cfg.model_copy(update={"transform": "exact"})
    for row in iter_rows_locally(
        val_read_tasks(data.val_slices, 0, 1, cfg.slices_per_read), exact, training=False
    ):
        # The network's input, un-normalised exactly as validation un-normalises a network's output.
        image = row["image"] * row["std"] + row["mean"]
        target = row["target"] * row["std"] + row["mean"]
        accumulator.add_slices([row["fname"]], [row["slice_num"]], [image], [target], [row["max_value"]])
    return accumulator


def zero_filled_baseline(data: PreparedData, cfg: TrainConfig) -> dict[str, Any]:
    """The baseline for the validation split and the mask settings of ``cfg``, from the cache if computed.

    Returns:
        ``{"metrics": {name: value, "num_volumes": n}, "mask": {...}, "val_slices": n, "volumes": [{"file":
        path, name: value, ...}, ...]}``: the means over volumes, and every volume's metrics.
    """
    mask = mask_settings(cfg)
    cache = default_cache_dir() / "baselines" / f"{_cache_key(data, mask)}.json"
    cached = storage.read_json(str(cache))
    if cached is not None:
        return cached
    slices = compute_zero_filled(data, cfg)
    volumes = [{"file": fname, **metrics} for fname, metrics in sorted(slices.per_volume().items())]
    baseline = {"metrics": slices.compute(), "mask": mask, "val_slices": len(data.val_slices)}
    baseline["volumes"] = volumes
    storage.write_json(str(cache), baseline)
    return baseline


def baselines_for(data: PreparedData, configs: Iterable[TrainConfig]) -> list[dict[str, Any]]:
    """One baseline per distinct mask setting among ``configs`` (a sweep may search the acceleration)."""
    by_mask: dict[str, TrainConfig] = {}
    for cfg in configs:
        by_mask.setdefault(json.dumps(mask_settings(cfg), sort_keys=True), cfg)
    return [zero_filled_baseline(data, cfg) for cfg in by_mask.values()]


def record_baselines(path: str, baselines: list[dict[str, Any]]) -> None:
    """Write the baselines to ``path``, a run's or experiment's ``baseline_file``."""
    storage.write_json(path, {"baselines": baselines})


def baseline_metrics(baselines: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any] | None:
    """The metrics of the baseline among ``baselines`` (as :func:`baselines_for` made them, or an
    experiment's ``baseline_file`` holds them) for the mask settings of ``cfg``; None if none matches."""
    return next((b["metrics"] for b in baselines if b["mask"] == mask_settings(cfg)), None)
