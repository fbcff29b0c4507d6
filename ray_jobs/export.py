"""Export a trained network as a model package: ``python -m ray_jobs.export`` (or ``mri-export``).

``--experiment`` is a sweep (a Ray Tune experiment directory) or a single run (``ray_jobs.train``), local or
on object storage. ``--trial ID`` exports that trial; ``--best`` the trial whose selected checkpoint has the
best validation SSIM (of one ``--arm`` if given). Either way the weights are the run's selected checkpoint,
its best validation epoch within what the scheduler let it train: validation makes every choice and the
package carries the test split's numbers beside it, which chose nothing (:mod:`ray_jobs.final_evaluation`).
The package format is :mod:`mri_models.package`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from mri_models import experiment, storage
from mri_models.experiment import ExperimentLayout, RunLayout
from mri_models.metrics import PRIMARY_METRIC, metric_table, primary_objective
from mri_models.models import get_architecture
from mri_models.package import PackageManifest, write_network
from ray_jobs import log_to_stdout
from ray_jobs.baseline import mask_settings
from ray_jobs.cli import exit_on_user_error
from ray_jobs.config import ConfigError, TrainConfig, make_train_config
from ray_jobs.final_evaluation import (
    SELECTION_RULE,
    SelectedCheckpoint,
    format_evaluation,
    load_network,
    selected_checkpoint,
)


@dataclass(frozen=True)
class ExportedRun:
    """One run of an experiment that can be exported: its configuration and selected checkpoint."""

    trial_id: str
    run: RunLayout
    cfg: TrainConfig
    selected: SelectedCheckpoint
    test: dict[str, Any] | None  # its test_evaluation.json


def _runs(path: str) -> dict[str, RunLayout]:
    """Trial id -> run of a sweep (``train_runs/<id>``), or the one run when ``path`` is a run."""
    if storage.exists(RunLayout(path).config_file):
        return {_basename(path): RunLayout(path)}
    layout = ExperimentLayout(path)
    return {
        entry.name: RunLayout(entry.uri)
        for entry in storage.subdirectories(layout.train_runs)
        if storage.exists(RunLayout(entry.uri).config_file)
    }


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _last_epochs(path: str) -> dict[str, int]:
    """Trial id -> the last epoch Tune saw, for the trials the scheduler stopped (the others own every
    epoch they checkpointed: :meth:`~mri_models.experiment.ExperimentLayout.stopped_trials`)."""
    layout = ExperimentLayout(path)
    stopped = layout.stopped_trials()
    out = {}
    for trial in layout.trial_dirs():
        if trial.trial_id_from_name() not in stopped:
            continue
        text = storage.read_text(trial.result_file) or ""
        epochs = [json.loads(line).get("epoch") for line in text.splitlines() if line.strip().startswith("{")]
        epochs = [int(e) for e in epochs if isinstance(e, (int, float))]
        if epochs:
            out[trial.trial_id_from_name()] = max(epochs)
    return out


def _selection(run: RunLayout, last_epoch: int | None) -> tuple[SelectedCheckpoint | None, dict | None]:
    """The checkpoint the final evaluation used (when it ran), else the run's own selection."""
    record = storage.read_json(run.test_evaluation_file)
    if record and record.get("checkpoint"):
        path = storage.join(run.path, record["checkpoint"])
        if experiment.is_complete_checkpoint(path):
            value = record.get(f"selected_val_{PRIMARY_METRIC}", float("nan"))
            return SelectedCheckpoint(path, int(record["selected_epoch"]), float(value)), record
    return selected_checkpoint(run, last_epoch), None


def exportable_runs(path: str) -> list[ExportedRun]:
    """Every run of the experiment with a kept checkpoint of its best validation epoch.

    Raises:
        ConfigError: the path holds no run or sweep, or none of its runs has a checkpoint to export.
    """
    runs = _runs(path)
    if not runs:
        raise ConfigError(
            f"{path}: no training runs (expected a sweep's train_runs/ or a run's train_config.json)"
        )
    last = _last_epochs(path)
    out = []
    for trial_id, run in sorted(runs.items()):
        cfg = make_train_config(storage.read_json(run.config_file))
        selected, record = _selection(run, last.get(trial_id))
        if selected is not None:
            out.append(ExportedRun(trial_id, run, cfg, selected, record))
    if not out:
        raise ConfigError(f"{path}: no run has a kept checkpoint of a trained epoch to export")
    return out


def choose(runs: list[ExportedRun], trial: str | None, arm: str | None) -> ExportedRun:
    """The run named by ``trial``, or the best by validation (among ``arm``'s runs when given).

    Raises:
        ConfigError: an unknown trial or arm, naming the ones there are.
    """
    if arm is not None:
        arms = sorted({run.cfg.arm.name for run in runs})
        runs = [run for run in runs if run.cfg.arm.name == arm]
        if not runs:
            raise ConfigError(f"--arm {arm!r}: no exportable run of that arm; the arms are {', '.join(arms)}")
    if trial is not None:
        found = [run for run in runs if run.trial_id == trial or run.trial_id.endswith(trial)]
        if len(found) != 1:
            shown = ", ".join(run.trial_id for run in runs[:12])
            problem = "ambiguous" if found else "no such trial"
            raise ConfigError(f"--trial {trial!r}: {problem}; the trials are {shown}")
        return found[0]
    sign = primary_objective().sign
    return max(runs, key=lambda run: (sign * run.selected.val_metric, [-ord(c) for c in run.trial_id]))


def training_data_fingerprint(roles: dict[str, Any] | None) -> dict[str, Any]:
    """The data root, the files per role, and a SHA-256 of the training files' names and sizes.

    Raises:
        StorageError: a training file cannot be reached (naming it).
    """
    if not roles:
        return {"root": None, "train_fingerprint": None}
    entries = [storage.stat(uri) for uri in sorted(roles.get("train", []))]
    lines = [f"{entry.name}\t{entry.size}" for entry in entries]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    counts = {f"{role}_files": len(roles.get(role, [])) for role in ("train", "val", "test")}
    return {
        "root": roles.get("root"),
        "test_source": roles.get("test_source"),
        **counts,
        "train_fingerprint": digest,
        "fingerprint_of": "sorted training file names and byte sizes",
    }


def _validation(chosen: ExportedRun, experiment_path: str) -> dict[str, Any]:
    """The selected epoch's validation metrics and the zero-filled input's on the same volumes."""
    history = storage.read_json(storage.join(chosen.selected.path, experiment.HISTORY_FILE)) or []
    epoch = next((h for h in history if h.get("epoch") == chosen.selected.epoch), {})
    record = storage.read_json(ExperimentLayout(experiment_path).baseline_file) or storage.read_json(
        chosen.run.baseline_file
    )
    mask = mask_settings(chosen.cfg)
    baselines = (record or {}).get("baselines", [])
    baseline = next((b["metrics"] for b in baselines if b.get("mask") == mask), None)
    names = list(metric_table())
    return {
        "epoch": chosen.selected.epoch,
        **{name: epoch.get(name) for name in names},
        "zero_filled": {name: baseline[name] for name in names} if baseline else None,
        "scored_against": "the training transform's target (clamped to 6 standard deviations of the input)",
    }


def write_chosen(chosen: ExportedRun, experiment_path: str, chosen_by: str, out: str) -> PackageManifest:
    """Package the chosen run's selected checkpoint, with the manifest describing it."""
    network = load_network(chosen.cfg, chosen.selected.path, torch.device("cpu"))
    roles = storage.read_json(ExperimentLayout(experiment_path).data_roles_file) or storage.read_json(
        chosen.run.data_roles_file
    )
    selection = {
        "experiment": experiment_path,
        "trial_id": chosen.trial_id,
        "epoch": chosen.selected.epoch,
        "checkpoint": _basename(chosen.selected.path),
        "rule": SELECTION_RULE,
        "chosen_by": chosen_by,
    }
    return write_network(
        out,
        network,
        model=chosen.cfg.model,
        hparams=chosen.cfg.model_hparams(),
        arm=chosen.cfg.arm.name,
        plugins=list(chosen.cfg.plugins),
        train_config=chosen.cfg.model_dump(mode="json"),
        selection=selection,
        validation=_validation(chosen, experiment_path),
        test=chosen.test,
        data=training_data_fingerprint(roles),
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.export",
        description="Export a trial's selected network as a self-contained model package.",
    )
    parser.add_argument("--experiment", required=True, help="a sweep or run directory, local or s3://...")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="trial id (or its unique end, e.g. 00003)")
    which.add_argument("--best", action="store_true", help="the best trial by validation SSIM")
    parser.add_argument("--arm", help="choose among this arm's trials only (e.g. unet, attention_unet)")
    parser.add_argument("--out", required=True, help="the package directory to write (local or s3://...)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> tuple[ExportedRun, PackageManifest]:
    """Choose, check and write; raises the user errors of :mod:`ray_jobs.cli` before writing anything."""
    path = storage.normalise(args.experiment)
    if not storage.is_dir(path):
        raise ConfigError(f"--experiment {args.experiment}: no such directory")
    out = storage.normalise(args.out)
    if storage.exists(storage.join(out, "package.json")):
        raise ConfigError(f"--out {args.out}: a package is there already; choose another directory")
    chosen = choose(exportable_runs(path), args.trial, args.arm)
    get_architecture(chosen.cfg.model)  # registered (the configuration loaded its plugins)
    if args.best:
        scope = f" of arm {args.arm!r}" if args.arm else ""
        chosen_by = f"best validation {PRIMARY_METRIC.upper()} at the selected epoch among the trials{scope}"
    else:
        chosen_by = "named by the user (--trial)"
    return chosen, write_chosen(chosen, path, chosen_by, out)


def main(argv: list[str] | None = None) -> int:
    log_to_stdout()
    args = _parse_args(argv)
    code, done = exit_on_user_error(lambda: export(args))
    if code:
        return code
    chosen, manifest = done
    val = manifest.validation
    zero = val["zero_filled"] or {}
    values = [
        f"{k.upper()} {format(val[k], m.fmt)}"
        + (f" (zero-filled {format(zero[k], m.fmt)})" if k in zero else "")
        for k, m in metric_table().items()
        if val.get(k) is not None
    ]
    print(
        f"exported trial {chosen.trial_id} ({manifest.arm}), epoch {chosen.selected.epoch} "
        f"({manifest.selection['chosen_by']}): validation " + ", ".join(values)
    )
    if manifest.test:
        print(format_evaluation(manifest.test))
    print(f"package written to {storage.normalise(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
