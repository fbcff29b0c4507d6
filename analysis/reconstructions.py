"""Validation reconstructions of the best checkpoint of each architecture (or gamma), side by side.

Per arm, the trial with the highest best SSIM whose checkpoints can be read; among its kept checkpoints
(``train_runs/<trial_id>/checkpoint_*``: the best by SSIM and the latest) the one whose ``history.json``
ends with the highest SSIM. The network is rebuilt from the trial's configuration (model, chans,
num_pool_layers) and the weights loaded with ``torch.load(weights_only=True)``. The same validation slices
(the middle slice of the first volumes, under the fixed per-volume validation mask) are shown as the
zero-filled input, each reconstruction, the target, the absolute error maps and the attention maps of every
up-sampling level. A missing data root or checkpoint is reported and skipped.

Run ``python -m analysis.reconstructions --experiment PATH [--out DIR]``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from analysis.cli import run_step
from analysis.output import Artifact, OutDir, StepResult, slug
from analysis.study import Study
from mri_models import storage
from mri_models.arms import model_options
from mri_models.data import SliceDataset, UnetDataTransform, create_mask_func, store
from mri_models.experiment import CHECKPOINT_FILE, HISTORY_FILE, ExperimentLayout
from mri_models.metrics import PRIMARY_METRIC, VolumeMetricAccumulator, metric_table, slice_metrics
from mri_models.models import build_model

NUM_SLICES = 2


@dataclass
class LoadedModel:
    """A trained network and where it came from."""

    arm: str
    experiment: str
    trial_id: str
    checkpoint: str
    epoch: int
    score: float  # the primary metric (SSIM) of the checkpoint's last validation
    network: Any
    config: dict[str, Any]


def choose_checkpoint(experiment_path: str, trial_id: str) -> tuple[str, list[dict]] | None:
    """The trial's checkpoint directory (as a path or URI) whose history ends with the best primary metric,
    and that history; None when the trial kept no readable checkpoint."""
    sign = 1.0 if metric_table()[PRIMARY_METRIC].higher_is_better else -1.0
    best: tuple[float, str, list[dict]] | None = None
    for checkpoint in ExperimentLayout(experiment_path).train_run(trial_id).checkpoints():
        try:
            history = storage.read_json(storage.join(checkpoint, HISTORY_FILE)) or []
        except ValueError:  # a half-written history
            continue
        if not history or not storage.exists(storage.join(checkpoint, CHECKPOINT_FILE)):
            continue
        value = history[-1].get(PRIMARY_METRIC)
        score = sign * float(value) if isinstance(value, (int, float)) and np.isfinite(value) else -np.inf
        if best is None or score > best[0]:
            best = (score, checkpoint, history)
    return None if best is None else (best[1], best[2])


def load_network(path: str, config: dict[str, Any]):
    """Rebuild the trial's network and load a checkpoint's weights (weights only: plain tensors)."""
    data = storage.read_bytes(storage.join(path, CHECKPOINT_FILE))
    if data is None:
        raise FileNotFoundError(f"{path}: no {CHECKPOINT_FILE}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    spec = state.get("model_spec") or {}  # the network the weights are for (recorded since psi_norm)
    model = spec.get("model") or config.get("model", "unet")
    hparams = spec.get("hparams") or {
        **{k: config[k] for k in ("chans", "num_pool_layers", "drop_prob") if k in config},
        **model_options(model, config),
    }
    network = build_model(model, **hparams)
    network.load_state_dict(state["model"])
    network.eval()
    return network, int(state.get("epoch", -1)) + 1


def best_models(study: Study, problems: list[str]) -> list[LoadedModel]:
    """Per arm, the best trial's best checkpoint; falls back to the next trial when one cannot be read."""
    trials = study.included_trials()
    models = []
    for arm in study.arms():
        candidates = trials[trials["arm"] == arm].sort_values(
            f"best_{PRIMARY_METRIC}",
            ascending=not metric_table()[PRIMARY_METRIC].higher_is_better,
            na_position="last",
        )
        for _, trial in candidates.iterrows():
            info = study.experiment(trial["experiment"])
            chosen = choose_checkpoint(info.path, trial["trial_id"])
            if chosen is None:
                problems.append(
                    f"reconstructions: no readable checkpoint for trial {trial['trial_id']} ({arm})"
                )
                continue
            path, history = chosen
            config = study.configs.get((trial["experiment"], trial["trial_id"]), {})
            try:
                network, epoch = load_network(path, config)
            except Exception as err:  # a corrupt file or a configuration that does not match the weights
                problems.append(f"reconstructions: cannot load {path}: {type(err).__name__}: {err}")
                continue
            score = float(history[-1].get(PRIMARY_METRIC, np.nan))
            models.append(
                LoadedModel(arm, trial["experiment"], trial["trial_id"], path, epoch, score, network, config)
            )
            break
        else:
            if len(candidates):
                problems.append(f"reconstructions: no usable checkpoint for {arm}; it is left out")
    return models


def find_val_dir(study: Study, problems: list[str]) -> str | None:
    """The validation split of the first experiment whose data root this machine can read: a local path,
    or a URI in object storage (``s3://...``, read with the AWS variables of this shell)."""
    for info in study.experiments:
        root = info.data_root
        if not root:
            problems.append(f"reconstructions: {info.name} records no data_root in sweep.json")
            continue
        val = storage.join(root, "singlecoil_val")
        try:
            if store.volume_files(val):
                return val
            problems.append(f"reconstructions: data root {root} of {info.name} holds no singlecoil_val/*.h5")
        except storage.StorageError as err:
            problems.append(f"reconstructions: data root {root} of {info.name} cannot be read here: {err}")
    return None


def validation_samples(val_dir: str, config: dict[str, Any], count: int = NUM_SLICES) -> list:
    """The middle slice of the first ``count`` volumes, transformed exactly as validation does."""
    mask = create_mask_func(
        config.get("mask_type", "random"),
        config.get("center_fractions", (0.08,)),
        config.get("accelerations", (4,)),
    )
    # use_seed: the fixed per-volume validation mask; cache_dir "": never write next to someone's data.
    dataset = SliceDataset(val_dir, transform=UnetDataTransform(mask_func=mask, use_seed=True), cache_dir="")
    by_volume: dict[str, list[int]] = {}
    for index, raw in enumerate(dataset.raw_samples):
        by_volume.setdefault(os.path.basename(str(raw.fname)), []).append(index)  # a Path or a URI
    chosen = [indices[len(indices) // 2] for _, indices in sorted(by_volume.items())][:count]
    return [dataset[i] for i in chosen]


def reconstruct(model: LoadedModel, sample) -> dict[str, Any]:
    """Un-normalised reconstruction and attention maps (decoder order, deepest first) of one slice."""
    with torch.no_grad():
        result = model.network(sample.image[None, None].float(), return_attention=True)
    output = result.output[0, 0] * sample.std + sample.mean
    maps = [m[0, 0].numpy() for m in result.attention_maps]
    return {"output": output.numpy(), "maps": maps}


def slice_scores(target: np.ndarray, image: np.ndarray, max_value: float) -> dict[str, float]:
    """Every metric of the table for one slice, as a one-slice volume."""
    gt, pred = target.astype(np.float64), image.astype(np.float64)
    maxval = max_value or float(target.max())
    accumulator = VolumeMetricAccumulator()
    accumulator.add("slice", 0, slice_metrics(pred, gt, maxval), maxval)
    scores = accumulator.compute()
    return {name: scores[name] for name in metric_table()}


def score_text(scores: dict[str, float]) -> str:
    """``SSIM 0.712, PSNR 31.2``: the primary metric first, then the others that rise with quality."""
    table = metric_table()
    names = [PRIMARY_METRIC, *(n for n, m in table.items() if m.higher_is_better and n != PRIMARY_METRIC)]
    return ", ".join(f"{table[n].label.split(' (')[0]} {format(scores[n], table[n].fmt)}" for n in names)


def plot_slice(sample, models: list[LoadedModel], outputs: list[dict], rows_out: list[dict]) -> plt.Figure:
    """Row 0: zero-filled input, its error, target; one row per arm: reconstruction, error, attention maps.

    Column 1 always holds error maps, on one colour scale, so the rows compare directly. Each row's scores
    are appended to ``rows_out``.
    """
    target = (sample.target * sample.std + sample.mean).numpy()
    zero_filled = (sample.image * sample.std + sample.mean).numpy()
    figure, axes = _slice_grid(1 + len(models), max([len(o["maps"]) for o in outputs] + [1]))
    vmin, vmax = float(np.percentile(target, 0.5)), float(np.percentile(target, 99.5))
    errors = [np.abs(zero_filled - target)] + [np.abs(o["output"] - target) for o in outputs]
    error_max = max(float(np.percentile(e, 99.5)) for e in errors) or 1.0
    grey = {"cmap": "gray", "vmin": vmin, "vmax": vmax}
    heat = {"cmap": "inferno", "vmin": 0, "vmax": error_max}
    scores = slice_scores(target, zero_filled, sample.max_value)
    rows_out.append({"arm": "zero-filled input", **scores})
    _show(axes[0, 0], zero_filled, f"zero-filled input\n{score_text(scores)}", **grey)
    error_handle = _show(axes[0, 1], errors[0], "|zero-filled − target|", **heat)
    _show(axes[0, 2], target, "target", **grey)
    attention_handle = None
    for row, (model, output) in enumerate(zip(models, outputs, strict=True), start=1):
        scores = slice_scores(target, output["output"], sample.max_value)
        rows_out.append(
            {"arm": model.arm, "trial_id": model.trial_id, "checkpoint_epoch": model.epoch, **scores}
        )
        _show(axes[row, 0], output["output"], f"{model.arm}\n{score_text(scores)}", **grey)
        _show(axes[row, 1], errors[row], "|reconstruction − target|", **heat)
        handle = _show_attention(axes[row, 2:], output["maps"])
        attention_handle = handle if handle is not None else attention_handle
    figure.colorbar(error_handle, ax=axes[:, 1].tolist(), shrink=0.5, label="absolute error")
    if attention_handle is not None:
        figure.colorbar(
            attention_handle, ax=axes[1:, -1].tolist(), shrink=0.6, label="attention coefficient α"
        )
    figure.suptitle(f"{sample.fname}, slice {sample.slice_num}: best checkpoint of each architecture")
    return figure


def _slice_grid(rows: int, levels: int) -> tuple[plt.Figure, np.ndarray]:
    """A figure of ``rows`` rows: image, error and one column per attention level; no axes drawn."""
    columns = 2 + levels
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(2.5 * columns + 1.2, 2.6 * rows),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.axis("off")
    return figure, axes


def _show(ax: plt.Axes, image: np.ndarray, title: str, **kwargs: Any):
    handle = ax.imshow(image, **kwargs)
    ax.set_title(title, fontsize=8)
    return handle


def _show_attention(axes: np.ndarray, maps: list[np.ndarray]):
    """An arm's attention maps, deepest level first, or a note that it has none; returns the last image."""
    if not maps:
        axes[0].text(0.5, 0.5, "no attention gates\n(U-Net)", ha="center", va="center", fontsize=9)
    handle = None
    for level, alpha in enumerate(maps):
        label = f"attention level {level + 1}" + (" (deepest)" if level == 0 else "")
        title = f"{label}, {alpha.shape[0]}×{alpha.shape[1]}"
        handle = _show(axes[level], alpha, title, cmap="magma", vmin=0, vmax=1)
    return handle


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``reconstructions_<volume>_<slice>.png`` and ``reconstructions.csv``."""
    result = StepResult("Reconstructions")
    if study.trials.empty:
        result.problems.append("reconstructions: no trials")
        return result
    val_dir = find_val_dir(study, result.problems)
    if val_dir is None:
        result.problems.append("reconstructions: no validation data available; reconstructions skipped")
        return result
    models = best_models(study, result.problems)
    if not models:
        result.problems.append("reconstructions: no checkpoint could be loaded; reconstructions skipped")
        return result
    try:
        samples = validation_samples(val_dir, models[0].config)
    except Exception as err:  # unreadable or invalid data files
        result.problems.append(f"reconstructions: cannot read validation data in {val_dir}: {err}")
        return result
    rows: list[dict] = []
    for sample in samples:
        slice_rows: list[dict] = []
        try:
            outputs = [reconstruct(model, sample) for model in models]
        except Exception as err:  # e.g. an image size the network's pooling depth cannot take
            result.problems.append(f"reconstructions: {sample.fname} slice {sample.slice_num}: {err}")
            continue
        name = f"reconstructions_{slug(Path(sample.fname).stem)}_{sample.slice_num}.png"
        out.save_figure(plot_slice(sample, models, outputs, slice_rows), name)
        rows += [{"file": sample.fname, "slice": sample.slice_num, **row} for row in slice_rows]
        result.artifacts.append(
            Artifact(
                name,
                f"Validation slice {sample.slice_num} of {sample.fname}: zero-filled input, target, each "
                "architecture's reconstruction from its best checkpoint with its absolute error map, and the "
                "attention maps of every up-sampling level.",
            )
        )
    if rows:
        sources = pd.DataFrame(
            [
                {"arm": m.arm, "experiment": m.experiment, "trial_id": m.trial_id, "checkpoint": m.checkpoint,
                 "checkpoint_epoch": m.epoch, f"checkpoint_val_{PRIMARY_METRIC}": m.score}
                for m in models
            ]
        )  # fmt: skip
        table = pd.DataFrame(rows).merge(
            sources.drop(columns="checkpoint_epoch"), on=["arm", "trial_id"], how="left"
        )
        out.write_csv("reconstructions.csv", table)
        result.artifacts.append(
            Artifact(
                "reconstructions.csv",
                "Per shown slice and architecture: the checkpoint used and the slice's "
                f"{', '.join(m.label for m in metric_table().values())}.",
            )
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
