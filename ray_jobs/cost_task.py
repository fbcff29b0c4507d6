"""The model-cost measurement (:mod:`mri_models.model_cost`) as one Ray task on a node like the workers'.

The task reserves what one training worker reserves (its CPUs, and a GPU when the run uses GPUs) and uses
as many torch threads, so the costs describe the hardware the study trains on, not the job's driver.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from mri_models.model_cost import measure_costs
from ray_jobs.config import TrainConfig
from ray_jobs.trainer import resolve_use_gpu


def _measure(
    arms: list[tuple[str, dict[str, float]]],
    hparams: dict[str, Any],
    image_size: tuple[int, int],
    batch_size: int,
    use_gpu: bool,
    threads: int,
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu else "cpu"
    return [cost.as_row() for cost in measure_costs(arms, hparams, image_size, batch_size, device)]


def measure_on_cluster(configs: list[TrainConfig], image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """The costs of every distinct arm of ``configs`` (same hyper-parameters as the first), side by side.

    Args:
        configs: the trial configurations of a study (one row per distinct model and penalty weights).
        image_size: the network input's ``(H, W)`` (the data's reconstruction size).

    Returns:
        One row per arm, as :meth:`mri_models.model_cost.ModelCost.as_row`.
    """
    arms: dict[str, tuple[str, dict[str, float]]] = {}
    for cfg in configs:
        arms.setdefault(cfg.arm.name, (cfg.model, dict(cfg.penalty_weights)))
    reference = configs[0]
    use_gpu = resolve_use_gpu(reference)
    task = ray.remote(_measure).options(
        num_cpus=reference.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=1
    )
    return ray.get(
        task.remote(
            list(arms.values()),
            reference.model_hparams(),
            tuple(image_size),
            reference.batch_size,
            use_gpu,
            max(1, int(reference.cpus_per_worker)),
        )
    )
