"""Reconstruct fastMRI files with a model package: ``python -m ray_jobs.predict`` (or ``mri-reconstruct``).

Every ``.h5`` file of ``--data-root`` (one split directory, such as ``.../singlecoil_val``, local or on
object storage) becomes ``<file>.h5`` under ``--out`` in fastMRI's submission format
(:mod:`mri_models.reconstruct`), which ``python -m fastmri.evaluate`` scores. The k-space is under-sampled
with fastMRI's fixed per-volume mask (``--acceleration`` and ``--center-fraction``: the masks the
platform's validation and final evaluation use, so the scores equal its numbers for those volumes), or
taken ``--as-acquired`` from files that are under-sampled already and carry their ``mask`` (fastMRI's
single-coil test and challenge files).

The volumes are distributed with Ray Data: ``map_batches`` over an actor pool, each actor holding the
network (on a GPU of its own where the cluster has GPUs); ``--in-process`` reconstructs them in this
process instead, for small jobs. Each output is written whole and atomically, with the model's checksum,
the mask setting and the volume's metrics as attributes; a rerun skips the volumes already written by the
same model and setting, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mri_models import storage
from mri_models.data import store
from mri_models.data.validate import MASK_KEY, validate_file
from mri_models.metrics import metric_table
from mri_models.package import PackageManifest, load_package, read_manifest
from mri_models.reconstruct import (
    FASTMRI_CENTER_FRACTIONS,
    MaskSetting,
    read_volume,
    reconstruct_volume,
    setting_problem,
    submission_attrs,
    submission_bytes,
    volume_metrics,
    zero_filled_volume,
)
from ray_jobs import log_to_stdout
from ray_jobs.cli import exit_on_user_error
from ray_jobs.config import ConfigError
from ray_jobs.data import VAL_SPLIT

ZERO_FILLED_PREFIX = "zero_filled_"


@dataclass(frozen=True)
class ReconstructionJob:
    """What every worker needs: the package, the output directory and how to reconstruct."""

    package: str
    out: str
    setting: MaskSetting
    transform: str
    batch_size: int
    weights_sha256: str

    def output_uri(self, source: str) -> str:
        return storage.join(self.out, posixpath.basename(source))

    def identity(self) -> dict[str, str]:
        """The attributes that say which model and mask wrote an output file."""
        return {"model_sha256": self.weights_sha256, "mask_setting": self.setting.label()}


def reconstruct_file(network: torch.nn.Module, job: ReconstructionJob, uri: str, device) -> dict[str, Any]:
    """Reconstruct one file and write its output; returns its row (file, slices, metrics, seconds)."""
    started = time.perf_counter()
    volume = read_volume(uri)
    output = reconstruct_volume(network, volume, job.setting, job.transform, device, job.batch_size)
    attrs: dict[str, Any] = dict(job.identity())
    metrics = volume_metrics(volume, output)
    if metrics is not None:  # the network's and the zero-filled input's, against the stored target
        zero = volume_metrics(volume, zero_filled_volume(volume, job.setting, job.transform)) or {}
        attrs.update({name: metrics[name] for name in metric_table()})
        attrs.update({ZERO_FILLED_PREFIX + name: zero[name] for name in metric_table()})
    storage.write_bytes(job.output_uri(uri), submission_bytes(output, attrs))
    return {"file": volume.fname, "slices": int(output.shape[0]), "seconds": time.perf_counter() - started}


class VolumeReconstructor:
    """A Ray Data actor: loads the package once, then reconstructs and writes the volumes it is given."""

    def __init__(self, job: ReconstructionJob, use_gpu: bool, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.job = job
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.network = load_package(job.package).network.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [reconstruct_file(self.network, self.job, str(uri), self.device) for uri in batch["uri"]]
        return {key: np.asarray([row[key] for row in rows]) for key in ("file", "slices", "seconds")}


def run_in_process(job: ReconstructionJob, uris: list[str], device: str) -> Iterator[dict[str, Any]]:
    network = load_package(job.package).network.to(device)
    for uri in uris:
        yield reconstruct_file(network, job, uri, torch.device(device))


def run_on_ray(job: ReconstructionJob, uris: list[str], workers: int | None, use_gpu: bool | None):
    """The volumes through Ray Data: one row per volume, an actor pool of ``workers`` networks."""
    import ray

    from ray_jobs.trainer import connect

    connect()
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) if use_gpu is not False else 0
    if use_gpu and not gpus:
        raise ConfigError("--gpu: the Ray cluster has no GPU")
    per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    fit = int(gpus) if gpus else max(1, int(resources.get("CPU", 1)))
    size = max(1, min(workers or fit, len(uris)))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this command's own bar counts volumes
    context.print_on_execution_start = False
    dataset = ray.data.from_items([{"uri": uri} for uri in uris], override_num_blocks=len(uris))
    threads = 1 if gpus else int(per_actor["num_cpus"])
    rows = dataset.map_batches(
        VolumeReconstructor,
        batch_size=1,
        concurrency=size,
        fn_constructor_kwargs={"job": job, "use_gpu": bool(gpus), "threads": threads},
        **per_actor,
    )
    for row in rows.iter_rows():
        yield {key: row[key].item() if hasattr(row[key], "item") else row[key] for key in row}


# ----------------------------------------------------------------------------------------- planning


def _setting(args: argparse.Namespace, manifest: PackageManifest) -> MaskSetting:
    """The mask setting asked for; without one, the model's own validation setting."""
    if args.as_acquired:
        if args.acceleration or args.center_fraction:
            raise ConfigError("--as-acquired reconstructs the k-space as stored: give no --acceleration")
        return MaskSetting()
    trained = manifest.train_config
    acceleration = args.acceleration or int(trained["accelerations"][0])
    fraction = args.center_fraction
    if fraction is None:
        fraction = FASTMRI_CENTER_FRACTIONS.get(acceleration) if args.acceleration else None
        fraction = fraction or float(trained["center_fractions"][0])
    if not 0 < fraction < 1:
        raise ConfigError(f"--center-fraction {fraction}: expected a fraction in (0, 1)")
    return MaskSetting(str(trained["mask_type"]), acceleration, float(fraction))


def _inputs(root: str, setting: MaskSetting) -> list[str]:
    """The data root's files, each checked before anything is reconstructed.

    Raises:
        ConfigError: no ``.h5`` file there (a root above the split directories is named as such), or a
            file that is not a fastMRI single-coil volume or does not fit the mask setting.
    """
    entries = store.volume_files(root)
    if not entries:
        below = [entry.name for entry in storage.subdirectories(root) if entry.name.startswith("singlecoil_")]
        hint = f" (it holds {', '.join(below)}/: give one of them)" if below else ""
        raise ConfigError(f"--data-root {root}: no .h5 files{hint}")
    split = posixpath.basename(root.rstrip("/"))
    if not split.startswith("singlecoil_"):
        split = "singlecoil_test" if setting.as_acquired else "singlecoil_val"
    for entry in entries:
        problems = validate_file(entry.uri, split, check_values=False)
        if problems:
            raise ConfigError(f"{entry.uri}: {problems[0]}")
        with store.open_hdf5(entry.uri) as hf:
            problem = setting_problem(entry.uri, MASK_KEY in hf, setting)
        if problem:
            raise ConfigError(problem)
    return [entry.uri for entry in entries]


def _pending(job: ReconstructionJob, uris: list[str]) -> list[str]:
    """The inputs without a finished output of this model and setting.

    Raises:
        ConfigError: an output of another model or setting, or a file under the output's name that is not
            a reconstruction: nothing already written is overwritten.
    """
    todo = []
    for uri in uris:
        target = job.output_uri(uri)
        if not storage.exists(target):
            todo.append(uri)
            continue
        attrs = submission_attrs(target)
        if attrs is None:
            raise ConfigError(f"{target}: exists, not a reconstruction; remove it or choose another --out")
        found = {key: attrs.get(key) for key in job.identity()}
        if found != job.identity():
            raise ConfigError(
                f"{target}: written by another model or mask setting ({found['mask_setting']}, model "
                f"{str(found['model_sha256'])[:12]}); choose another --out"
            )
    return todo


def _validation_split(package: str, manifest: PackageManifest) -> str:
    """The validation split of the data the model was trained on (the default data root)."""
    root = (manifest.data or {}).get("root")
    if not root:
        raise ConfigError(f"{package}: the package records no data root; give --data-root")
    return storage.join(root, VAL_SPLIT)


def plan(args: argparse.Namespace) -> tuple[ReconstructionJob, list[str], list[str]]:
    """The job, every input and those still to do; raises the user errors before any work."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected at least 1")
    package = storage.normalise(args.model)
    manifest = load_package(package).manifest  # checks the weights too
    setting = _setting(args, manifest)
    root = storage.normalise(args.data_root or _validation_split(package, manifest))
    out = storage.normalise(args.out)
    if out == root:
        raise ConfigError("--out is the data root: the reconstructions would replace the input files")
    job = ReconstructionJob(package, out, setting, str(manifest.train_config.get("transform", "fast")),
                            args.batch_size, manifest.weights_sha256)  # fmt: skip
    uris = _inputs(root, setting)
    return job, uris, _pending(job, uris)


# ----------------------------------------------------------------------------------------- command line


def summary(job: ReconstructionJob, uris: list[str]) -> str:
    """Mean metrics over the outputs with targets, the network's and the zero-filled input's."""
    rows = [submission_attrs(job.output_uri(uri)) or {} for uri in uris]
    rows = [row for row in rows if all(name in row for name in metric_table())]
    if not rows:
        return "no target in these files: nothing to score (fastMRI's leaderboard scores test submissions)"
    parts = []
    for name, metric in metric_table().items():
        mean = float(np.mean([row[name] for row in rows]))
        zero = float(np.mean([row[ZERO_FILLED_PREFIX + name] for row in rows]))
        parts.append(f"{name.upper()} {format(mean, metric.fmt)} (zero-filled {format(zero, metric.fmt)})")
    return f"{len(rows)} volumes against their stored targets, as fastMRI's evaluation: " + ", ".join(parts)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.predict",
        description="Reconstruct every fastMRI file of a directory with a model package (mri-export), in "
        "fastMRI's submission format.",
    )
    parser.add_argument("--model", required=True, help="the model package directory (local or s3://...)")
    parser.add_argument("--data-root", help="a directory of fastMRI files (default: the model's val split)")
    parser.add_argument("--out", required=True, help="where the reconstructions go (local or s3://...)")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--acceleration", type=int, help="under-sample with this acceleration's fixed mask")
    mask.add_argument("--as-acquired", action="store_true", help="files under-sampled already (with 'mask')")
    parser.add_argument("--center-fraction", type=float, help="default: fastMRI's (0.08 at 4x, 0.04 at 8x)")
    batch_help = "slices per forward pass (1: the platform's evaluation exactly; more: float32 rounding)"
    parser.add_argument("--batch-size", type=int, default=1, help=batch_help)
    parser.add_argument("--in-process", action="store_true", help="no Ray: reconstruct in this process")
    parser.add_argument("--workers", type=int, help="Ray Data actors (default: one per GPU, else per CPU)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, help="default: where there are GPUs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    log_to_stdout()
    args = _parse_args(argv)
    code, planned = exit_on_user_error(lambda: plan(args))
    if code:
        return code
    job, uris, todo = planned
    arm = read_manifest(job.package).arm
    print(f"reconstructing {len(todo)} of {len(uris)} volumes ({len(uris) - len(todo)} written already) with "
          f"{arm} at {job.setting.label()} into {job.out}", flush=True)  # fmt: skip
    started = time.perf_counter()
    if todo:
        if args.in_process:
            device = "cuda" if args.gpu is not False and torch.cuda.is_available() else "cpu"
            rows = run_in_process(job, todo, device)
        else:
            rows = run_on_ray(job, todo, args.workers, args.gpu)
        code, _ = exit_on_user_error(lambda: _consume(rows, len(todo)))
        if code:
            return code
    seconds = time.perf_counter() - started
    rate = len(todo) / seconds if todo and seconds > 0 else math.nan
    print(f"{len(todo)} volumes in {seconds:.1f} s ({rate:.2f} volumes/s); {summary(job, uris)}")
    root = storage.normalise(args.data_root or _validation_split(job.package, read_manifest(job.package)))
    print(f"fastMRI's evaluation of them: python -m analysis.fastmri_evaluate --target-path {root} "
          f"--predictions-path {job.out} --challenge singlecoil")  # fmt: skip
    return 0


def _consume(rows, total: int) -> None:
    with tqdm(total=total, unit="volume", disable=os.environ.get("TQDM_DISABLE") == "1") as bar:
        for row in rows:
            bar.set_postfix_str(str(row["file"]), refresh=False)
            bar.update(1)


if __name__ == "__main__":
    raise SystemExit(main())
