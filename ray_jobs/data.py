"""The Ray Data slice pipeline: fastMRI volumes streamed as network-ready rows, a fresh dataset per epoch.

Why a dataset per epoch and per rank, built inside the training worker, rather than one dataset handed to
the trainer: fastMRI draws a new random mask for every training example every epoch, and the mask is
applied in k-space before the inverse FFT, so the whole transform depends on the epoch. A dataset passed to
``TorchTrainer(datasets=...)`` is a fixed pipeline re-executed each epoch with no epoch in scope, and Train
splits it with ``streaming_split(equal=True)``, which may drop validation slices and so bias the per-volume
metrics. Here each rank gets, every epoch, its own list of read tasks:

- training: chunks of consecutive slices of one file, shuffled with (seed, epoch), dealt to ranks and cut
  to equal lengths so every DDP rank takes the same number of steps; each slice's mask seed is
  (seed, epoch, crc32(file name), slice), so masks are new every epoch, differ between ranks and slices,
  and a resumed run sees exactly the masks it would have seen;
- validation: whole volumes per rank (no slice is dropped or duplicated), with fastMRI's fixed per-volume
  mask seed, so rows equal ``SliceDataset`` + ``UnetDataTransform(use_seed=True)`` bit for bit.

A read task opens its HDF5 file once and reads its slices in one indexed read; the k-space transform (mask,
inverse FFT, crop, normalise) runs in the same Ray Data CPU task, next to the read, so only 2 x H x W
float32 per slice travels to the trainer instead of the oversampled complex k-space and target (2.8x
fewer bytes at fastMRI's 640 x 368 -> 320 x 320), while the transform costs the trainer's CPU nothing.
``benchmarks/data_pipeline.py`` measures the choice.

With ``transform_on: trainer`` the read tasks stop after the mask-independent half of the transform (the
readout inverse FFT of the rows the crop keeps) and ship that "hybrid" k-space, only the columns the
slice's mask keeps (0.68 MB a row at 640 x 368 and 4x, less than the 0.82 MB of image + target), with the
mask; the trainer finishes the transform batched on its device (:func:`network_rows_on_device`), so on GPU
nodes the CPUs only read. Validation rows are always finished by the read tasks: they are made once per run.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import random
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import torch
from filelock import FileLock

from mri_models import storage
from mri_models.data import store
from mri_models.data.cache import FileCache, default_file_cache_dir
from mri_models.data.hybrid_transforms import hybrid_batch_to_images, hybrid_sample
from mri_models.data.slice_dataset import RawSample, list_volumes, subsample_slices
from mri_models.data.subsample import create_mask_func
from mri_models.data.synthetic import generate_dataset
from mri_models.data.transforms import SliceChunk, volume_mask_seed
from mri_models.data.validate import check_root, default_validation_cache
from mri_models.data.volume import KSPACE_KEY, TARGET_KEY
from mri_models.reconstruct import network_inputs
from ray_jobs.config import SYNTHETIC_DATA, ConfigError, TrainConfig, default_data_dir
from ray_jobs.splits import NO_TEST, VolumeFacts, choose_test_data, facts_of

TRAIN_SPLIT = "singlecoil_train"
VAL_SPLIT = "singlecoil_val"

SliceRef = tuple[str, int]  # (absolute file path or URI, slice index)


@dataclass(frozen=True)
class PreparedData:
    """A validated data root and its slice indices per role, small enough to ship to every worker.

    ``val_slices`` make every choice; ``test_slices`` (whole volumes) are read only by the final
    evaluation (:mod:`ray_jobs.splits`, :mod:`ray_jobs.final_evaluation`).
    """

    root: str  # a local path or a URI in object storage (mri_models.storage)
    train_slices: tuple[SliceRef, ...]
    val_slices: tuple[SliceRef, ...]
    image_size: tuple[int, int]
    test_slices: tuple[SliceRef, ...] = ()
    test_source: str = NO_TEST
    volumes: dict[str, VolumeFacts] = field(default_factory=dict)  # validation and test files by name

    def roles(self) -> dict[str, Any]:
        """Which files played which role, for the experiment's record (``data_roles.json``)."""
        by_role = {"train": self.train_slices, "val": self.val_slices, "test": self.test_slices}
        files = {role: sorted({path for path, _ in slices}) for role, slices in by_role.items()}
        return {"root": self.root, "test_source": self.test_source, **files}


# ----------------------------------------------------------------------------------------- preparation


def ensure_synthetic_data(profile: str, seed: int = 0, base_dir: Path | None = None) -> Path:
    """The synthetic dataset of a profile, generated once into the cache and reused afterwards.

    A lock file serialises concurrent jobs; a marker written last means a half-written dataset (killed
    generator) is completed on the next call instead of being used.
    """
    if profile not in SYNTHETIC_DATA:
        raise ConfigError(
            f"no synthetic dataset for profile {profile!r}; expected one of {sorted(SYNTHETIC_DATA)}"
        )
    spec = SYNTHETIC_DATA[profile]
    # The name carries the generation parameters, so changing a profile's data never reuses a stale set.
    digest = hashlib.sha1(repr(sorted(spec.items())).encode()).hexdigest()[:8]
    root = (base_dir or default_data_dir()) / f"{profile}-seed{seed}-{digest}"
    marker = root / ".complete"
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        if not marker.exists():
            generate_dataset(root, seed=seed, **spec)
            marker.write_text(repr(spec))
    return root


def _index(split_dir: str, cfg: TrainConfig, files: frozenset[str] | None = None) -> tuple[SliceRef, ...]:
    """The split's slices after the configuration's subsampling (of ``files`` only, when given)."""
    volumes = [v for v in list_volumes(split_dir) if files is None or str(v.fname) in files]
    samples = [RawSample(v.fname, i, v.metadata) for v in volumes for i in range(v.num_slices)]
    kept = subsample_slices(samples, cfg.sample_rate, cfg.volume_sample_rate, random.Random(cfg.seed))
    return tuple(sorted((str(s.fname), s.slice_ind) for s in kept))


def prepare_data(cfg: TrainConfig, root: str | os.PathLike) -> PreparedData:
    """Validate the data root against the config and index its splits; raises before any Ray work.

    Args:
        cfg: the run configuration.
        root: a local path or a URI ``pyarrow.fs`` understands (``s3://bucket/knee``). On object storage the
            validation reads headers, attributes and shapes only (ranged reads): the NaN/Inf scan of every
            value, done for local data, would download the whole dataset.

    Raises:
        DataValidationError: a file or split is missing or malformed (names the file and problem), or the
            root cannot be reached (a bad URI, a missing bucket, denied access: named with the reason).
        ConfigError: the image is too small for ``num_pool_layers``, or subsampling leaves no slice.
    """
    root = storage.normalise(root)
    check_values = not storage.is_remote(root)
    splits = (TRAIN_SPLIT, VAL_SPLIT)
    check_root(root, splits, check_values=check_values, cache_dir=default_validation_cache())
    val_dir = storage.join(root, VAL_SPLIT)
    test = choose_test_data(cfg, root, val_dir, check_values)
    train_slices = _index(storage.join(root, TRAIN_SPLIT), cfg)
    val_slices = _index(val_dir, cfg, test.val_kept)
    # The test split is evaluated whole: subsampling is for cheaper training and selection, not reporting.
    test_slices = tuple((str(v.fname), i) for v in test.volumes for i in range(v.num_slices))
    # Keyed by file name, as rows and metrics name volumes (fastMRI's fname).
    volumes = {posixpath.basename(str(v.fname)): facts_of(v) for v in (*list_volumes(val_dir), *test.volumes)}
    for split, slices in ((TRAIN_SPLIT, train_slices), (VAL_SPLIT, val_slices)):
        if not slices:
            raise ConfigError(
                f"{storage.join(root, split)}: no slice left after sample_rate/volume_sample_rate subsampling"
            )
    with store.open_hdf5(train_slices[0][0]) as hf:
        image_size = tuple(int(n) for n in hf[TARGET_KEY].shape[-2:])
    # Each pooling halves the image; InstanceNorm needs more than one pixel at the bottom of the U.
    smallest = min(image_size) // 2**cfg.num_pool_layers
    if smallest < 2:
        raise ConfigError(
            f"num_pool_layers={cfg.num_pool_layers} is too deep for {image_size[0]}x{image_size[1]} images "
            f"(the deepest level would be {smallest} pixel(s) wide; at most "
            f"{max(0, int(np.log2(min(image_size))) - 1)} pooling layers fit)"
        )
    if len(train_slices) < cfg.num_workers * cfg.batch_size:
        raise ConfigError(
            f"{len(train_slices)} training slices cannot feed {cfg.num_workers} workers x batch_size "
            f"{cfg.batch_size}"
        )
    return PreparedData(
        root, train_slices, val_slices, image_size, test_slices, test.source, volumes  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------------------- sharding


def _chunks(slices: Sequence[SliceRef], slices_per_read: int) -> list[tuple[str, list[int]]]:
    """Runs of at most ``slices_per_read`` slices of one file, in index order."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for path, slice_ind in slices:
        by_file[path].append(slice_ind)
    return [
        (path, indices[start : start + slices_per_read])
        for path, indices in by_file.items()
        for start in range(0, len(indices), slices_per_read)
    ]


def train_read_tasks(
    slices: Sequence[SliceRef], epoch: int, rank: int, world_size: int, seed: int, slices_per_read: int
) -> list[dict[str, Any]]:
    """This rank's training read tasks for an epoch; every rank gets the same number of slices."""
    chunks = _chunks(slices, slices_per_read)
    order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    per_rank: list[list[tuple[str, list[int]]]] = [[] for _ in range(world_size)]
    counts = [0] * world_size
    for index in order:  # deal each chunk to the rank with the fewest slices so far
        target = counts.index(min(counts))
        per_rank[target].append(chunks[index])
        counts[target] += len(chunks[index][1])
    budget = min(counts)  # cut every rank to the same length: DDP ranks must take the same steps
    tasks, taken = [], 0
    for path, indices in per_rank[rank]:
        keep = indices[: budget - taken]
        if keep:
            tasks.append({"path": path, "slices": keep})
        taken += len(keep)
    return tasks


def val_read_tasks(
    slices: Sequence[SliceRef], rank: int, world_size: int, slices_per_read: int
) -> list[dict[str, Any]]:
    """This rank's validation read tasks: whole volumes, each volume on exactly one rank."""
    by_file: dict[str, int] = defaultdict(int)
    for path, _ in slices:
        by_file[path] += 1
    counts, owner = [0] * world_size, {}
    for path in sorted(by_file, key=lambda p: (-by_file[p], p)):  # largest first balances the load
        target = counts.index(min(counts))
        owner[path] = target
        counts[target] += by_file[path]
    mine = [ref for ref in slices if owner[ref[0]] == rank]
    return [{"path": path, "slices": indices} for path, indices in _chunks(mine, slices_per_read)]


# ----------------------------------------------------------------------------------------- rows


def training_mask_seed(seed: int, epoch: int, fname: str, slice_num: int) -> tuple[int, ...]:
    """The mask seed of a training slice: new every epoch, different per slice, the same on resume."""
    return (seed, epoch, zlib.crc32(fname.encode()), slice_num)


@dataclass(frozen=True)
class ReadOptions:
    """What the read tasks need to turn slices into rows: made from a configuration in one place
    (:meth:`of`), for the Ray Data pipeline and its in-process twin (:func:`iter_rows_locally`) alike.

    Attributes:
        training: training rows (a new mask per slice every epoch) or validation rows (fastMRI's fixed
            per-volume masks).
        epoch: the epoch whose training masks are drawn.
        seed: the run's seed, part of every training mask's seed.
        mask_type: fastMRI's mask function name (:func:`create_mask_func`).
        center_fractions: its fully sampled centre fractions.
        accelerations: its accelerations, paired with ``center_fractions``.
        transform: ``exact`` (fastMRI's operations, bit-equal) or ``fast`` (within float32 rounding).
        rows: ``network`` rows (image, target, mean, std) or ``hybrid`` rows (the sampled columns of the
            k-space after the readout inverse FFT, the column mask and the raw target), which the trainer
            turns into network rows on its device (:func:`network_rows_on_device`).
        cache: the node-local cache of remote volumes (None: stream every read).
    """

    training: bool
    epoch: int
    seed: int
    mask_type: str
    center_fractions: tuple[float, ...]
    accelerations: tuple[int, ...]
    transform: str
    rows: str
    cache: FileCache | None

    @classmethod
    def of(cls, cfg: TrainConfig, *, training: bool, epoch: int = 0) -> ReadOptions:
        """The read options of a configuration's training rows of ``epoch``, or of its validation rows."""
        return cls(
            training=training,
            epoch=epoch,
            seed=cfg.seed,
            mask_type=cfg.mask_type,
            center_fractions=tuple(cfg.center_fractions),
            accelerations=tuple(cfg.accelerations),
            transform=cfg.transform,
            rows=row_kind(cfg, training),
            cache=data_cache(cfg),
        )

    def mask_seeds(self, fname: str, indices: Sequence[int]) -> list[tuple[int, ...]]:
        """The mask seed of each of a file's slices (:func:`training_mask_seed`, or fastMRI's per volume)."""
        if self.training:
            return [training_mask_seed(self.seed, self.epoch, fname, slice_num) for slice_num in indices]
        return [volume_mask_seed(fname) for _ in indices]


def read_and_transform(batch: dict[str, np.ndarray], options: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Read tasks (each one file and some of its slices) to rows; the Ray Data map function.

    Yields one batch of rows per read task, in order, which Ray Data appends to the task's block. Every
    column of a batch is one array made where the transform writes (one file: one shape), never a stack
    of per-slice arrays: Arrow takes contiguous arrays without copying, so a slice's rows are copied only
    once more, into the object store.
    """
    mask_func = create_mask_func(options.mask_type, options.center_fractions, options.accelerations)
    buffer = None
    for path, indices in zip(batch["path"], batch["slices"], strict=True):
        indices = [int(i) for i in indices]
        fname = os.path.basename(path)
        with store.open_hdf5(path, options.cache) as hf:  # a remote file: ranged reads of these slices only
            kspace = buffer = _read_slices(hf[KSPACE_KEY], indices, buffer)  # one read for the whole chunk
            target = hf[TARGET_KEY][indices]
            attrs = dict(hf.attrs)
        seeds = options.mask_seeds(fname, indices)
        chunk = SliceChunk(kspace, target, attrs, fname, indices, mask_func, seeds)
        out = _hybrid_rows(chunk) if options.rows == "hybrid" else _network_rows(chunk, options.transform)
        out.update(
            max_value=np.full(len(indices), float(attrs.get("max", 0.0)), dtype=np.float64),
            fname=np.asarray([fname] * len(indices), dtype=object),
            slice_num=np.asarray(indices, dtype=np.int64),
        )
        yield out


def _read_slices(dataset, indices: list[int], buffer: np.ndarray | None) -> np.ndarray:
    """The chunk's k-space, read into the previous chunk's array when it has the same shape and type.

    The transforms copy what they keep, so a task can reuse one k-space array for all its chunks: reading
    into memory already paged in is cheaper than into a new array per chunk (benchmarks/README.md, Data
    pipeline).
    """
    shape = (len(indices), *dataset.shape[1:])
    consecutive = indices == list(range(indices[0], indices[0] + len(indices)))
    if not consecutive or dataset.dtype != np.complex64:
        return dataset[indices]
    if buffer is None or buffer.shape != shape:
        buffer = np.empty(shape, dtype=np.complex64)
    dataset.read_direct(buffer, np.s_[indices[0] : indices[0] + len(indices)])
    return buffer


def _hybrid_rows(chunk: SliceChunk) -> dict[str, np.ndarray]:
    """One file's hybrid rows, compact: each slice ships only the columns its mask keeps (a third of the
    full width's bytes at 4x); the trainer scatters them back (:func:`hybrid_batch_to_images`)."""
    samples = [hybrid_sample(chunk.slice_inputs(k)) for k in range(len(chunk))]
    return {
        "hybrid": _stack([sample.hybrid for sample in samples]),
        "mask": np.stack([sample.mask for sample in samples]),
        "target": np.asarray(chunk.target, dtype=np.float32),  # the chunk as read: no per-slice copies
        "crop_size": np.asarray([sample.crop_size for sample in samples], dtype=np.int64),
    }


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of the rows' arrays, or an object array of them when their shapes differ (random masks
    keep different numbers of columns: Ray Data keeps them as variable-shaped tensors)."""
    if len({array.shape for array in arrays}) == 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = arrays
    return ragged


def _network_rows(chunk: SliceChunk, transform: str) -> dict[str, np.ndarray]:
    """One file's network rows (image, normalised target, mean, std): :func:`network_inputs`, whose fast
    transform writes each slice straight into the chunk's arrays."""
    rows = network_inputs(chunk, transform)
    return {"image": rows.image, "target": rows.target, "mean": rows.mean, "std": rows.std}


def network_rows_on_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Image, normalised target, mean and std of a batch, as tensors on ``device``.

    A batch of network rows is copied there; a batch of hybrid rows is transformed there, batched (mask,
    column inverse FFT, crop, magnitude, normalisation: the GPU's work on GPU nodes, equal to the read
    tasks' ``fast`` transform within float32 rounding).
    """
    if "hybrid" in batch:
        images = hybrid_batch_to_images(
            batch["hybrid"], batch["mask"], batch["crop_size"], batch["target"], device=device
        )
        return {"image": images.image, "target": images.target, "mean": images.mean, "std": images.std}
    # Ray hands out read-only arrays; torch.tensor copies, which torch requires before any in-place use.
    names = ("image", "target", "mean", "std")
    return {key: torch.tensor(np.asarray(batch[key])).to(device) for key in names}


def configure_data_context() -> None:
    """Set this process's Ray Data options for the slice pipeline; idempotent.

    Call it where a process starts its data work, before its first :func:`slice_dataset` (the training
    worker does, first thing). The ``DataContext`` is process-wide and every dataset copies it when it is
    made, so these are settings of the process, not of one dataset: set once, not rewritten per dataset.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the per-epoch datasets would flood the job log
    context.print_on_execution_start = False
    # One map operator does all the work; Ray Data's default per-operator reservation (half the cluster)
    # left it half the CPUs and serialised the read tasks on small nodes (benchmarks/README.md).
    context.op_resource_reservation_enabled = False
    # Blocks in task order, whatever task finishes first: a run's rows (and so its numbers) are fixed by its
    # configuration and seed. It costs nothing measurable: the tasks finish in order anyway, and the
    # trainer consumes far slower than they produce.
    context.execution_options.preserve_order = True


def slice_dataset(tasks: list[dict[str, Any]], cfg: TrainConfig, *, training: bool, epoch: int = 0):
    """A streaming Ray Dataset of rows for the given read tasks (one block per task).

    The process must have called :func:`configure_data_context` (its rows' order depends on it).
    """
    # At most as many concurrent tasks as CPUs the training workers leave free: more would spawn worker
    # processes that Ray reaps between epochs, so every epoch would pay for starting them (and importing
    # torch) again (benchmarks/README.md).
    free_cpus = ray.cluster_resources().get("CPU", 1) - cfg.num_workers * cfg.cpus_per_worker
    # Several entries of the task list per Ray task: Ray Data's scheduling and bookkeeping cost per task,
    # whatever its size, is that of the fast transform of several slices (benchmarks/README.md). The
    # dataset's rows and their order do not change (consecutive entries per task, blocks in order); the
    # blocks are larger, which the trainer's local shuffle buffer sees, so it is not a resumable change.
    num_blocks = max(1, math.ceil(len(tasks) / cfg.chunks_per_task))
    ds = ray.data.from_items(tasks, override_num_blocks=num_blocks)
    return ds.map_batches(
        read_and_transform,
        batch_size=cfg.chunks_per_task,
        num_cpus=cfg.data_cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(num_blocks, int(free_cpus)))),
        fn_kwargs={"options": ReadOptions.of(cfg, training=training, epoch=epoch)},
    )


def row_kind(cfg: TrainConfig, training: bool) -> str:
    """``hybrid`` for training rows the trainer transforms (``transform_on: trainer``), else ``network``.

    Validation rows are always made by the read tasks: they are produced once per run and kept
    (:class:`ValidationBatches`), so moving their transform would save nothing per epoch.
    """
    return "hybrid" if training and cfg.transform_on == "trainer" else "network"


def data_cache(cfg: TrainConfig) -> FileCache | None:
    """The node-local cache of remote volumes the configuration asks for (None: stream every read)."""
    if cfg.data_cache_gb <= 0:
        return None
    return FileCache(cfg.data_cache_dir or default_file_cache_dir(), int(cfg.data_cache_gb * 2**30))


class ValidationBatches:
    """One rank's validation batches: streamed through Ray Data the first time, then kept in memory.

    Validation rows never change (fixed per-volume masks), so producing them once per run saves every
    later epoch the pipeline's start-up, the reads and the FFTs. They are kept only while they fit in
    ``cfg.val_cache_mb`` (a paper-size validation split on one rank does not; it is streamed every epoch).

    Args:
        data: the prepared data.
        cfg: the run configuration.
        rank: this worker's rank.
        world_size: the number of workers.
    """

    def __init__(self, data: PreparedData, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.tasks = val_read_tasks(data.val_slices, rank, world_size, cfg.slices_per_read)
        self.budget = cfg.val_cache_mb * 2**20
        self.cached: list[dict[str, np.ndarray]] | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.cached is not None:
            yield from self.cached
            return
        kept: list[dict[str, np.ndarray]] | None = []
        size = 0
        rows = slice_dataset(self.tasks, self.cfg, training=False)
        for batch in rows.iter_batches(batch_size=self.cfg.batch_size, batch_format="numpy"):
            size += sum(column.nbytes for column in batch.values())
            if kept is not None and size <= self.budget:
                kept.append(batch)
            else:
                kept = None  # over budget: stream every epoch
            yield batch
        self.cached = kept  # only a pass that ran to the end is kept


def iter_rows_locally(
    tasks: list[dict[str, Any]], cfg: TrainConfig, *, training: bool, epoch: int = 0
) -> Iterator[dict]:
    """The same rows without Ray (for tests and the reference side of benchmarks)."""
    options = ReadOptions.of(cfg, training=training, epoch=epoch)
    for task in tasks:
        batch = {
            "path": np.asarray([task["path"]], dtype=object),
            "slices": np.asarray([task["slices"]], dtype=object),
        }
        for out in read_and_transform(batch, options):
            for i in range(len(out["slice_num"])):
                yield {key: value[i] for key, value in out.items()}
