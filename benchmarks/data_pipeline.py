"""Training-data throughput: our Ray Data slice pipeline against fastMRI's SliceDataset + DataLoader.

Everything is measured in this run on the same synthetic files (written by
``mri_models.data.synthetic.generate_dataset``), and every ratio is against a reference measured here:

- fastMRI: ``fastmri.data.SliceDataset`` + ``UnetDataTransform("singlecoil", RandomMaskFunc([0.08], [4]),
  use_seed=False)`` in a ``torch.utils.data.DataLoader`` (batch_size 1, shuffle) with ``num_workers=0``
  (in process) and ``num_workers=N`` (N worker processes, fastMRI's setting);
- ours, in process: ``ray_jobs.data.read_and_transform`` over the epoch's read tasks, no Ray (the transform
  cost without any pipeline overhead);
- ours, Ray Data: ``slice_dataset(train_read_tasks(...), cfg, training=True, epoch=e).iter_batches(...)``
  on a local ``ray.init(num_cpus=N)``, exactly as ``ray_jobs.worker`` builds it every epoch. The first
  epoch (cold: Ray starts its worker processes and imports torch in them) is reported apart from the
  steady-state epochs.

Then a per-slice profile (in process) of where the time goes (HDF5 read, mask + inverse FFT, crop /
magnitude / normalisation) and the bytes per row the trainer receives when the transform runs in the Ray
Data tasks (image + target) versus on the training worker (raw k-space + target) and the trainer design
(the mask's sampled columns of the hybrid k-space + target).

With ``--s3`` the same files are also uploaded to a real S3-protocol server started here (``moto_server``
on loopback, from the test extra) and read from ``s3://`` by the shipped pipeline (in process and through
Ray Data), streamed and through the per-node cache (``data_cache_gb``), against the local reads of the
same run: the ratio, and the bytes actually read per slice when streaming (counted by
:mod:`mri_models.data.store`) against one slice's k-space and target and against the file size per slice
(what a whole-file download would cost).

Run ``python benchmarks/data_pipeline.py --help``; ``--quick`` finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import torch

from mri_models.data import store
from mri_models.data.hybrid_transforms import hybrid_sample
from mri_models.data.synthetic import generate_dataset
from mri_models.data.transforms import (
    CLAMP,
    NORMALISATION_EPS,
    SliceInputs,
    apply_mask,
    center_crop,
    complex_abs,
    complex_center_crop,
    ifft2c,
    normalize,
    normalize_instance,
    to_tensor,
    unet_sample,
)
from mri_models.data.volume import KSPACE_KEY, TARGET_KEY
from ray_jobs.config import TrainConfig
from ray_jobs.data import (
    configure_data_context,
    iter_rows_locally,
    network_rows_on_device,
    slice_dataset,
    train_read_tasks,
    training_mask_seed,
)

# name -> (recon size, k-space size)
SIZES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "small": ((128, 128), (256, 148)),
    "real": ((320, 320), (640, 368)),
}


@dataclass
class Epochs:
    """Per-epoch wall times, slices and time to the first batch of one method."""

    seconds: list[float] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)
    first_batch: list[float] = field(default_factory=list)
    first_slices: list[int] = field(default_factory=list)

    def add(self, seconds: float, slices: int, first_batch: float, first_slices: int) -> None:
        self.seconds.append(seconds)
        self.slices.append(slices)
        self.first_batch.append(first_batch)
        self.first_slices.append(first_slices)

    def _steady(self, values: list) -> list:
        return values[1:] if len(values) > 1 else values

    @property
    def cold_rate(self) -> float:
        return self.slices[0] / self.seconds[0]

    @property
    def steady_rate(self) -> float:
        """Slices per second over every epoch but the first (all of them when there is only one)."""
        return sum(self._steady(self.slices)) / sum(self._steady(self.seconds))

    @property
    def streaming_rate(self) -> float:
        """Slices per second after each epoch's first batch, over every epoch but the first: the rate once
        the pipeline runs, without the per-epoch start-up that a 35k-slice epoch amortises."""
        slices = [n - first for n, first in zip(self.slices, self.first_slices, strict=True)]
        seconds = [t - first for t, first in zip(self.seconds, self.first_batch, strict=True)]
        return sum(self._steady(slices)) / sum(self._steady(seconds))

    @property
    def steady_first_batch(self) -> float:
        return statistics.median(self._steady(self.first_batch))


def time_epochs(
    make_iterable: Callable[[int], Iterable], count: Callable[[object], int], epochs: int
) -> Epochs:
    """Time ``epochs`` full passes; ``make_iterable(epoch)`` is called inside the timed region."""
    result = Epochs()
    for epoch in range(epochs):
        start = time.perf_counter()
        first, first_n, n = None, 0, 0
        for batch in make_iterable(epoch):
            n += count(batch)
            if first is None:
                first, first_n = time.perf_counter() - start, n
        result.add(time.perf_counter() - start, n, first or 0.0, first_n)
    return result


# ----------------------------------------------------------------------------------------- the methods


def fastmri_loader(split_dir: Path, num_workers: int, seed: int):
    """fastMRI's training data path: SliceDataset + UnetDataTransform(use_seed=False) in a DataLoader."""
    from fastmri.data import SliceDataset
    from fastmri.data.subsample import RandomMaskFunc
    from fastmri.data.transforms import UnetDataTransform

    transform = UnetDataTransform("singlecoil", RandomMaskFunc([0.08], [4]), use_seed=False)
    dataset = SliceDataset(split_dir, "singlecoil", transform=transform)
    generator = torch.Generator().manual_seed(seed)

    def make(epoch: int):
        del epoch  # a DataLoader re-shuffles (and, without persistent workers, re-forks) every epoch
        return torch.utils.data.DataLoader(
            dataset, batch_size=1, shuffle=True, num_workers=num_workers, generator=generator
        )

    return make, lambda batch: int(batch.image.shape[0])


def ours_in_process(slices: list[tuple[str, int]], cfg: TrainConfig):
    """``read_and_transform`` over this epoch's read tasks, in this process (no Ray)."""

    def make(epoch: int):
        tasks = train_read_tasks(slices, epoch, 0, 1, cfg.seed, cfg.slices_per_read)
        return iter_rows_locally(tasks, cfg, training=True, epoch=epoch)

    return make, lambda row: 1


def ours_ray(
    slices: list[tuple[str, int]], cfg: TrainConfig, batch_size: int, shuffle_buffer: int, reservation: bool
):
    """The per-epoch Ray Dataset exactly as ``ray_jobs.worker.train_epoch`` iterates it.

    ``reservation=False`` measures the proposed patch without editing ``ray_jobs/data.py``: Ray Data's
    per-operator resource reservation is switched off in the DataContext that ``slice_dataset`` captures.
    """
    import ray.data

    configure_data_context()  # as the training worker does before its first dataset

    def make(epoch: int):
        tasks = train_read_tasks(slices, epoch, 0, 1, cfg.seed, cfg.slices_per_read)
        context = ray.data.DataContext.get_current()
        default = context.op_resource_reservation_enabled
        context.op_resource_reservation_enabled = reservation
        try:
            rows = slice_dataset(tasks, cfg, training=True, epoch=epoch)
        finally:
            context.op_resource_reservation_enabled = default
        return rows.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer or None,
        )

    return make, lambda batch: len(batch["slice_num"])


# ----------------------------------------------------------------------------------------- profile


def profile_slices(
    slices: list[tuple[str, int]], cfg: TrainConfig, slices_per_read: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Mean milliseconds per slice of each step of the transform, and bytes per row of both designs."""
    from mri_models.data.subsample import create_mask_func

    mask_func = create_mask_func(cfg.mask_type, cfg.center_fractions, cfg.accelerations)
    steps: dict[str, list[float]] = {
        "read, one file open per slice (fastMRI)": [],
        f"read, one open per {slices_per_read} slices (ours)": [],
        "complex -> (re, im) tensor": [],
        "mask (draw + multiply)": [],
        "inverse FFT (ifft2c)": [],
        "crop + magnitude": [],
        "normalise + clamp (image, target)": [],
        "whole unet_sample (check)": [],
    }
    keys = list(steps)
    by_file: dict[str, list[int]] = {}
    for path, index in slices:
        by_file.setdefault(path, []).append(index)
    nbytes = {}
    for path, indices in by_file.items():
        fname = os.path.basename(path)
        for start in range(0, len(indices), slices_per_read):
            chunk = indices[start : start + slices_per_read]
            t0 = time.perf_counter()
            with h5py.File(path, "r") as hf:
                kspace_chunk = hf[KSPACE_KEY][chunk]
                target_chunk = hf[TARGET_KEY][chunk]
                attrs = dict(hf.attrs)
            steps[keys[1]].append((time.perf_counter() - t0) / len(chunk))
            for k, slice_num in enumerate(chunk):
                t0 = time.perf_counter()
                with h5py.File(path, "r") as hf:
                    kspace = hf[KSPACE_KEY][slice_num]
                    target = hf[TARGET_KEY][slice_num]
                    attrs = dict(hf.attrs)
                t1 = time.perf_counter()
                data = to_tensor(kspace)
                t2 = time.perf_counter()
                data = apply_mask(data, mask_func, seed=training_mask_seed(cfg.seed, 0, fname, slice_num))[0]
                t3 = time.perf_counter()
                image = ifft2c(data)
                t4 = time.perf_counter()
                image = complex_abs(complex_center_crop(image, target.shape[-2:]))
                t5 = time.perf_counter()
                image, mean, std = normalize_instance(image, eps=NORMALISATION_EPS)
                image = image.clamp(-CLAMP, CLAMP)
                target_t = center_crop(to_tensor(target), target.shape[-2:])
                target_t = normalize(target_t, mean, std, eps=NORMALISATION_EPS).clamp(-CLAMP, CLAMP)
                t6 = time.perf_counter()
                inputs = SliceInputs(
                    kspace_chunk[k],
                    target_chunk[k],
                    attrs,
                    fname,
                    slice_num,
                    mask_func,
                    training_mask_seed(cfg.seed, 0, fname, slice_num),
                )
                sample = unet_sample(inputs)
                t7 = time.perf_counter()
                for key, seconds in zip(
                    [keys[0], *keys[2:]],
                    [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6],
                    strict=True,
                ):
                    steps[key].append(seconds)
                if not nbytes:
                    scalars = 3 * 4 + 8 + 8 + len(fname)  # mean, std (f32), max (f64), slice_num, fname
                    hybrid = hybrid_sample(inputs)
                    nbytes = {
                        "transform in Ray Data tasks: image + target (+ scalars)": sample.image.numpy().nbytes
                        + sample.target.numpy().nbytes
                        + scalars,
                        "transform on the worker: k-space + target (+ attrs)": kspace.nbytes
                        + target.nbytes
                        + scalars,
                        "trainer design: sampled hybrid columns + mask + target": hybrid.hybrid.nbytes
                        + hybrid.mask.nbytes
                        + target.nbytes
                        + scalars,
                    }
    return {key: 1e3 * statistics.fmean(values) for key, values in steps.items()}, nbytes


# ----------------------------------------------------------------------------------------- output


def start_s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """``moto_server`` on a free loopback port, and the AWS variables that point clients at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return server, env


def upload(local_dir: Path, bucket: str, prefix: str, env: dict[str, str]) -> str:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"], access_key="bench", secret_key="bench",
        region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir(bucket)
    pafs.copy_files(str(local_dir), f"{bucket}/{prefix}", pafs.LocalFileSystem(), fs)
    return f"s3://{bucket}/{prefix}"


FROM_S3 = ", from S3 (moto)"
FROM_S3_CACHED = ", from S3 (moto), node cache"


def with_node_cache(cfg: TrainConfig, directory: Path) -> TrainConfig:
    """``cfg`` with the per-node cache of remote volumes on (mri_models.data.cache), in ``directory``."""
    return cfg.model_copy(update={"data_cache_gb": 64.0, "data_cache_dir": str(directory)})


def ray_variants(cfg: TrainConfig, args: argparse.Namespace) -> list[tuple[str, TrainConfig, bool]]:
    """(label, config, Ray Data op resource reservation) of each Ray Data configuration measured."""
    variants = [
        (f"Ray Data, {cfg.transform} transform, {cfg.data_cpus_per_task:g} CPU/task (config)", cfg, True),
        ("Ray Data, exact transform", cfg.model_copy(update={"transform": "exact"}), True),
        (f"Ray Data, {TRAINER_DESIGN}", cfg.model_copy(update={"transform_on": "trainer"}), True),
        ("Ray Data, 1 CPU/task", cfg.model_copy(update={"data_cpus_per_task": 1.0}), True),
    ]
    return variants if args.ray_variants == "all" else variants[:1]


TRAINER_DESIGN = "trainer design: hybrid rows (the read-task part)"


def trainer_part(slices: list[tuple[str, int]], cfg: TrainConfig, batch_size: int):
    """The trainer's share of the trainer design, on this process's CPU: hybrid rows (made beforehand,
    untimed) to network rows with ``network_rows_on_device``, ``batch_size`` slices at a time."""
    trainer_cfg = cfg.model_copy(update={"transform_on": "trainer"})
    tasks = train_read_tasks(slices, 0, 0, 1, cfg.seed, cfg.slices_per_read)
    rows = list(iter_rows_locally(tasks, trainer_cfg, training=True))
    batches = [
        {key: [row[key] for row in rows[i : i + batch_size]] for key in rows[0]}
        for i in range(0, len(rows), batch_size)
    ]

    def make(epoch: int):
        del epoch
        return (network_rows_on_device(batch, torch.device("cpu")) for batch in batches)

    return make, lambda out: int(out["image"].shape[0])


def print_design_costs(name: str, results: dict[str, Epochs], trainer_batch: int) -> None:
    """CPU milliseconds per slice of each transform design (one process, one thread, read included),
    against fastMRI's SliceDataset + UnetDataTransform in process."""
    fastmri_ms = 1e3 / results["fastMRI DataLoader, num_workers=0"].steady_rate
    read_task_ms = 1e3 / results[f"ours in process, {TRAINER_DESIGN}"].steady_rate
    trainer_ms = (
        1e3 / results[f"trainer design: the trainer part on CPU, batches of {trainer_batch}"].steady_rate
    )
    designs = [
        ("fastMRI (reference)", fastmri_ms),
        ("read tasks, exact transform", 1e3 / results["ours in process, exact transform"].steady_rate),
        (
            "read tasks, fast transform (config)",
            1e3 / results["ours in process (read_and_transform)"].steady_rate,
        ),
        ("trainer design: read-task CPU (what a GPU node's CPUs pay)", read_task_ms),
        ("trainer design: the trainer part, here on CPU (a GPU's work)", trainer_ms),
    ]
    print(f"\n== {name}: CPU ms per slice of each design (one process, 1 thread, HDF5 read included)")
    print_table(
        ["design", "CPU ms/slice", "of fastMRI's"],
        [[label, f"{ms:.2f}", f"{ms / fastmri_ms:.2f}x"] for label, ms in designs],
    )
    verdict = "MET" if read_task_ms <= fastmri_ms / 4 else "NOT MET"
    print(
        f"  goal: the trainer design's CPU per slice <= 1/4 of fastMRI's: {verdict} "
        f"({read_task_ms / fastmri_ms:.2f}x)"
    )


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller volumes and epochs (< 1 minute)")
    parser.add_argument(
        "--data-root", type=Path, help="where to write the synthetic data (default: a temp dir)"
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "real"])
    parser.add_argument("--volumes", type=int, help="training volumes per size (default 8, quick 2)")
    parser.add_argument("--slices", type=int, help="slices per volume (default 16, quick 8)")
    parser.add_argument(
        "--epochs", type=int, help="epochs per method incl. the first, cold one (default 4, quick 2)"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="DataLoader workers = Ray CPUs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of this process (in-process runs)"
    )
    parser.add_argument(
        "--data-cpus-per-task",
        type=float,
        default=TrainConfig.model_fields["data_cpus_per_task"].default,
        help="CPU reserved by each Ray Data read task (TrainConfig default)",
    )
    parser.add_argument(
        "--slices-per-read",
        type=int,
        default=TrainConfig.model_fields["slices_per_read"].default,
        help="slices per Ray Data read task (TrainConfig default)",
    )
    parser.add_argument(
        "--chunks-per-task",
        type=int,
        default=TrainConfig.model_fields["chunks_per_task"].default,
        help="chunks of --slices-per-read slices one Ray Data task reads (TrainConfig default)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="iter_batches batch size (fastMRI uses 1)")
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=4,
        help="local_shuffle_buffer_size as ray_jobs.worker uses (0: none)",
    )
    parser.add_argument(
        "--ray-variants",
        choices=["config", "all"],
        default="all",
        help="'config': only the TrainConfig settings; 'all': also the exact transform, the trainer "
        "design and 1 CPU/task",
    )
    parser.add_argument(
        "--trainer-batch", type=int, default=8, help="batch size of the trainer design's trainer part"
    )
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process and DataLoader runs")
    parser.add_argument(
        "--s3", action="store_true", help="also read the data from a local S3 server (moto) and compare"
    )
    args = parser.parse_args(argv)
    args.volumes = args.volumes or (2 if args.quick else 8)
    args.slices = args.slices or (8 if args.quick else 16)
    args.epochs = args.epochs or (2 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        seed=0,
        slices_per_read=args.slices_per_read,
        chunks_per_task=args.chunks_per_task,
        data_cpus_per_task=args.data_cpus_per_task,
    )
    tmp = None
    root = args.data_root
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench_data_pipeline_")
        root = Path(tmp)
    print(
        f"data pipeline benchmark {time.strftime('%Y-%m-%d %H:%M')}  cpus={args.cpus} (os {os.cpu_count()})  "
        f"torch threads={args.threads}  volumes={args.volumes} x slices={args.slices}  epochs={args.epochs}  "
        f"slices_per_read={cfg.slices_per_read}  chunks_per_task={cfg.chunks_per_task}  "
        f"data_cpus_per_task={cfg.data_cpus_per_task}"
    )
    try:
        datasets = {}
        for name in args.sizes:
            recon, kspace = SIZES[name]
            start = time.perf_counter()
            data_dir = root / f"{name}-{args.volumes}x{args.slices}"
            paths = generate_dataset(
                data_dir, num_train=args.volumes, num_val=0, num_slices=args.slices,
                recon_size=recon, kspace_size=kspace, seed=0,
            )  # fmt: skip
            slices = [(str(p), i) for p in paths for i in range(args.slices)]
            datasets[name] = (data_dir / "singlecoil_train", slices)
            print(f"  {name}: {len(paths)} volumes in {data_dir} ({time.perf_counter() - start:.1f} s)")

        results: dict[str, dict[str, Epochs]] = {name: {} for name in args.sizes}
        s3_slices: dict[str, list[tuple[str, int]]] = {}
        bytes_per_slice: dict[str, float] = {}
        if args.s3:
            server, s3_env = start_s3_server()
            os.environ.update(s3_env)
            for name, (split_dir, slices) in datasets.items():
                uri = upload(split_dir, "bench", name, s3_env)
                s3_slices[name] = [(f"{uri}/{os.path.basename(p)}", i) for p, i in slices]
                print(f"  {name}: uploaded to {uri}")
        # Everything that forks runs before Ray starts (forking a process with Ray threads is unsafe).
        for name, (split_dir, slices) in datasets.items():
            for label, (make, count) in (
                ("fastMRI DataLoader, num_workers=0", fastmri_loader(split_dir, 0, 0)),
                (f"fastMRI DataLoader, num_workers={args.cpus}", fastmri_loader(split_dir, args.cpus, 0)),
                ("ours in process (read_and_transform)", ours_in_process(slices, cfg)),
                (
                    "ours in process, exact transform",
                    ours_in_process(slices, cfg.model_copy(update={"transform": "exact"})),
                ),
                (
                    f"ours in process, {TRAINER_DESIGN}",
                    ours_in_process(slices, cfg.model_copy(update={"transform_on": "trainer"})),
                ),
                (
                    f"trainer design: the trainer part on CPU, batches of {args.trainer_batch}",
                    trainer_part(slices, cfg, args.trainer_batch),
                ),
            ):
                results[name][label] = time_epochs(make, count, args.epochs)
                print(f"  {name}: {label}: {results[name][label].steady_rate:.1f} slices/s")
            if name in s3_slices:
                label = f"ours in process{FROM_S3}"
                before = store.remote_bytes_read()
                results[name][label] = time_epochs(*ours_in_process(s3_slices[name], cfg), args.epochs)
                bytes_per_slice[name] = (store.remote_bytes_read() - before) / (args.epochs * len(slices))
                print(f"  {name}: {label}: {results[name][label].steady_rate:.1f} slices/s")
                label = f"ours in process{FROM_S3_CACHED}"
                cached_cfg = with_node_cache(cfg, root / "node_cache_in_process")
                results[name][label] = time_epochs(*ours_in_process(s3_slices[name], cached_cfg), args.epochs)
                print(f"  {name}: {label}: {results[name][label].steady_rate:.1f} slices/s")

        if not args.skip_ray:
            import ray

            start = time.perf_counter()
            ray.init(
                address="local",  # always a private cluster: never join one that is already running
                num_cpus=args.cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                # The read tasks reach the S3 server through the same variables as this process.
                runtime_env={"env_vars": s3_env} if args.s3 else None,
            )
            print(f"  ray.init: {time.perf_counter() - start:.1f} s")
            import ray.data

            logging.getLogger("ray.data").setLevel(logging.ERROR)
            try:
                for name, (_, slices) in datasets.items():
                    for label, variant, reservation in ray_variants(cfg, args):
                        make, count = ours_ray(
                            slices, variant, args.batch_size, args.shuffle_buffer, reservation
                        )
                        results[name][label] = time_epochs(make, count, args.epochs)
                        print(f"  {name}: {label}: {results[name][label].steady_rate:.1f} slices/s")
                    if name in s3_slices:
                        label, variant, reservation = ray_variants(cfg, args)[0]
                        for suffix, source_cfg in (
                            (FROM_S3, variant),
                            (FROM_S3_CACHED, with_node_cache(variant, root / f"node_cache_ray_{name}")),
                        ):
                            make, count = ours_ray(
                                s3_slices[name], source_cfg, args.batch_size, args.shuffle_buffer, reservation
                            )
                            results[name][label + suffix] = time_epochs(make, count, args.epochs)
                            rate = results[name][label + suffix].steady_rate
                            print(f"  {name}: {label + suffix}: {rate:.1f} slices/s")
            finally:
                ray.shutdown()

        reference = f"fastMRI DataLoader, num_workers={args.cpus}"
        for name in args.sizes:
            recon, kspace = SIZES[name]
            print(
                f"\n== {name}: recon {recon[0]}x{recon[1]}, k-space {kspace[0]}x{kspace[1]}, "
                f"{len(datasets[name][1])} slices per epoch; ratio = steady slices/s / '{reference}'"
            )
            ref = results[name][reference]
            rows = []
            for label, epochs in results[name].items():
                rows.append([
                    label,
                    f"{epochs.cold_rate:.1f}",
                    f"{epochs.steady_rate:.1f}",
                    f"{epochs.steady_rate / ref.steady_rate:.2f}x",
                    f"{epochs.streaming_rate:.1f}",
                    f"{epochs.streaming_rate / ref.streaming_rate:.2f}x",
                    f"{1e3 * epochs.first_batch[0]:.0f}",
                    f"{1e3 * epochs.steady_first_batch:.0f}",
                ])  # fmt: skip
            headers = ["method", "epoch 1 sl/s", "steady sl/s", "ratio", "after 1st batch sl/s", "ratio"]
            print_table([*headers, "1st batch ms, ep 1", "1st batch ms"], rows)
        print(
            "\nslices/s: 'epoch 1' = the first, cold epoch; 'steady' = whole later epochs (with each epoch's "
            "start-up);\n'after 1st batch' = the same epochs without each epoch's start-up (the streaming "
            "rate);\n'1st batch' = ms from the start of an epoch to its first batch (median of later "
            "epochs): a fixed cost per epoch, small against a real 35k-slice epoch."
        )
        if "real" in results and not args.skip_ray:
            ref = results["real"][reference]
            print(f"\nGoal: >= 2x fastMRI's DataLoader at 640x368 with the same {args.cpus} CPUs.")
            for label, _, _ in ray_variants(cfg, args):
                ours = results["real"][label]
                ratio = ours.steady_rate / ref.steady_rate
                streaming = ours.streaming_rate / ref.streaming_rate
                caveat = "  (--quick: start-up dominated, not conclusive)" if args.quick else ""
                print(
                    f"  {label}: {'MET' if ratio >= 2.0 else 'NOT MET'} ({ratio:.2f}x whole epochs, "
                    f"{streaming:.2f}x after the first batch){caveat}"
                )
            ours_one = results["real"]["ours in process (read_and_transform)"].steady_rate
            theirs_one = results["real"]["fastMRI DataLoader, num_workers=0"].steady_rate
            bound = args.cpus * ours_one
            print(
                f"  CPU cost per slice, one process: ours {1e3 / ours_one:.1f} ms, fastMRI "
                f"{1e3 / theirs_one:.1f} ms ({ours_one / theirs_one:.2f}x less);\n  with perfect scaling on "
                f"{args.cpus} CPUs, ours would reach {bound:.0f} sl/s, {bound / ref.steady_rate:.2f}x the "
                "DataLoader."
            )

        for name in args.sizes:
            print_design_costs(name, results[name], args.trainer_batch)

        for name in s3_slices:
            print(f"\n== {name}: reading from S3 (moto on loopback) against local files, same run")
            rows = []
            for label, epochs in results[name].items():
                if FROM_S3 in label:
                    local_label = label.split(FROM_S3)[0].replace(
                        "ours in process", "ours in process (read_and_transform)"
                    )
                    local = results[name][local_label]
                    rows.append([label, f"{epochs.cold_rate:.1f}", f"{epochs.steady_rate:.1f}",
                                 f"{local.steady_rate:.1f}",
                                 f"{epochs.steady_rate / local.steady_rate:.2f}x"])  # fmt: skip
            print_table(["method", "epoch 1 sl/s", "steady sl/s", "local steady sl/s", "S3 / local"], rows)
            print(
                "  node cache: epoch 1 downloads each volume whole (one request per file), later epochs read "
                "the node's copy"
            )
            recon, kspace = SIZES[name]
            payload = kspace[0] * kspace[1] * 8 + recon[0] * recon[1] * 4
            split_dir, _ = datasets[name]
            file_share = sum(p.stat().st_size for p in split_dir.glob("*.h5")) / len(datasets[name][1])
            print(
                f"  bytes read per slice from S3: {bytes_per_slice[name]:,.0f}; one slice's k-space + "
                f"target: {payload:,} ({bytes_per_slice[name] / payload:.3f}x); file size per slice (a "
                f"whole-file download): {file_share:,.0f} ({bytes_per_slice[name] / file_share:.3f}x)"
            )

        for name in args.sizes:
            _, slices = datasets[name]
            steps, nbytes = profile_slices(slices, cfg, cfg.slices_per_read)
            print(f"\n== {name}: where the time goes per slice (in process, {args.threads} torch thread(s))")
            total = sum(v for k, v in steps.items() if "read" not in k and "check" not in k)
            rows = []
            for key, ms in steps.items():
                share = "" if "read" in key or "check" in key else f"{100 * ms / total:.0f}%"
                rows.append([key, f"{ms:.2f}", share])
            rows.append(["transform steps (sum, without read)", f"{total:.2f}", "100%"])
            print_table(["step", "ms/slice", "of transform"], rows)
            print(f"-- bytes per row shipped to the trainer ({name})")
            base = min(nbytes.values())
            print_table(
                ["design", "bytes/row", "relative"],
                [[key, f"{value:,}", f"{value / base:.2f}x"] for key, value in nbytes.items()],
            )
    finally:
        if args.s3:
            server.terminate()
            server.wait()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
