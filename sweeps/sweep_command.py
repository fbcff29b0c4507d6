"""The command line every sweep script shares: run the sweep on the cluster, then tabulate its trials.

``python sweeps/<sweep>.py [--profile smoke|cpu|paper] [--set key=value ...] [--resume]``: the sweep YAML
(``sweeps/configs/``) for the profile, validated for every trial before the first one starts; the Tune
experiment runs on the connected cluster (:mod:`ray_jobs.tune`), then its confirm stage if it has one; at
the end each experiment's ``results/trials.csv`` and ``epochs.csv`` are written (:mod:`analysis.collect`)
and the best configurations printed (the confirm stage's are the sweep's).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from analysis.collect import summary, write_tables
from mri_models.storage import StorageError
from ray_jobs import log_to_stdout
from ray_jobs.cli import add_common_arguments, exit_on_user_error, parse_overrides, storage_refusal
from ray_jobs.sweep_config import load_sweep
from ray_jobs.trainer import default_storage
from ray_jobs.tune import SweepStopped, run_sweep

CONFIG_DIR = Path(__file__).resolve().with_name("configs")


def _parse_args(config: Path, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Run the sweep of {config.name} on the Ray cluster.")
    parser.add_argument("--config", type=Path, default=config, help="sweep YAML")
    parser.add_argument("--name", help="experiment name (default: from the config and profile)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    parser.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial")
    parser.add_argument(
        "--mlflow", metavar="URI", default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="log every trial to this MLflow tracking server (default: $MLFLOW_TRACKING_URI, else none)",
    )  # fmt: skip
    add_common_arguments(
        parser, "a TrainConfig field (lr=3e-4) or a sweep field (seeds=[0], search.gamma=[0,1e-3])"
    )
    return parser.parse_args(argv)


def sweep_main(config: Path, argv: list[str] | None = None) -> int:
    """Run the sweep of ``config``; exit code 2 for a user error before any trial."""
    log_to_stdout()
    args = _parse_args(config, argv)

    def sweep():
        overrides = parse_overrides(args.overrides)
        if args.workers_per_trial is not None:
            overrides["workers_per_trial"] = args.workers_per_trial
        validated = load_sweep(args.config, args.profile, overrides)  # every trial, once
        spec = validated.spec
        name = args.name or f"{spec.experiment}-{spec.profile}"
        storage = args.storage or default_storage()
        return spec, run_sweep(validated, name, storage, args.data_root, args.resume, args.mlflow)

    try:
        code, result = exit_on_user_error(sweep)
    except SweepStopped as err:
        print(_stopped(err.name, err.reason, FULL if storage_refusal(err.reason) else OUTAGE), flush=True)
        return 1
    if code:
        return code
    spec, experiments = result
    keys = [*spec.search, "seed"]
    stages = [("search", experiments.search), ("confirm", experiments.confirm)]
    for stage, path in stages if experiments.confirm else stages[:1]:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        try:
            tables = write_tables(path)
        except (OSError, StorageError) as err:
            refused = storage_refusal(err)
            print(_stopped(name, f"{path}: {refused}" if refused else str(err), FULL if refused else OUTAGE))
            return 1
        errors = tables.trials.get("error", [])
        refusals = [refused for error in errors if (refused := storage_refusal(str(error)))]
        if refusals:
            print(_stopped(name, f"{path}: {refusals[0]}", FULL, failed=len(refusals)), flush=True)
            return 1
        print((f"{stage} ({path}):\n" if experiments.confirm else "") + summary(tables, keys), flush=True)
    return 0


FULL = "make room"  # the storage refused a write: a full disk, a read-only one, a quota
OUTAGE = "once the storage answers again"  # it did not answer within its retries


def _stopped(name: str, reason: str, remedy: str, failed: int = 0) -> str:
    """The one line of a sweep its storage stopped: where and why, what is kept, what to do."""
    count = f"{failed} trial{'' if failed == 1 else 's'} failed on it; " if failed else ""
    return (
        f"sweep {name!r} stopped: {reason} ({count}every trial's last complete checkpoint is kept: "
        f"{remedy}, then run the same command with --resume)"
    )
