"""Train one configuration with Ray Train DDP over the Ray Data slice stream.

``train_loop_per_worker`` runs on every worker: model from the registry wrapped for DDP, fastMRI's
optimiser (RMSprop + StepLR) or Adam, one epoch of training over the rank's rows, validation, and one
``ray.train.report`` per epoch with every metric and a checkpoint from rank 0. ``build_trainer`` is what the
Tune trials reuse. Run ``python -m ray_jobs.train --help`` for the command line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mri_models.losses import sparse_attention_loss
from mri_models.metrics import MpandAccumulator, VolumeMetricAccumulator, slice_metrics
from mri_models.models import build_model
from ray_jobs.config import TrainConfig
from ray_jobs.data import PreparedData, slice_dataset, train_read_tasks, val_read_tasks

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or Inf."""


def metric_keys(num_pool_layers: int) -> list[str]:
    """Every key of every epoch's report, in order (the same for all models: NaN where undefined)."""
    levels = [f"mpand_level_{level}" for level in range(1, num_pool_layers + 1)]
    return [
        "epoch",
        "train_loss",
        "train_reconstruction_loss",
        "val_loss",
        "nmse",
        "psnr",
        "ssim",
        "mpand",
        *levels,
        "attention_l1",
        "lr",
        "epoch_seconds",
        "train_slices_per_second",
        "train_slices",
        "val_volumes",
    ]


# ----------------------------------------------------------------------------------------- worker side


def _world() -> tuple[int, int]:
    import ray.train

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


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step_size, cfg.lr_gamma)
    return optimizer, scheduler


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Ray hands out read-only arrays; torch.tensor copies, which torch requires before any in-place use.
    image = torch.tensor(batch["image"]).unsqueeze(1).to(device)
    target = torch.tensor(batch["target"]).unsqueeze(1).to(device)
    return image, target


def _train_epoch(
    model, optimizer, cfg: TrainConfig, data: PreparedData, epoch: int, device
) -> dict[str, float]:
    rank, world_size = _world()
    tasks = train_read_tasks(data.train_slices, epoch, rank, world_size, cfg.seed, cfg.slices_per_read)
    rows = slice_dataset(tasks, cfg, training=True, epoch=epoch)
    model.train()
    loss_sum = reconstruction_sum = 0.0
    slices = 0
    for step, batch in enumerate(
        rows.iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * cfg.batch_size
        )
    ):
        image, target = _to_device(batch, device)
        result = model(image, return_attention=cfg.uses_attention)
        output, maps = (result.output, result.attention_maps) if cfg.uses_attention else (result, ())
        parts = sparse_attention_loss(output, target, maps, cfg.gamma)
        # Every rank must agree to stop, or the others would wait forever in the next all-reduce.
        finite = _all_reduce_sum([float(torch.isfinite(parts.total).item())], device, world_size)[0]
        if finite < world_size:
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1} step {step + 1}: loss is {parts.total.item()} "
                f"on rank {rank} (lr={cfg.lr}, gamma={cfg.gamma}); lower the learning rate or gamma"
            )
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        n = image.shape[0]
        loss_sum += parts.total.item() * n
        reconstruction_sum += parts.reconstruction.item() * n
        slices += n
    loss_sum, reconstruction_sum, slices = _all_reduce_sum(
        [loss_sum, reconstruction_sum, slices], device, world_size
    )
    return {
        "train_loss": loss_sum / slices,
        "train_reconstruction_loss": reconstruction_sum / slices,
        "train_slices": int(slices),
    }


@torch.no_grad()
def _validate(model, cfg: TrainConfig, data: PreparedData, device) -> dict[str, float]:
    """Validation over whole volumes per rank; per-slice results gathered so any world size agrees."""
    rank, world_size = _world()
    tasks = val_read_tasks(data.val_slices, rank, world_size, cfg.slices_per_read)
    # The bare module: validation load differs between ranks, and DDP's forward may synchronise.
    network = getattr(model, "module", model)
    network.eval()
    volumes, mpand = VolumeMetricAccumulator(), MpandAccumulator()
    loss_sum, attention_sum, slices = 0.0, 0.0, 0
    for batch in slice_dataset(tasks, cfg, training=False).iter_batches(
        batch_size=cfg.batch_size, batch_format="numpy"
    ):
        image, target = _to_device(batch, device)
        result = network(image, return_attention=True)
        loss = sparse_attention_loss(result.output, target, result.attention_maps, 0.0)
        n = image.shape[0]
        loss_sum += loss.reconstruction.item() * n
        if cfg.uses_attention:
            attention_sum += loss.attention_l1.item() * n
            mpand.add([t.cpu() for t in result.skip_norms_before], [t.cpu() for t in result.skip_norms_after])
        # Metrics on un-normalised images, as fastMRI evaluates.
        mean = torch.as_tensor(batch["mean"]).view(-1, 1, 1).to(device)
        std = torch.as_tensor(batch["std"]).view(-1, 1, 1).to(device)
        outputs = (result.output[:, 0] * std + mean).cpu().numpy()
        targets = (target[:, 0] * std + mean).cpu().numpy()
        for i in range(n):
            max_value = float(batch["max_value"][i])
            volumes.add(
                batch["fname"][i],
                int(batch["slice_num"][i]),
                slice_metrics(outputs[i], targets[i], max_value),
                max_value,
            )
        slices += n
    merged_volumes, merged_mpand, totals = VolumeMetricAccumulator(), MpandAccumulator(), np.zeros(3)
    gathered = _all_gather((volumes.state(), mpand.state(), [loss_sum, attention_sum, slices]), world_size)
    for volume_state, mpand_state, counts in gathered:
        merged_volumes.merge(volume_state)
        merged_mpand.merge(mpand_state)
        totals += counts
    loss_sum, attention_sum, slices = totals
    metrics = merged_volumes.compute()
    mpand_result = merged_mpand.compute()
    out = {
        "val_loss": loss_sum / slices,
        "nmse": metrics["nmse"],
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "val_volumes": int(metrics["num_volumes"]),
        "mpand": mpand_result.mean,
        "attention_l1": attention_sum / slices if cfg.uses_attention else math.nan,
    }
    for level in range(cfg.num_pool_layers):
        out[f"mpand_level_{level + 1}"] = (
            mpand_result.per_level[level] if level < len(mpand_result.per_level) else math.nan
        )
    return out


def _save_checkpoint(directory: str, model, optimizer, scheduler, epoch: int, history: list[dict]) -> None:
    network = getattr(model, "module", model)
    state = {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
    }
    # Plain tensors, dicts and numbers only, so ``torch.load(weights_only=True)`` can read it.
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(history, f)


def _load_checkpoint(checkpoint, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore a run; returns the next epoch and the metric history so far."""
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            history = json.load(f)
    getattr(model, "module", model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1, history


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    Args:
        config: ``{"train": TrainConfig as a dict, "data": PreparedData}``.
    """
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    data: PreparedData = config["data"]
    rank, _ = _world()
    # Ray sets OMP_NUM_THREADS to the reserved CPUs; match torch's pool to it deliberately.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(cfg.model, **cfg.model_hparams())
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank dropout streams
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer, scheduler = _make_optimizer(model, cfg)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, history = _load_checkpoint(checkpoint, model, optimizer, scheduler)

    keys = metric_keys(cfg.num_pool_layers)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = _train_epoch(model, optimizer, cfg, data, epoch, device)
        train_seconds = time.perf_counter() - started
        scheduler.step()
        val_metrics = _validate(model, cfg, data, device)
        metrics = {
            "epoch": epoch + 1,  # epochs completed; ASHA's time attribute
            "lr": lr,
            "epoch_seconds": time.perf_counter() - started,
            "train_slices_per_second": train_metrics["train_slices"] / train_seconds,
            **train_metrics,
            **val_metrics,
        }
        metrics = {key: metrics[key] for key in keys}
        history.append(metrics)
        if rank == 0:
            print(format_progress(metrics, cfg.epochs), flush=True)
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                _save_checkpoint(directory, model, optimizer, scheduler, epoch, history)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
            )


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """One line per epoch for the job log."""
    line = (
        f"epoch {metrics['epoch']}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  NMSE {metrics['nmse']:.4f}  PSNR {metrics['psnr']:.2f}  "
        f"SSIM {metrics['ssim']:.4f}"
    )
    if not math.isnan(metrics["mpand"]):
        line += f"  MPAND {metrics['mpand']:.3f}"
    return line + f"  ({metrics['epoch_seconds']:.1f} s, {metrics['train_slices_per_second']:.1f} slices/s)"


# ----------------------------------------------------------------------------------------- driver side

RUN_CONFIG_FILE = "train_config.json"
METRICS_CSV = "metrics.csv"
# Keys a rerun of the same run name may change: it extends or re-resources the same experiment.
_RESUMABLE_CHANGES = {
    "epochs",
    "num_workers",
    "cpus_per_worker",
    "data_cpus_per_task",
    "use_gpu",
    "max_failures",
}


def resolve_use_gpu(cfg: TrainConfig) -> bool:
    """``cfg.use_gpu``, or whether the connected cluster has GPUs when it is None."""
    import ray

    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def check_cluster_fits(cfg: TrainConfig, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> None:
    """Fail early when the workers would not fit or would leave no CPU for the Ray Data tasks.

    Args:
        cfg: the run configuration.
        concurrent_runs: how many such runs share the cluster at once (Tune trials).
        extra_cpus: CPUs held besides the workers (for example the Tune trial functions).
    """
    import ray

    from ray_jobs.config import ConfigError

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cfg.use_gpu and concurrent_runs * cfg.num_workers > gpus:
        # GPUs requested explicitly (the paper profile) on a cluster that has too few right now: an
        # autoscaling cluster (cluster.yaml, min_workers 0) adds GPU nodes when the trials ask for them.
        print(
            f"note: {concurrent_runs * cfg.num_workers} GPU worker(s) requested, the cluster has {gpus:g} "
            "GPU(s) now; waiting for the autoscaler to add GPU nodes",
            flush=True,
        )
        return
    workers_cpus = concurrent_runs * cfg.num_workers * cfg.cpus_per_worker
    needed = workers_cpus + extra_cpus + cfg.data_cpus_per_task
    if needed > cpus + 1e-9:
        raise ConfigError(
            f"{concurrent_runs} run(s) x {cfg.num_workers} worker(s) x {cfg.cpus_per_worker} CPU"
            f"{f' + {extra_cpus} CPU for trials' if extra_cpus else ''} + {cfg.data_cpus_per_task} CPU for "
            f"Ray Data needs {needed:g} CPUs but the cluster has {cpus:g}: lower num_workers or "
            "cpus_per_worker (Ray Data starves and training hangs when the workers hold every CPU)"
        )
    if resolve_use_gpu(cfg) and concurrent_runs * cfg.num_workers > gpus:
        raise ConfigError(
            f"use_gpu with {concurrent_runs * cfg.num_workers} worker(s) needs as many GPUs; "
            f"the cluster has {gpus:g}"
        )


def build_trainer(
    cfg: TrainConfig, data: PreparedData, name: str, storage_path: str, callbacks: list | None = None
):
    """A TorchTrainer for one configuration; the same (storage_path, name) resumes that run.

    Args:
        cfg: the validated configuration.
        data: the prepared (validated, indexed) data.
        name: run name; deterministic per configuration so a retried run resumes its own checkpoints.
        storage_path: local path, NFS or s3:// URI shared by all nodes.
        callbacks: Ray Train callbacks (Tune's report callback in a sweep).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "data": data},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            # The best (by SSIM) and, always, the latest checkpoint, which resuming needs.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="ssim", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or [],
        ),
    )


def claim_run_name(cfg: TrainConfig, storage_path: str, name: str) -> bool:
    """Record the run's configuration, or check that an existing run of that name has the same one.

    Returns:
        True when the run already existed (the trainer will resume it).

    Raises:
        ConfigError: the name belongs to a run with a different configuration.
    """
    from ray_jobs import storage
    from ray_jobs.config import ConfigError

    path = storage.join(storage_path, name, RUN_CONFIG_FILE)
    current = cfg.model_dump(mode="json")
    if storage.exists(path):
        previous = json.loads(storage.read_text(path))
        changed = {k for k in set(previous) | set(current) if previous.get(k) != current.get(k)}
        if changed - _RESUMABLE_CHANGES:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed))
            raise ConfigError(
                f"run {name!r} under {storage_path} was started with a different configuration ({details}); "
                "choose another --name"
            )
        storage.write_text(path, json.dumps(current, indent=2))
        return True
    storage.write_text(path, json.dumps(current, indent=2))
    return False


def history_from_checkpoint(checkpoint) -> list[dict]:
    """The per-epoch metrics stored with a checkpoint."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            return json.load(f)


def history_csv(history: list[dict]) -> str:
    """Per-epoch metrics as CSV text (columns in report order)."""
    import pandas as pd

    return pd.DataFrame(history).to_csv(index=False)


def default_run_name(cfg: TrainConfig, profile: str) -> str:
    gamma = f"-gamma{cfg.gamma:g}" if cfg.model == "sparse_attention_unet" else ""
    return f"{cfg.model}{gamma}-{profile}-seed{cfg.seed}"


def default_storage() -> str:
    return os.environ.get("MRI_SWEEPS_STORAGE", str(Path.home() / "ray_results"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict, values parsed as YAML (``lr=1e-3``, ``accelerations=[4,8]``)."""
    import yaml

    from ray_jobs.config import ConfigError

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        values[key.strip().replace("-", "_")] = yaml.safe_load(text)
    return values


def add_set_argument(parser, help_text: str) -> None:
    """The repeatable ``--set KEY=VALUE`` flag shared by every entry point (see :func:`parse_overrides`)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.train",
        description="Train one configuration with Ray Train DDP on the running Ray cluster (or a local one).",
    )
    parser.add_argument(
        "--model", choices=["unet", "attention_unet", "sparse_attention_unet"], default="unet"
    )
    parser.add_argument("--gamma", type=float, help="attention-sparsity weight (sparse_attention_unet)")
    parser.add_argument("--profile", choices=["smoke", "cpu", "paper"], default="cpu")
    parser.add_argument(
        "--data-root", type=Path, help="fastMRI data root (default: the profile's synthetic set)"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument(
        "--storage", default=None, help="results directory or s3:// URI (default ~/ray_results)"
    )
    parser.add_argument(
        "--name", help="run name; rerunning a name resumes it (default from model, gamma, seed)"
    )
    add_set_argument(parser, "any TrainConfig field, e.g. --set lr=3e-4 --set drop_prob=0.1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate everything, then train; exit code 2 for bad configuration or data, 1 for a failed run."""
    import ray
    import ray.train

    from mri_models.data.validate import DataValidationError
    from ray_jobs import storage
    from ray_jobs.config import ConfigError, make_train_config, profile_defaults
    from ray_jobs.data import ensure_synthetic_data, prepare_data

    args = _parse_args(argv)
    try:
        values = profile_defaults(args.profile)
        flags = {"model": args.model, "gamma": args.gamma, "epochs": args.epochs, "num_workers": args.workers}
        values.update({key: value for key, value in flags.items() if value is not None})
        values.update(parse_overrides(args.overrides))
        cfg = make_train_config(values)
        root = args.data_root or ensure_synthetic_data(args.profile)
        data = prepare_data(cfg, Path(root))
        name = args.name or default_run_name(cfg, args.profile)
        storage_path = args.storage or default_storage()
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
        check_cluster_fits(cfg)
        resumed = claim_run_name(cfg, storage_path, name)
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        print(f"error: {err}", flush=True)
        return 2
    print(
        f"{'resuming' if resumed else 'starting'} run {name!r}: {cfg.model} (gamma {cfg.gamma:g}), "
        f"{cfg.num_workers} worker(s), {len(data.train_slices)} train / {len(data.val_slices)} val slices "
        f"from {data.root}, results in {storage.join(storage_path, name)}",
        flush=True,
    )
    try:
        result = build_trainer(cfg, data, name, storage_path).fit()
    except ray.train.TrainingFailedError as err:
        print(f"run {name!r} failed: {err}", flush=True)
        return 1
    history = history_from_checkpoint(result.checkpoint)
    csv_path = storage.join(storage_path, name, METRICS_CSV)
    storage.write_text(csv_path, history_csv(history))
    final = history[-1]
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if not math.isnan(v)))
    print(f"per-epoch metrics written to {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
