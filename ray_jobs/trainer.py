"""Building and checking one training run: cluster fit, the TorchTrainer, the run's name and its record.

Shared by the single-run command line (:mod:`ray_jobs.train`) and the Tune trials (:mod:`ray_jobs.tune`).
A run lives under ``<storage>/<name>`` (:class:`mri_models.experiment.RunLayout`); the same storage and name
resume it, so names are deterministic per configuration and a name is never reused for another one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from mri_models import experiment, storage
from mri_models.metrics import primary_objective
from ray_jobs.checkpoints import recover_damaged_snapshot
from ray_jobs.config import ConfigError, TrainConfig, make_train_config
from ray_jobs.data import PreparedData
from ray_jobs.worker import RungWait, WorkerInputs, gpus_as_cpu, train_loop_per_worker

logger = logging.getLogger(__name__)

# Keys a rerun of the same run name may change: it extends or re-resources the same experiment.
RESUMABLE_CHANGES = {
    "epochs",
    "num_workers",
    "cpus_per_worker",
    "data_cpus_per_task",
    "use_gpu",
    "max_failures",
    "val_cache_mb",
    "data_cache_gb",  # where the bytes come from, not which
    "data_cache_dir",
    "image_every_epochs",  # monitoring only
}


def default_storage() -> str:
    """Where runs and experiments go unless told: ``$MRI_SWEEPS_STORAGE``, else ``~/ray_results``."""
    return os.environ.get("MRI_SWEEPS_STORAGE", str(Path.home() / "ray_results"))


def default_run_name(cfg: TrainConfig, profile: str) -> str:
    """``<model>[-<weight key><value>...][-<option><value>...]-<profile>-seed<seed>``.

    For example ``sparse_attention_unet-gamma0.0001-psi_normnone-cpu-seed0``: the weights shown are the
    active ones and a variant's own (gamma, even at 0), the architecture options those off their default,
    so every configuration that trains differently has its own name.
    """
    weights = "".join(f"-{key}{value:g}" for key, value in cfg.identifying_weights().items())
    options = "".join(f"-{key}{value}" for key, value in cfg.identifying_options().items())
    return f"{cfg.model}{weights}{options}-{profile}-seed{cfg.seed}"


def connect() -> None:
    """Connect to the cluster at ``$RAY_ADDRESS`` (or auto-detect one, else start a local one).

    Raises:
        ConfigError: in one line, naming the address and what to do, when nothing answers there (checked
            with a plain TCP connection first: Ray itself retries for minutes) or the cluster refuses the
            client (with Ray 2.60's token authentication, a missing or wrong token).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    host, _, port = (address or "").removeprefix("http://").rpartition(":")
    if address and address not in ("auto", "local") and "://" not in address.removeprefix("http://"):
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except (OSError, ValueError):
            raise ConfigError(
                f"no Ray cluster answers at RAY_ADDRESS={address}: start one with `ray start --head` and set "
                "RAY_ADDRESS to the address it prints, or unset RAY_ADDRESS to run on a local cluster"
            ) from None
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError:
        raise ConfigError(
            f"the Ray cluster at {address or 'the auto-detected address'} refused this client: with token "
            "authentication (Ray 2.60's default) set RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        ) from None


def resolve_use_gpu(cfg: TrainConfig) -> bool:
    """``cfg.use_gpu``, or whether the connected cluster has GPUs when it is None."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def check_cluster_fits(cfg: TrainConfig, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> None:
    """Fail early when the workers would not fit or would leave no CPU for the Ray Data tasks.

    Args:
        cfg: the run configuration.
        concurrent_runs: how many such runs share the cluster at once (Tune trials).
        extra_cpus: CPUs held besides the workers (for example the Tune trial functions).

    Raises:
        ConfigError: with the arithmetic, when the cluster is too small.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    workers = concurrent_runs * cfg.num_workers
    gpus_needed = workers * cfg.gpus_per_worker
    if cfg.use_gpu and gpus_needed > gpus + 1e-9:
        # GPUs requested explicitly (the paper profile) on a cluster that has too few right now: an
        # autoscaling cluster (cluster.yaml, min_workers 0) adds GPU nodes when the trials ask for them.
        logger.info(
            "note: %d GPU worker(s) of %g GPU requested, the cluster has %g GPU(s) now; waiting for the "
            "autoscaler to add GPU nodes",
            workers,
            cfg.gpus_per_worker,
            gpus,
        )
        return
    needed = workers * cfg.cpus_per_worker + extra_cpus + cfg.data_cpus_per_task
    if needed > cpus + 1e-9:
        raise ConfigError(
            f"{concurrent_runs} run(s) x {cfg.num_workers} worker(s) x {cfg.cpus_per_worker} CPU"
            f"{f' + {extra_cpus} CPU for trials' if extra_cpus else ''} + {cfg.data_cpus_per_task} CPU for "
            f"Ray Data needs {needed:g} CPUs but the cluster has {cpus:g}: lower num_workers or "
            "cpus_per_worker (Ray Data starves and training hangs when the workers hold every CPU)"
        )
    if resolve_use_gpu(cfg) and gpus_needed > gpus + 1e-9:
        raise ConfigError(
            f"use_gpu with {workers} worker(s) x {cfg.gpus_per_worker:g} GPU needs {gpus_needed:g} GPUs; the "
            f"cluster has {gpus:g}"
        )


def node_worker_slots(cfg: TrainConfig, driver_cpus: float = 0.0, gpus: bool = False) -> int:
    """Training workers the live nodes hold at once, each node keeping room for one Ray Data task.

    Ray places a run's workers (and a trial's driver, ``driver_cpus``, beside them) node by node, and a Ray
    Data read task runs only where ``data_cpus_per_task`` CPUs are free on one node: CPUs free across the
    cluster but scattered in smaller pieces leave every trial waiting for data forever. Counting a driver
    with every worker keeps each node's room whatever the placement. On GPUs (``gpus``) a node holds no
    more workers than its GPUs over ``gpus_per_worker``, and each trial budgets a read task of its own:
    packed trials each stream their own data, and a GPU step is over before a shared task could feed two.
    """
    per_worker = cfg.cpus_per_worker + driver_cpus
    if gpus:
        per_worker += cfg.data_cpus_per_task / cfg.num_workers
    slots = 0
    for node in ray.nodes():
        resources = node.get("Resources", {}) if node.get("Alive") else {}
        cpus = resources.get("CPU", 0.0)
        if cpus < per_worker + cfg.data_cpus_per_task - 1e-9:
            continue
        fit = int((cpus - cfg.data_cpus_per_task + 1e-9) // per_worker)
        if gpus:
            fit = min(fit, int(resources.get("GPU", 0.0) / cfg.gpus_per_worker + 1e-9))
        slots += fit
    return slots


def build_trainer(
    cfg: TrainConfig,
    data: PreparedData,
    name: str,
    storage_path: str,
    callbacks: list | None = None,
    baseline: dict[str, float] | None = None,
    image_dir: str | None = None,
    rung_wait: RungWait | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one configuration; the same (storage_path, name) resumes that run.

    Args:
        cfg: the validated configuration.
        data: the prepared (validated, indexed) data.
        name: run name; deterministic per configuration so a retried run resumes its own checkpoints.
        storage_path: local path, NFS or s3:// URI shared by all nodes.
        callbacks: Ray Train callbacks (Tune's report callback in a sweep).
        baseline: the zero-filled input's validation metrics, for the gain in the progress lines.
        image_dir: where the validation images for TensorBoard go (:mod:`ray_jobs.images`); default the
            run's own ``images`` directory.
        rung_wait: where the workers of an ASHA trial wait for the scheduler's decision at each rung; None
            (single runs, FIFO sweeps): they never wait.
    """
    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    run_dir = storage.join(storage_path, name)
    images = image_dir or experiment.RunLayout(run_dir).images_dir
    resume_from = recover_damaged_snapshot(run_dir)  # before Ray Train reads it
    inputs = WorkerInputs(cfg, data, baseline, images, run_dir, rung_wait, resume_from)
    objective = primary_objective()
    root, filesystem = storage.ray_storage(storage_path)  # S3: checkpoint uploads retry as our writes do
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},  # Ray Train hands the worker function a dict
        # NCCL on GPUs (Ray's default), gloo under the test switch that trains "GPU" workers on the CPU.
        torch_config=TorchConfig(backend="gloo") if use_gpu and gpus_as_cpu() else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=filesystem,
            # The best (by the primary metric) and, always, the latest checkpoint, which resuming needs.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=objective.metric,
                checkpoint_score_order=objective.mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or [],
        ),
    )


def claim_run_name(cfg: TrainConfig, storage_path: str, name: str) -> bool:
    """Record the run's resolved configuration, or check an existing run of that name has the same one.

    The record (``train_config.json`` in the run's directory) is also what the analysis reads to know a
    trial's configuration.

    Returns:
        True when the run already existed (the trainer will resume it).

    Raises:
        ConfigError: the name belongs to a run with a different configuration.
    """
    run = experiment.RunLayout(storage.join(storage_path, name))
    current = cfg.model_dump(mode="json")
    previous = storage.read_json(run.config_file)
    if previous is not None:
        # Through TrainConfig, so keys registered since (a new penalty weight) take their defaults.
        previous = make_train_config(previous).model_dump(mode="json")
        changed = {k for k in set(previous) | set(current) if previous.get(k) != current.get(k)}
        if changed - RESUMABLE_CHANGES:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed))
            raise ConfigError(
                f"run {name!r} under {storage_path} was started with a different configuration ({details}); "
                "choose another --name"
            )
    storage.write_text(run.config_file, json.dumps(current, indent=2))
    return previous is not None
