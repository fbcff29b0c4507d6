"""Train one configuration with Ray Train DDP: ``python -m ray_jobs.train`` (or ``mri-train``).

Validates the configuration and the data before any Ray work (exit code 2 with a message naming the key or
file), connects to the running cluster (or starts a local one), trains, and writes the per-epoch metrics to
``<storage>/<name>/metrics.csv``. Rerunning a name resumes that run. ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import ray
import ray.train

from mri_models import experiment
from mri_models.metrics import metric_table
from mri_models.models import model_names
from ray_jobs import log_to_stdout
from ray_jobs.baseline import record_baselines, zero_filled_baseline
from ray_jobs.checkpoints import history_from_checkpoint
from ray_jobs.cli import add_common_arguments, exit_on_user_error, parse_overrides
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


def _configure(args: argparse.Namespace) -> tuple[TrainConfig, PreparedData, str, str, bool, dict]:
    """Validate everything and claim the run name; raises the user errors of :mod:`ray_jobs.cli`."""
    values = profile_defaults(args.profile)
    flags = {
        "model": args.model, "gamma": args.gamma, "epochs": args.epochs, "num_workers": args.workers,
        "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
    }  # fmt: skip
    values.update({key: value for key, value in flags.items() if value is not None})
    values.update(parse_overrides(args.overrides))
    cfg = make_train_config(values)
    data = prepare_data(cfg, args.data_root or ensure_synthetic_data(args.profile))
    name = args.name or default_run_name(cfg, args.profile)
    storage_path = args.storage or default_storage()
    connect()
    check_cluster_fits(cfg)
    resumed = claim_run_name(cfg, storage_path, name)
    baseline = zero_filled_baseline(data, cfg)
    run = experiment.RunLayout(experiment.join(storage_path, name))
    record_baselines(run.baseline_file, [baseline])
    experiment.write_json(run.data_roles_file, data.roles())
    return cfg, data, name, storage_path, resumed, baseline["metrics"]


def main(argv: list[str] | None = None) -> int:
    """Validate everything, then train; exit code 2 for bad configuration or data, 1 for a failed run."""
    log_to_stdout()
    args = _parse_args(argv)
    if args.replay:
        code, replayed = exit_on_user_error(lambda: run_replay(args.replay, args.storage, args.name))
        return code or replayed
    code, configured = exit_on_user_error(lambda: _configure(args))
    if code:
        return code
    cfg, data, name, storage_path, resumed, baseline = configured
    run = experiment.RunLayout(experiment.join(storage_path, name))
    weights = "".join(f", {key} {value:g}" for key, value in cfg.identifying_weights().items())
    weights += "".join(f", {key} {value}" for key, value in cfg.identifying_options().items())
    print(
        f"{'resuming' if resumed else 'starting'} run {name!r}: {cfg.model}{weights}, {cfg.num_workers} "
        f"worker(s), {len(data.train_slices)} train / {len(data.val_slices)} val slices from {data.root}, "
        f"results in {run.path}\nzero-filled baseline: "
        + ", ".join(f"{key.upper()} {format(baseline[key], m.fmt)}" for key, m in metric_table().items()),
        flush=True,
    )
    try:
        result = build_trainer(cfg, data, name, storage_path, baseline=baseline).fit()
    except ray.train.TrainingFailedError as err:
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
    experiment.write_text(run.metrics_csv, pd.DataFrame(history).to_csv(index=False))
    final = history[-1]
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if not math.isnan(v)))
    print(f"per-epoch metrics written to {run.metrics_csv}")
    item = pending(cfg, run, data)
    if item is not None:
        evaluate_runs([item], data, resolve_use_gpu(cfg))
    evaluation = experiment.read_json(run.test_evaluation_file)
    if evaluation:
        print(format_evaluation(evaluation) + f"\nwritten to {run.test_evaluation_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
