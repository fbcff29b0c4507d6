"""A preempted node's runs checkpoint within the epoch, then wait for Ray Train to move them.

A spot node gets a warning before it is reclaimed (AWS: two minutes). Ray learns of it as a node drain with
reason ``PREEMPTION`` and a deadline (``ray_jobs.spot_guard`` drains its node on the warning; KubeRay and
the autoscaler do the same). Every ``preemption_check_steps`` steps the workers of a run ask Ray Train
whether a node of theirs is being drained (``ray.train.get_preemption_info``, a collective: every rank asks
at the same steps and gets the same answer, so no rank goes on into an all-reduce the others left). On a
drain they save a checkpoint at that step boundary, with everything the rest of the epoch needs to go on
exactly as if nothing happened (:class:`EpochProgress`), report it, and wait: Ray Train tears the group
down at the deadline, or when the node goes, and restarts it elsewhere from that checkpoint, counting the
restart against ``FailureConfig.max_preemption_failures`` (unlimited) instead of ``max_failures``. The
resumed epoch skips the steps done and trains the rest with the same data, dropout and optimiser state.

The in-epoch report carries :data:`IN_EPOCH_KEY`: it is a checkpoint, not an epoch, so it never reaches
Tune (:class:`ray_jobs.tune.EpochReports`), its schedulers or ``result.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch

logger = logging.getLogger(__name__)

IN_EPOCH_KEY = "in_epoch_checkpoint"  # in the metrics of a report whose checkpoint is within an epoch
# After the deadline, how long a worker that is still alive waits before it trains on (the drain was
# cancelled, or Ray Train did not tear the group down): the steps since the checkpoint are then not lost.
AFTER_DEADLINE_S = 60.0
NO_DEADLINE_WAIT_S = 600.0  # a drain without a deadline: how long to wait for the teardown


@dataclass
class EpochProgress:
    """Where a rank is within an epoch: what it has trained and summed so far, and its random state.

    Attributes:
        epoch: the epoch in progress (0-based: the epochs done before it).
        steps: the steps of this epoch done (the next one is ``steps``).
        loss_sum: this rank's sum over its slices of the total loss so far.
        reconstruction_sum: the same of the reconstruction loss.
        slices: this rank's slices so far.
        compute_seconds: this rank's forward, backward and optimiser time so far.
        rng_state: this rank's torch CPU generator state (dropout) after ``steps`` steps.
        cuda_rng_state: its CUDA generator state, on a GPU.
    """

    epoch: int
    steps: int = 0
    loss_sum: float = 0.0
    reconstruction_sum: float = 0.0
    slices: int = 0
    compute_seconds: float = 0.0
    rng_state: torch.Tensor | None = None
    cuda_rng_state: torch.Tensor | None = None

    def capture_rng(self, device: torch.device) -> None:
        self.rng_state = torch.get_rng_state()
        self.cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore_rng(self, device: torch.device) -> None:
        if self.rng_state is not None:
            torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda_rng_state, device)

    def state(self) -> dict[str, Any]:
        """Plain values and tensors (``torch.load(weights_only=True)`` reads them)."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochProgress:
        return cls(**state)


def _ray_train_preemption() -> Any:
    return ray.train.get_preemption_info()


@dataclass
class PreemptionHandler:
    """What the workers of a run do about preemption at each step boundary.

    Attributes:
        every_steps: ask after every this many steps, counted over epochs (0: never); the same steps on
            every rank.
        checkpoint: saves and reports the in-epoch checkpoint of the progress so far (a collective).
        wait: waits for the teardown after the checkpoint; returns if the run is to train on.
        info: the preemption info, the same on every rank (a collective), or None: Ray Train's.
    """

    every_steps: int
    checkpoint: Callable[[EpochProgress, Any], None]
    wait: Callable[[Any], None]
    info: Callable[[], Any] = _ray_train_preemption
    _handled: Any = field(default=None, init=False)
    # Steps since the last question, over epochs: an epoch shorter than every_steps is still asked about.
    # The same on every rank (each trains the same steps; a restarted group starts them all at 0).
    _since: int = field(default=0, init=False)

    def after_step(self, progress: EpochProgress, device: torch.device) -> None:
        """Ask, when due, and on a new preemption checkpoint the progress and wait."""
        if self.every_steps <= 0:
            return
        self._since += 1
        if self._since < self.every_steps:
            return
        self._since = 0
        info = self.info()
        if info is None or info == self._handled:  # once per preemption: a cancelled drain stays set
            return
        self._handled = info
        progress.capture_rng(device)
        self.checkpoint(progress, info)
        self.wait(info)


def wait_for_teardown(info: Any, rank: int) -> None:
    """Wait for Ray Train to end this worker (at the deadline, or with its node); return only if it did
    not, well after the deadline, so that the run trains on (the steps since the checkpoint are kept)."""
    deadline_s = info.deadline_ms / 1000 if info.deadline_ms else time.time() + NO_DEADLINE_WAIT_S
    if rank == 0:
        logger.warning(
            "node(s) %s are being preempted (deadline in %.0f s): checkpointed within the epoch, waiting for "
            "Ray Train to restart the run elsewhere",
            ", ".join(info.preempted_node_ids), deadline_s - time.time(),
        )  # fmt: skip
    while time.time() < deadline_s + AFTER_DEADLINE_S:
        time.sleep(0.5)
    if rank == 0:
        logger.warning("alive %.0f s after the preemption deadline: training on", AFTER_DEADLINE_S)
