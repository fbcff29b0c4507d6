"""An experiment directory to tidy tables: one row per trial and epoch, one row per trial.

Reads only files on disk (local path or s3:// through pyarrow), so it works on a laptop after the cluster is
gone, on interrupted experiments, and on trials that errored or were stopped early. Per trial directory
(the ones holding ``params.json``) it reads the configuration, ``result.json`` (one JSON object per
reported epoch), and ``error.txt`` when the trial failed. The sweep's ASHA state (``asha_state.txt``, see
``ray_jobs.tune``) says which trials the scheduler stopped early.

Trial status:
- ``completed``: reached the configured number of epochs;
- ``stopped``: stopped early by ASHA;
- ``diverged``: failed because the loss became NaN/Inf;
- ``errored``: failed for any other reason;
- ``unfinished``: neither (the sweep was interrupted; ``--resume`` continues it).

Run ``python -m analysis.collect --experiment PATH`` to (re)write ``PATH/results/trials.csv`` and
``epochs.csv`` (and Parquet copies).
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow.fs as pafs

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")
SWEEP_FILE = "sweep.json"  # written by ray_jobs.tune: the sweep's search keys, seeds and max epochs
# Not ".json": Tune copies every *.json/*.pkl of the experiment root into its driver staging directory on
# restore and syncs them back later, which would overwrite the records written since with the old copy.
ASHA_STATE_FILE = "asha_state.txt"
# Experiments written before the rename keep their state under the old name; read them too.
LEGACY_ASHA_STATE_FILES = ("asha_state.json",)
RESULTS_DIR = "results"
METRICS = ("nmse", "psnr", "ssim", "val_loss", "train_loss", "mpand", "attention_l1")
# Tune's own bookkeeping keys in result.json that are not metrics of the study.
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "checkpoint_path", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag",
}  # fmt: skip


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _read(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def read_asha_state(fs: pafs.FileSystem, root: str) -> str | None:
    """The text of the experiment's ASHA state file (current or legacy name), or None without one."""
    for name in (ASHA_STATE_FILE, *LEGACY_ASHA_STATE_FILES):
        text = _read(fs, posixpath.join(root, name))
        if text is not None:
            return text
    return None


@dataclass
class Experiment:
    """The tables of one experiment."""

    path: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    problems: list[str]


def _status(error: str | None, epochs_run: int, max_epochs: int | None, stopped_by_asha: bool) -> str:
    if error is not None:
        return "diverged" if "diverged" in error else "errored"
    if max_epochs is not None and epochs_run >= max_epochs:
        return "completed"
    if stopped_by_asha:
        return "stopped"
    return "unfinished"


def collect(path: str) -> Experiment:
    """Read an experiment directory (local or s3://) into per-epoch and per-trial tables.

    Args:
        path: the Tune experiment directory (``<storage>/<experiment name>``).

    Returns:
        The tables, plus human-readable problems found on the way (missing metrics, unreadable files).
    """
    fs, root = _filesystem(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"experiment directory {path} does not exist")
    sweep = json.loads(_read(fs, posixpath.join(root, SWEEP_FILE)) or "{}")
    asha = json.loads(read_asha_state(fs, root) or "{}")
    stopped = set(asha.get("stopped_trials", []))
    search_keys = sweep.get("search_keys")
    max_epochs = sweep.get("max_epochs")
    problems: list[str] = []
    trial_rows, epoch_rows = [], []
    entries = fs.get_file_info(pafs.FileSelector(root))
    for entry in sorted(entries, key=lambda e: e.path):
        params_text = (
            _read(fs, posixpath.join(entry.path, "params.json"))
            if entry.type == pafs.FileType.Directory
            else None
        )
        if params_text is None:
            continue
        config = json.loads(params_text)
        results_text = _read(fs, posixpath.join(entry.path, "result.json")) or ""
        reports = []
        for line in results_text.splitlines():
            try:
                reports.append(json.loads(line))
            except json.JSONDecodeError:
                problems.append(
                    f"{entry.base_name}: unreadable line in result.json (trial interrupted mid-write?)"
                )
        trial_id = (reports[0].get("trial_id") if reports else None) or _trial_id_from_dir(entry.base_name)
        error = _read(fs, posixpath.join(entry.path, "error.txt"))
        keys = search_keys or sorted(config)
        config_columns = {key: config.get(key) for key in keys}
        for report in reports:
            row = {"trial_id": trial_id, **config_columns}
            row.update({k: v for k, v in report.items() if k not in _TUNE_KEYS and not isinstance(v, dict)})
            epoch_rows.append(row)
        epochs_run = int(max((r.get("epoch", 0) for r in reports), default=0))
        status = _status(error, epochs_run, max_epochs, trial_id in stopped)
        row = {"trial_id": trial_id, **config_columns, "status": status, "epochs_run": epochs_run}
        for metric in METRICS:
            values = [r.get(metric) for r in reports]
            values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
            if reports and not values and metric in ("nmse", "psnr", "ssim"):
                problems.append(f"trial {trial_id}: no value of {metric} in its results")
            row[f"last_{metric}"] = values[-1] if values else math.nan
        best = max(reports, key=lambda r: _number(r.get("ssim")), default=None)
        for metric in ("nmse", "psnr", "ssim", "epoch"):
            row[f"best_{metric}"] = _number(best.get(metric)) if best else math.nan
        row["error"] = error.strip().splitlines()[-1][:300] if error else ""
        row["trial_dir"] = entry.base_name
        trial_rows.append(row)
        if error:
            problems.append(f"trial {trial_id} {status}: {row['error']}")
    trials = pd.DataFrame(trial_rows)
    epochs = pd.DataFrame(epoch_rows)
    if trials.empty:
        problems.append(f"no trials found under {path}")
    return Experiment(path, trials, epochs, problems)


def _trial_id_from_dir(name: str) -> str:
    """The trial id in a Tune trial directory name ``<trainable>_<id>_<index>_<params>_<date>``.

    Needed for trials that reported nothing yet; Tune's ids are ``<5 hex>_<5 digits>``.
    """
    match = _TRIAL_ID.search(name)
    return match.group(1) if match else name


def _number(value) -> float:
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return -math.inf


def write_tables(path: str, out_dir: str | None = None) -> Experiment:
    """Collect an experiment and write ``trials`` and ``epochs`` as CSV and Parquet into ``out_dir``.

    Args:
        path: the experiment directory.
        out_dir: where to write (default ``<path>/results``).
    """
    experiment = collect(path)
    fs, root = _filesystem(out_dir or posixpath.join(path, RESULTS_DIR))
    fs.create_dir(root, recursive=True)
    for name, table in (("trials", experiment.trials), ("epochs", experiment.epochs)):
        with fs.open_output_stream(posixpath.join(root, f"{name}.csv")) as f:
            f.write(table.to_csv(index=False).encode())
        if not table.empty:
            with fs.open_output_stream(posixpath.join(root, f"{name}.parquet")) as f:
                table.to_parquet(f, index=False)
    return experiment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="experiment directory (local path or s3:// URI)")
    parser.add_argument("--out", help="output directory (default: <experiment>/results)")
    args = parser.parse_args(argv)
    try:
        experiment = write_tables(args.experiment, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    for problem in experiment.problems:
        print(f"warning: {problem}")
    counts = experiment.trials["status"].value_counts().to_dict() if not experiment.trials.empty else {}
    print(
        f"{len(experiment.trials)} trials ({counts}), {len(experiment.epochs)} epoch rows written to "
        f"{args.out or posixpath.join(args.experiment, RESULTS_DIR)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
