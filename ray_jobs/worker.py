"""The Ray Train worker loop: one epoch of DDP training over the rank's rows, validation, one report.

:func:`train_loop_per_worker` runs on every worker: the network from the registry wrapped for DDP, fastMRI's
optimiser (RMSprop + StepLR) or Adam, the reconstruction loss plus the configuration's penalty terms, then
validation with every metric of :func:`mri_models.metrics.metric_table` gathered across ranks, and one
``ray.train.report`` per epoch with a checkpoint from rank 0. In an ASHA sweep the workers wait, after
reporting a rung's epoch, for the scheduler's decision (:class:`RungWait`), and end there when it stops the
trial.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mri_models.attention_metrics import AttentionStatsAccumulator, MpandAccumulator, report_keys
from mri_models.experiment import DECISION_STOP, TARGET_KEYS, RunLayout, read_asha_decisions
from mri_models.losses import penalty_terms, training_loss
from mri_models.metrics import PRIMARY_METRIC, VolumeMetricAccumulator, metric_table
from mri_models.model_cost import synchronised_clock
from mri_models.models import build_model, get_architecture
from mri_models.plugins import load_plugins
from mri_models.step_options import (
    autocast,
    check_precision_supported,
    compile_network,
    float32_result,
    make_grad_scaler,
    optimisation_step,
    prepare_network,
    to_network_input,
    unwrap,
)
from mri_models.storage import StorageError, ray_storage, read_json, write_json
from ray_jobs import log_to_stdout
from ray_jobs.checkpoints import load_checkpoint, save_checkpoint
from ray_jobs.config import TrainConfig
from ray_jobs.data import (
    PreparedData,
    ValidationBatches,
    configure_data_context,
    network_rows_on_device,
    slice_dataset,
    train_read_tasks,
)
from ray_jobs.final_evaluation import validation_rows, write_volume_rows
from ray_jobs.images import ValidationImages
from ray_jobs.preemption import IN_EPOCH_KEY, EpochProgress, PreemptionHandler, wait_for_teardown

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or Inf (on any rank: every rank raises it at the same step)."""


def stream_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's random streams in one epoch (dropout, batch shuffling).

    Re-seeding at every epoch from (seed, epoch, rank) makes an epoch's randomness independent of what ran
    before it, so a run resumed from a checkpoint takes exactly the steps of the run it continues.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def metric_keys(num_pool_layers: int) -> list[str]:
    """Every key of every epoch's report, in order (the same for all models: NaN where undefined).

    Per-level keys end in ``_level_k``, level 1 the finest. ``mpand`` is the relative MPAND in percent,
    ``mpand_absolute`` the paper's form; ``<penalty>_vs_init`` is a penalty's value over its epoch-0 value.
    """
    levels = range(1, num_pool_layers + 1)
    return [
        "epoch",
        "train_loss",
        "train_reconstruction_loss",
        "val_loss",
        *metric_table(),
        "mpand",
        *(f"mpand_level_{level}" for level in levels),
        "mpand_absolute",
        *(f"mpand_absolute_level_{level}" for level in levels),
        *report_keys(num_pool_layers),
        *penalty_terms(),
        *(f"{name}_vs_init" for name in penalty_terms()),
        "lr",
        "epoch_seconds",
        "compute_fraction",
        "train_slices_per_second",
        "train_slices",
        "val_volumes",
        "diverged",
        *TARGET_KEYS,
    ]


def format_progress(metrics: dict[str, float], epochs: int, baseline: dict[str, float] | None = None) -> str:
    """One line per epoch for the job log, with the primary metric's gain over the zero-filled input."""
    line = (
        f"epoch {metrics['epoch']}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}"
    )
    for name, metric in metric_table().items():
        line += f"  {name.upper()} {format(metrics[name], metric.fmt)}"
        if name == PRIMARY_METRIC and baseline and name in baseline:
            line += f" ({metrics[name] - baseline[name]:+{metric.fmt}} vs zero-filled)"
    if not math.isnan(metrics["mpand"]):
        line += f"  MPAND {metrics['mpand']:+.1f}%  mean alpha {metrics['alpha_mean']:.3f}"
    if metrics["epoch"] == 0:
        return line + f"  (untrained network, {metrics['epoch_seconds']:.1f} s)"
    return line + (
        f"  ({metrics['epoch_seconds']:.1f} s, {100 * metrics['compute_fraction']:.0f}% computing, "
        f"{metrics['train_slices_per_second']:.1f} slices/s)"
    )


# ----------------------------------------------------------------------------------------- collectives


# A test switch: workers given GPUs by Ray train on the CPU (over gloo), so that GPU scheduling (several
# trials on one GPU of a raylet started with --num-gpus) can be tested on machines without one.
GPUS_AS_CPU_VARIABLE = "MRI_MODELS_GPUS_AS_CPU"


def gpus_as_cpu() -> bool:
    """Whether the :data:`GPUS_AS_CPU_VARIABLE` test switch is on."""
    return os.environ.get(GPUS_AS_CPU_VARIABLE) == "1"


def worker_device() -> torch.device:
    """This worker's device: its GPU where Ray gave it one, else the CPU (always, under the test switch)."""
    return torch.device("cpu") if gpus_as_cpu() else ray.train.torch.get_device()


def _world() -> tuple[int, int]:
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (each rank passes its own; only rank 0's is kept)."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


# ----------------------------------------------------------------------------------------- one epoch


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    optimizer_class = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step_size, cfg.lr_gamma)
    return optimizer, scheduler


def _network_batch(batch: dict[str, Any], cfg: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the device as (N, 1, H, W) image and target (plus mean and std), in the configured
    memory format; hybrid rows are transformed there (``transform_on: trainer``)."""
    rows = network_rows_on_device(batch, device)
    rows["image"] = to_network_input(rows["image"].unsqueeze(1), cfg.channels_last)
    rows["target"] = rows["target"].unsqueeze(1)
    return rows


def train_epoch(
    model,
    optimizer,
    scaler,
    cfg: TrainConfig,
    data: PreparedData,
    epoch: int,
    device,
    progress: EpochProgress | None = None,
    preemption: PreemptionHandler | None = None,
) -> dict:
    """Train one epoch (``epoch`` counts those done) and return its training metrics, summed over ranks.

    Args:
        progress: where an interrupted epoch stood (an in-epoch checkpoint): its steps are skipped (their
            batches drawn and dropped, so the rest of the stream is the same) and its sums and random state
            taken over; None: from the start.
        preemption: asked after every step: on a preempted node it checkpoints the progress at that step
            boundary and waits for the teardown (it returns only if the run is to train on).
    """
    rank, world_size = _world()
    tasks = train_read_tasks(data.train_slices, epoch, rank, world_size, cfg.seed, cfg.slices_per_read)
    rows = slice_dataset(tasks, cfg, training=True, epoch=epoch)
    model.train()
    torch.manual_seed(stream_seed(cfg.seed, epoch, rank))  # this rank's dropout stream for the epoch
    if progress is not None:
        progress.restore_rng(device)  # where the interrupted epoch's stream stood
    progress = progress or EpochProgress(epoch)
    batches = rows.iter_batches(
        batch_size=cfg.batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * cfg.batch_size,
        local_shuffle_seed=stream_seed(cfg.seed, epoch, rank),
    )
    for step, batch in enumerate(batches):
        if step < progress.steps:
            continue  # done before the interruption
        _train_step(model, optimizer, scaler, cfg, batch, device, progress, (rank, world_size, step))
        if preemption is not None:
            preemption.after_step(progress, device)
    totals = [progress.loss_sum, progress.reconstruction_sum, progress.slices, progress.compute_seconds]
    loss_sum, reconstruction_sum, slices, compute_seconds = _all_reduce_sum(totals, device, world_size)
    return {
        "train_loss": loss_sum / slices,
        "train_reconstruction_loss": reconstruction_sum / slices,
        "train_slices": int(slices),
        "compute_seconds": compute_seconds / world_size,  # per rank, on average
    }


def _train_step(model, optimizer, scaler, cfg: TrainConfig, batch, device, progress: EpochProgress,
                where: tuple[int, int, int]) -> None:  # fmt: skip
    """One optimisation step on ``batch``, added to ``progress``; ``where`` is (rank, world size, step)."""
    rank, world_size, step = where
    started = synchronised_clock(device)
    rows = _network_batch(batch, cfg, device)  # on the trainer's device: counted as its compute
    image, target = rows["image"], rows["target"]
    with autocast(cfg.precision, device):
        result = model(image, return_attention=True)
    # Loss, penalties and metrics in float32, outside the autocast region.
    provides = get_architecture(cfg.model).provides
    parts = training_loss(float32_result(result), target, cfg.active_penalties, provides)
    progress.compute_seconds += synchronised_clock(device) - started
    # Every rank must agree to stop, or the others would wait forever in the next all-reduce.
    finite = _all_reduce_sum([float(torch.isfinite(parts.total).item())], device, world_size)[0]
    if finite < world_size:
        weights_text = ", ".join(f"{k}={v:g}" for k, v in cfg.identifying_weights().items())
        raise TrainingDivergedError(
            f"training diverged at epoch {progress.epoch + 1} step {step + 1}: loss is {parts.total.item()} "
            f"on rank {rank} (lr={cfg.lr}{', ' + weights_text if weights_text else ''}); lower the "
            "learning rate or the penalty weights"
        )
    started = synchronised_clock(device)
    optimisation_step(parts.total, optimizer, scaler)  # fp16: scaled backward, skipped if inf
    progress.compute_seconds += synchronised_clock(device) - started
    n = image.shape[0]
    progress.loss_sum += parts.total.item() * n
    progress.reconstruction_sum += parts.reconstruction.item() * n
    progress.slices += n
    progress.steps += 1


def validate(model, cfg: TrainConfig, batches: Iterable[dict[str, Any]], device) -> dict[str, float]:
    """Validation over whole volumes per rank; per-slice results gathered so any world size agrees.

    Args:
        model: the (DDP-wrapped) network.
        cfg: the run configuration.
        batches: this rank's validation batches (:class:`ray_jobs.data.ValidationBatches`).
        device: where the network is.
    """
    return validation_pass(model, cfg, batches, device)[0]


@torch.no_grad()
def validation_pass(
    model, cfg: TrainConfig, batches: Iterable[dict[str, Any]], device
) -> tuple[dict[str, float], dict[str, dict[str, float]], tuple[np.ndarray, ...]]:
    """:func:`validate`'s metrics, every volume's metrics and the attention coefficients' histograms per
    level (finest first; empty without attention), the same on every rank."""
    _, world_size = _world()
    architecture = get_architecture(cfg.model)
    # The bare module: validation load differs between ranks, and DDP's forward may synchronise. Eager
    # and in float32: validation is a small share of an epoch, and its metrics must not depend on the
    # step's precision or on compilation.
    network = unwrap(model)
    network.eval()
    volumes, mpand, alphas = VolumeMetricAccumulator(), MpandAccumulator(), AttentionStatsAccumulator()
    sums: Counter[str] = Counter()  # per-slice sums of the losses, and the slice count
    for batch in batches:
        rows = _network_batch(batch, cfg, device)
        image, target = rows["image"], rows["target"]
        result = network(image, return_attention=True)
        # Every penalty the network supports, unweighted, for the report; val_loss is the reconstruction.
        loss = training_loss(result, target, {}, architecture.provides, log_inactive=True)
        n = image.shape[0]
        sums["slices"] += n
        sums["val_loss"] += loss.reconstruction.item() * n
        for name, value in loss.penalties.items():
            sums[name] += value.item() * n
        if architecture.has_attention:
            mpand.add([t.cpu() for t in result.skip_norms_before], [t.cpu() for t in result.skip_norms_after])
            alphas.add(result.attention_maps)
        # Metrics on un-normalised images, as fastMRI evaluates.
        mean, std = rows["mean"].view(-1, 1, 1), rows["std"].view(-1, 1, 1)
        outputs = (result.output[:, 0] * std + mean).cpu().numpy()
        targets = (target[:, 0] * std + mean).cpu().numpy()
        volumes.add_slices(batch["fname"], batch["slice_num"], outputs, targets, batch["max_value"])
    merged = VolumeMetricAccumulator(), MpandAccumulator(), AttentionStatsAccumulator()
    totals: Counter[str] = Counter()
    for *states, rank_sums in _all_gather((volumes.state(), mpand.state(), alphas.state(), sums), world_size):
        for accumulator, state in zip(merged, states, strict=True):
            accumulator.merge(state)
        totals.update(rank_sums)
    slices = totals["slices"]
    per_volume = merged[0].per_volume()
    metrics = merged[0].compute()
    out = {
        "val_loss": totals["val_loss"] / slices,
        **{name: metrics[name] for name in metric_table()},
        "val_volumes": int(metrics["num_volumes"]),
        **_mpand_report(merged[1], cfg.num_pool_layers),
    }
    statistics = merged[2].compute()
    out.update(statistics.as_report(cfg.num_pool_layers))
    for name in penalty_terms():
        out[name] = totals[name] / slices if name in totals else math.nan  # NaN: the network has none
    return out, per_volume, statistics.histograms


def _mpand_report(accumulator: MpandAccumulator, num_levels: int) -> dict[str, float]:
    result = accumulator.compute()
    out = {"mpand": result.relative, "mpand_absolute": result.absolute}
    for level in range(num_levels):
        present = level < len(result.absolute_per_level)
        out[f"mpand_level_{level + 1}"] = result.relative_per_level[level] if present else math.nan
        out[f"mpand_absolute_level_{level + 1}"] = result.absolute_per_level[level] if present else math.nan
    return out


def _reported_epoch_zero(run_dir: str | None, rank: int) -> dict[str, float] | None:
    """The run's epoch-0 report if it was made already (rank 0 reads it; every rank gets its answer)."""
    found = read_json(RunLayout(run_dir).initial_report_file) if rank == 0 and run_dir else None
    return _from_rank_zero(found)


def with_initial_ratios(metrics: dict[str, float], history: list[dict[str, float]]) -> dict[str, float]:
    """``<penalty>_vs_init``: each penalty over its value at epoch 0 (NaN without an epoch-0 record)."""
    initial = (
        metrics
        if metrics.get("epoch") == 0
        else history[0]
        if history and history[0].get("epoch") == 0
        else {}
    )
    for name in penalty_terms():
        start = initial.get(name, math.nan)
        metrics[f"{name}_vs_init"] = metrics[name] / start if start and math.isfinite(start) else math.nan
    return metrics


def with_time_to_target(
    metrics: dict[str, float], history: list[dict[str, float]], target: float | None
) -> dict[str, float]:
    """:data:`TARGET_KEYS` of ``metrics`` (the report after ``history``): the first report of the run whose
    validation SSIM reached ``target``, counted from the start of the run."""
    values = dict.fromkeys(TARGET_KEYS, math.nan)
    slices = seconds = 0.0
    for report in [*history, metrics] if target is not None else []:
        slices += report.get("train_slices") or 0.0
        seconds += report.get("epoch_seconds") or 0.0
        if report.get("ssim", math.nan) >= target:
            values = {"target_epoch": report["epoch"], "target_slices": slices, "target_seconds": seconds}
            break
    metrics.update(values)
    return metrics


# ----------------------------------------------------------------------------------------- ASHA's rungs


@dataclass(frozen=True)
class RungWait:
    """What the workers of an ASHA trial wait for after reporting the epoch of one of ASHA's rungs.

    ``ray.train.report`` does not wait for Tune: without this, a trial that ASHA stops at a rung trains on
    until Tune's stop reaches its workers, an epoch or more after the decision. The driver records every
    decision (:mod:`ray_jobs.asha`); rank 0 polls the record and every rank follows its answer.

    Attributes:
        state_file: ASHA's state file, which holds the decisions (local path or URI).
        trial_id: the Tune trial (the Train run's name).
        rungs: ``(epoch, milestone)`` of every rung ASHA decides at (:func:`ray_jobs.asha.rung_epochs`).
        timeout_s: how long to wait for a decision before training on with a warning (a driver that lost
            the result must not hold the workers forever).
        poll_s: how often rank 0 reads the record while waiting.
    """

    state_file: str
    trial_id: str
    rungs: tuple[tuple[int, float], ...]
    timeout_s: float = 300.0
    poll_s: float = 0.25

    def milestone(self, epoch: int) -> float | None:
        """The rung decided on the report of ``epoch``, if any."""
        return next((milestone for at, milestone in self.rungs if at == epoch), None)

    def recorded(self, milestone: float) -> str | None:
        """The decision recorded for this trial at that rung (``continue``, ``stop``), or None yet."""
        try:
            decisions = read_asha_decisions(self.state_file)
        except (StorageError, ValueError):  # unreachable storage for a moment: asked again at the next poll
            return None
        found = (
            d["decision"]
            for d in decisions
            if d.get("trial_id") == self.trial_id and math.isclose(d.get("rung", math.nan), milestone)
        )
        return next(found, None)

    def wait(self, milestone: float) -> str | None:
        """:meth:`recorded`, polled until the decision is there or ``timeout_s`` passed (None)."""
        deadline = time.monotonic() + self.timeout_s
        while (decision := self.recorded(milestone)) is None and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        return decision


# ----------------------------------------------------------------------------------------- the loop


def use_deterministic_algorithms() -> None:
    """Deterministic kernels only (errors on ops without one), and cuDNN without autotuning on GPUs."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class WorkerInputs:
    """What every worker of a run is given, made by :func:`ray_jobs.trainer.build_trainer` (Ray pickles it
    to the workers inside ``train_loop_config``).

    Attributes:
        cfg: the validated run configuration.
        data: the prepared (validated, indexed) data.
        baseline: the zero-filled input's validation metrics, for the progress line (None: not shown).
        image_dir: where rank 0 writes the TensorBoard images (:mod:`ray_jobs.images`); None: nowhere.
        run_dir: the run's directory, where rank 0 writes each epoch's per-volume rows and the epoch-0
            report; None: neither.
        rung_wait: where an ASHA trial's workers wait for the decision at each rung; None: never wait.
        resume_from: the checkpoint directory to resume from where Ray Train has none to give (its record
            of the run was damaged: :func:`ray_jobs.checkpoints.recover_damaged_snapshot`).
    """

    cfg: TrainConfig
    data: PreparedData
    baseline: dict[str, float] | None = None
    image_dir: str | None = None
    run_dir: str | None = None
    rung_wait: RungWait | None = None
    resume_from: str | None = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: the untrained network's report, then one report per epoch.

    Args:
        config: ``{"inputs": WorkerInputs}``, the trainer's ``train_loop_config``.
    """
    inputs: WorkerInputs = config["inputs"]
    _prepare_process(inputs.cfg)
    run = _WorkerRun.start(inputs)
    run.report_epoch_zero()
    if run.start_epoch and not run.continues_after(run.start_epoch, resumed=True):
        return  # resumed at the rung where ASHA stopped the trial
    for epoch in range(run.start_epoch, inputs.cfg.epochs):
        if not run.train_and_report(epoch):
            return  # diverged: the run ends for good
        if not run.continues_after(epoch + 1):
            return  # ASHA stopped the trial at this rung: no epoch after its decision


def _prepare_process(cfg: TrainConfig) -> None:
    """This worker process's logging, plugins, threads, kernels and seed, and its Ray Data settings."""
    log_to_stdout()
    # Unpickling the configuration validates nothing, so nothing has loaded its plugins (architectures,
    # penalties, metrics) in this process yet.
    load_plugins(cfg.plugins)
    # Ray sets OMP_NUM_THREADS to the reserved CPUs; match torch's pool to it deliberately.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if cfg.deterministic:
        use_deterministic_algorithms()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    configure_data_context()  # this process builds every epoch's datasets


def _distributed_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The configuration's network, wrapped for DDP by Ray Train."""
    # The memory format before DDP (it must see the final parameter layout), compilation around DDP.
    network = prepare_network(
        build_model(cfg.model, **cfg.model_hparams()), channels_last=cfg.channels_last, compile=False,
        device=device,
    )  # fmt: skip
    model = ray.train.torch.prepare_model(network, move_to_device=device)  # worker_device(): the switch
    if cfg.compile:
        model = compile_network(model, device=device)  # eager with one warning where it cannot work
    return model


@dataclass
class _WorkerRun:
    """One worker's side of a run: the network and its optimiser, the validation rows, the reports so far."""

    inputs: WorkerInputs
    rank: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    validation_batches: ValidationBatches
    images: ValidationImages
    keys: list[str]  # every report's keys (metric_keys)
    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_progress: EpochProgress | None = None  # where an in-epoch checkpoint left the start epoch
    preemption: PreemptionHandler | None = None  # one per run: a preemption is handled once, not per epoch

    @classmethod
    def start(cls, inputs: WorkerInputs) -> _WorkerRun:
        """The network, resumed from the run's last checkpoint if there is one, and what its epochs use."""
        cfg = inputs.cfg
        rank, world_size = _world()
        device = worker_device()
        check_precision_supported(cfg.precision, device)  # before any step: one line naming the device
        model = _distributed_model(cfg, device)
        optimizer, scheduler = _make_optimizer(model, cfg)
        run = cls(
            inputs, rank, device, model, optimizer, scheduler, make_grad_scaler(cfg.precision, device),
            ValidationBatches(inputs.data, cfg, rank, world_size),
            ValidationImages(inputs.image_dir if rank == 0 else None, cfg.image_every_epochs, cfg.epochs),
            metric_keys(cfg.num_pool_layers),
        )  # fmt: skip
        wait = functools.partial(wait_for_teardown, rank=rank)
        run.preemption = PreemptionHandler(cfg.preemption_check_steps, run._checkpoint_within_epoch, wait)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and inputs.resume_from is not None:
            path, filesystem = ray_storage(inputs.resume_from)
            checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        if checkpoint is not None:
            run.start_epoch, run.history, in_epoch = load_checkpoint(
                checkpoint, model, optimizer, scheduler, run.scaler
            )
            if in_epoch is not None:  # every rank's progress: the world size is the configuration's
                run.resumed_progress = EpochProgress.from_state(in_epoch[rank])
                run._record_preemption(run.resumed_progress, resumed_at=time.time())
        return run

    def record(self, metrics: dict[str, float], per_volume, histograms) -> dict[str, float]:
        """The report of one validated epoch (0: the untrained network), added to the history; rank 0
        writes the epoch's per-volume rows, its progress line and its images."""
        cfg, run_dir = self.inputs.cfg, self.inputs.run_dir
        metrics = {key: metrics.get(key, math.nan) for key in self.keys}
        metrics = with_initial_ratios(metrics, self.history)
        self.history.append(with_time_to_target(metrics, self.history, cfg.target_ssim))
        if self.rank == 0:
            epoch = int(metrics["epoch"])
            if run_dir:  # every volume's metrics, for breakdowns and bootstraps
                rows, file = validation_rows(per_volume, cfg), RunLayout(run_dir).val_volumes_file(epoch)
                write_volume_rows(file, rows, self.inputs.data, "val", epoch)
            logger.info(format_progress(metrics, cfg.epochs, self.inputs.baseline))
            self.images.write(unwrap(self.model), self.validation_batches, epoch, self.device, histograms)
        return metrics

    def report_epoch_zero(self) -> None:
        """Report the untrained network's validation (epoch 0), unless the run has done so already.

        A resumed run has its epoch 0 in the checkpoint's history; one restarted before its first checkpoint
        (a lost node) reported it already and reads it back; a fresh run validates the untrained network.
        """
        if self.history:
            return
        earlier = _reported_epoch_zero(self.inputs.run_dir, self.rank)
        if earlier is not None:
            self.history.append(earlier)
            return
        started = synchronised_clock(self.device)
        val_metrics, per_volume, histograms = validation_pass(
            self.model, self.inputs.cfg, self.validation_batches, self.device
        )
        seconds = synchronised_clock(self.device) - started
        initial = {
            **val_metrics, "epoch": 0, "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
            "train_slices": 0, "diverged": 0.0,
        }  # fmt: skip
        ray.train.report(self.record(initial, per_volume, histograms))  # no checkpoint: nothing was trained
        if self.rank == 0 and self.inputs.run_dir:  # after the report: a restart never reports it twice
            write_json(RunLayout(self.inputs.run_dir).initial_report_file, self.history[0])

    def train_and_report(self, epoch: int) -> bool:
        """Train one epoch (``epoch`` counts those done), validate, report; False when the loss diverged."""
        cfg, device, model = self.inputs.cfg, self.device, self.model
        started = synchronised_clock(device)
        lr = self.optimizer.param_groups[0]["lr"]
        progress, self.resumed_progress = self.resumed_progress, None
        try:
            train_metrics = train_epoch(
                model, self.optimizer, self.scaler, cfg, self.inputs.data, epoch, device, progress,
                self.preemption,
            )  # fmt: skip
        except TrainingDivergedError as err:
            # Ends the run for good: an error would make Ray Train retry max_failures times, and every
            # retry would diverge again. The last report says so (the analysis lists the run as diverged).
            if self.rank == 0:
                logger.error("%s", err)
            ray.train.report({**dict.fromkeys(self.keys, math.nan), "epoch": epoch + 1, "diverged": 1.0})
            return False
        train_seconds = synchronised_clock(device) - started
        self.scheduler.step()
        val_metrics, per_volume, histograms = validation_pass(model, cfg, self.validation_batches, device)
        epoch_seconds = synchronised_clock(device) - started
        report = {
            "epoch": epoch + 1,  # epochs completed; ASHA's time attribute
            "lr": lr,
            "epoch_seconds": epoch_seconds,
            # Forward, backward and optimiser steps over the epoch's wall time (pipeline and validation are
            # the rest): how much of the reserved CPUs or GPUs go to training.
            "compute_fraction": train_metrics.pop("compute_seconds") / epoch_seconds,
            "diverged": 0.0,
            "train_slices_per_second": train_metrics["train_slices"] / train_seconds,
            **train_metrics,
            **val_metrics,
        }
        self._report_with_checkpoint(self.record(report, per_volume, histograms), epoch)
        return True

    def continues_after(self, epoch: int, resumed: bool = False) -> bool:
        """Whether to train on after the report of ``epoch`` (epochs done): False when the run reached its
        target SSIM with ``stop_at_target``, or when ASHA stopped the trial at the rung decided on that
        report. Every rank follows rank 0's reading of the decision.

        A run resumed at a rung's epoch (a restarted worker or driver) takes the decision made before; where
        there is none, Tune never decided on that report (its driver died first), so it is reported again.
        """
        wait, cfg = self.inputs.rung_wait, self.inputs.cfg
        if cfg.stop_at_target and not math.isnan(self.history[-1]["target_epoch"]):
            if self.rank == 0:
                logger.info("reached the target SSIM %g at epoch %d: no further epoch", cfg.target_ssim,
                            self.history[-1]["target_epoch"])  # fmt: skip
            return False
        milestone = wait.milestone(epoch) if wait is not None and epoch < cfg.epochs else None
        if milestone is None:
            return True
        decision = _from_rank_zero(wait.recorded(milestone) if self.rank == 0 else None) if resumed else None
        if resumed and decision is None:
            ray.train.report(self.history[-1])
        if decision is None:
            decision = _from_rank_zero(wait.wait(milestone) if self.rank == 0 else None)
        if self.rank == 0 and decision is None:
            logger.warning(
                "no ASHA decision for trial %s at its rung %g (epoch %d) after %g s: training on (the driver "
                "may have lost the result; Tune still stops the trial if ASHA does)",
                wait.trial_id, milestone, epoch, wait.timeout_s,
            )  # fmt: skip
        elif self.rank == 0 and decision == DECISION_STOP:
            logger.info("ASHA stopped trial %s at epoch %d (rung %g): no further epoch", wait.trial_id, epoch,
                        milestone)  # fmt: skip
        return decision != DECISION_STOP

    def _checkpoint_within_epoch(self, progress: EpochProgress, info: Any) -> None:
        """A node of the run is being preempted: checkpoint at this step boundary, with every rank's
        progress, and report it (not an epoch: Tune never sees it)."""
        states = _all_gather(progress.state(), _world()[1])
        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                save_checkpoint(
                    directory, self.model, self.optimizer, self.scheduler, progress.epoch - 1, self.history,
                    self.scaler, self.inputs.cfg.model_spec(), in_epoch=states,
                )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report({**self.history[-1], IN_EPOCH_KEY: 1.0}, checkpoint=checkpoint)
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        self._record_preemption(progress, nodes=list(info.preempted_node_ids), deadline=deadline,
                                checkpointed_at=time.time())  # fmt: skip

    def _record_preemption(self, progress: EpochProgress, **values: Any) -> None:
        """Rank 0 adds ``values`` to the run's record of the preemption checkpointed at ``progress``'s step:
        at the checkpoint its nodes and deadline, on resuming elsewhere when (the steps lost are the
        difference between the step checkpointed and the step resumed at: none, by construction)."""
        if self.rank != 0 or not self.inputs.run_dir:
            return
        file = RunLayout(self.inputs.run_dir).preemption_file(progress.epoch, progress.steps)
        try:
            first = {"epoch": progress.epoch, "step": progress.steps, "slices": progress.slices}
            record = read_json(file) or first
            write_json(file, {**record, **values})
        except StorageError as err:  # the record is bookkeeping: the run goes on without it
            logger.warning("could not record the preemption at %s: %s", file, err)

    def _report_with_checkpoint(self, metrics: dict[str, float], epoch: int) -> None:
        """One epoch's report, with rank 0's checkpoint of the epoch (the other ranks' reports carry none)."""
        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                save_checkpoint(
                    directory, self.model, self.optimizer, self.scheduler, epoch, self.history, self.scaler,
                    self.inputs.cfg.model_spec(),
                )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)
