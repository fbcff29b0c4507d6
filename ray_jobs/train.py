"""Train one configuration with Ray Train DDP: ``python -m ray_jobs.train`` (or ``mri-train``).

Validates the configuration and the data before any Ray work (exit code 2 with a message naming the key or
file), connects to the running cluster (or starts a local one), trains, and writes the per-epoch metrics to
``<storage>/<name>/metrics.csv``. Rerunning a name resumes that run. ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import pandas as pd
import ray
import ray.train

from mri_models import experiment, storage
from mri_models.metrics import metric_table
from mri_models.models import model_names
from ray_jobs import log_to_stdout
from ray_jobs.baseline import record_baselines, zero_filled_baseline
from ray_jobs.checkpoints import history_from_checkpoint
from ray_jobs.cli import add_common_arguments, exit_on_user_error, parse_overrides, storage_refusal
from ray_jobs.config import TrainConfig, make_train_config, profile_defaults
from ray_jobs.data import PreparedData, ensure_synthetic_data, prepare_data
from ray_jobs.final_evaluation import evaluate_runs, format_evaluation, pending
from ray_jobs.replay import run_replay
from ray_jobs.trainer import (
    build_trainer,
    check_cluster_fits,
    claim_run_name,
    connect,
    default_run_name,
    default_storage,
    resolve_use_gpu,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.train",
        description="Train one configuration with Ray Train DDP on the running Ray cluster (or a local one).",
    )
    parser.add_argument("--model", choices=model_names(), default="unet")
    parser.add_argument("--gamma", type=float, help="attention-sparsity weight (sparse_attention_unet)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the step")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory format"
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (eager if unusable)"
    )
    parser.add_argument(
        "--name", help="run name; rerunning a name resumes it (default from model, weights, seed)"
    )
    parser.add_argument(
        "--replay",
        metavar="EXP/TRIAL",
        help="train a sweep's trial again alone and say whether every epoch equals the sweep's record",
    )
    add_common_arguments(parser, "any TrainConfig field, e.g. --set lr=3e-4 --set drop_prob=0.1")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class PreparedRun:
    """What the train command prepares before training: everything validated, the run's name claimed.

    Attributes:
        cfg: the run's configuration.
        data: the validated, indexed data.
        name: the run's name under ``storage_path``.
        storage_path: where runs live (local path, NFS or s3:// URI).
        resumed: whether a run of that name existed (the trainer resumes it).
        baseline: the zero-filled input's validation metrics.
    """

    cfg: TrainConfig
    data: PreparedData
    name: str
    storage_path: str
    resumed: bool
    baseline: dict[str, float]

    @property
    def run(self) -> experiment.RunLayout:
        return experiment.RunLayout(storage.join(self.storage_path, self.name))


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The profile's values, overlaid with the flags given and then the ``--set`` overrides."""
    values = profile_defaults(args.profile)
    flags = {
        "model": args.model, "gamma": args.gamma, "epochs": args.epochs, "num_workers": args.workers,
        "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
    }  # fmt: skip
    values.update({key: value for key, value in flags.items() if value is not None})
    values.update(parse_overrides(args.overrides))
    return make_train_config(values)


def _record_inputs(run: experiment.RunLayout, cfg: TrainConfig, data: PreparedData) -> dict[str, float]:
    """Write the run's zero-filled baseline and which files played which role; returns the baseline's
    metrics."""
    baseline = zero_filled_baseline(data, cfg)
    record_baselines(run.baseline_file, [baseline])
    storage.write_json(run.data_roles_file, data.roles())
    return baseline["metrics"]


def _prepare_run(args: argparse.Namespace) -> PreparedRun:
    """Validate everything and claim the run name; raises the user errors of :mod:`ray_jobs.cli`."""
    cfg = _train_config(args)
    data = prepare_data(cfg, args.data_root or ensure_synthetic_data(args.profile))
    name = args.name or default_run_name(cfg, args.profile)
    storage_path = args.storage or default_storage()
    connect()
    check_cluster_fits(cfg)
    resumed = claim_run_name(cfg, storage_path, name)
    baseline = _record_inputs(experiment.RunLayout(storage.join(storage_path, name)), cfg, data)
    return PreparedRun(cfg, data, name, storage_path, resumed, baseline)


def _start_line(prepared: PreparedRun) -> str:
    """What the command prints before training: the run, its data, where results go, the baseline."""
    cfg, data = prepared.cfg, prepared.data
    weights = "".join(f", {key} {value:g}" for key, value in cfg.identifying_weights().items())
    weights += "".join(f", {key} {value}" for key, value in cfg.identifying_options().items())
    baseline = prepared.baseline
    return (
        f"{'resuming' if prepared.resumed else 'starting'} run {prepared.name!r}: {cfg.model}{weights}, "
        f"{cfg.num_workers} worker(s), {len(data.train_slices)} train / {len(data.val_slices)} val slices "
        f"from {data.root}, results in {prepared.run.path}\nzero-filled baseline: "
        + ", ".join(f"{key.upper()} {format(baseline[key], m.fmt)}" for key, m in metric_table().items())
    )


def _finish(prepared: PreparedRun, history: list[dict[str, float]]) -> None:
    """Write the per-epoch metrics, print the last epoch's, and evaluate on the test split if not done."""
    run, cfg = prepared.run, prepared.cfg
    storage.write_text(run.metrics_csv, pd.DataFrame(history).to_csv(index=False))
    final = history[-1]
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if not math.isnan(v)))
    print(f"per-epoch metrics written to {run.metrics_csv}")
    item = pending(cfg, run, prepared.data)
    if item is not None:
        evaluate_runs([item], prepared.data, resolve_use_gpu(cfg))
    evaluation = storage.read_json(run.test_evaluation_file)
    if evaluation:
        print(format_evaluation(evaluation) + f"\nwritten to {run.test_evaluation_file}")


def main(argv: list[str] | None = None) -> int:
    """Validate everything, then train; exit code 2 for bad configuration or data, 1 for a failed run."""
    log_to_stdout()
    args = _parse_args(argv)
    if args.replay:
        code, replayed = exit_on_user_error(lambda: run_replay(args.replay, args.storage, args.name))
        return code or replayed
    code, prepared = exit_on_user_error(lambda: _prepare_run(args))
    if code:
        return code
    cfg, name = prepared.cfg, prepared.name
    print(_start_line(prepared), flush=True)
    try:
        trainer = build_trainer(cfg, prepared.data, name, prepared.storage_path, baseline=prepared.baseline)
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        refused = storage_refusal(err)
        if refused:  # one line: the storage, not the run, is at fault, and nothing good was lost
            print(f"run {name!r} failed: {prepared.run.path}: {refused} (its last complete checkpoint is "
                  "kept: make room, then run the same command to resume it)", flush=True)  # fmt: skip
        else:
            print(f"run {name!r} failed: {err}", flush=True)
        return 1
    # The worker loop ends before the last epoch only when the loss diverged (Ray Train V2 keeps the
    # metrics of checkpointed reports only, so the diverged report is not in the result).
    history = history_from_checkpoint(result.checkpoint) if result.checkpoint else []
    if not history or history[-1]["epoch"] < cfg.epochs:
        diverged_at = history[-1]["epoch"] + 1 if history else 1
        print(
            f"run {name!r} diverged at epoch {diverged_at} (loss NaN or Inf; the log above names the step): "
            "lower the learning rate or the penalty weights",
            flush=True,
        )
        return 1
    _finish(prepared, history)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
