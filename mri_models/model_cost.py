"""What an architecture costs: parameters, size, step memory and forward time (the paper's Figures 15, 16).

Every architecture is built with the same hyper-parameters and measured on the same device in the same
process, the forward passes interleaved round by round (U-Net, Attention U-Net, ..., then again), so that
the machine's state drifts equally over all of them and the ratios hold even when absolute times do not.

- ``parameters`` and ``size_mb``: trainable parameters, and the bytes of the state dict (parameters and
  buffers, as saved in a checkpoint).
- ``peak_step_mb``: the most memory one training step (forward, backward, Adam step) holds on top of what
  was allocated before it: activations, gradients and optimiser state. On CUDA from the caching allocator's
  peak statistics; on CPU from the allocator events of ``torch.profiler`` (``profile_memory=True``) summed
  in time order, which counts exactly what torch allocates (the process's RSS would also count libraries
  and allocator caching).
- ``forward_ms``: median wall time of an inference forward pass (``eval``, no gradient) of one batch, after
  warm-up; on CUDA synchronised.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from mri_models.arms import active_penalties, arm_of
from mri_models.losses import training_loss
from mri_models.models import build_model, get_architecture


@dataclass(frozen=True)
class ModelCost:
    """The measured cost of one arm (architecture and penalty weights) at one input size."""

    arm: str
    model: str
    label: str
    parameters: int
    size_mb: float
    peak_step_mb: float
    forward_ms: float
    forward_ms_min: float
    forward_ms_max: float
    image_size: tuple[int, int]
    batch_size: int
    device: str

    def as_row(self) -> dict:
        return asdict(self)


def count_parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def state_size_mb(network: torch.nn.Module) -> float:
    """Bytes of the state dict (parameters and buffers) in MiB."""
    return sum(t.numel() * t.element_size() for t in network.state_dict().values()) / 2**20


def _batch(batch_size: int, image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 1, *image_size, generator=generator).to(device)


def _training_step(network: torch.nn.Module, optimizer, image: torch.Tensor, model: str, weights) -> None:
    """The loss the platform trains with (reconstruction + active penalties), backward, an Adam step."""
    network.train()
    result = network(image, return_attention=True)
    provides = get_architecture(model).provides
    training_loss(result, image, active_penalties(model, weights), provides).total.backward()
    optimizer.step()


def _cpu_allocator_peak(events) -> int:
    """The highest running sum of allocation sizes (frees are negative) in time order."""
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running = peak = 0
    for _, size in records:
        running += size
        peak = max(peak, running)
    return peak


def peak_bytes_during(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes ``step()`` allocates on ``device`` above what was allocated before it.

    CUDA: the caching allocator's peak statistics. CPU: the profiler's allocator events (there is no CPU
    peak counter), summed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    return _cpu_allocator_peak(profiler.profiler.kineto_results.events())


def peak_step_bytes(
    network: torch.nn.Module, image: torch.Tensor, model: str, weights: Mapping[str, float]
) -> int:
    """Peak bytes one training step allocates above what was allocated before it (fresh Adam, no grads)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    network.zero_grad(set_to_none=True)
    return peak_bytes_during(lambda: _training_step(network, optimizer, image, model, weights), image.device)


def synchronised_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued on it.

    CUDA runs kernels asynchronously: a region timed without synchronising measures kernel launches, not
    kernels. On a CPU this is the plain clock, so a timed region means the same thing on both.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def _forward_seconds(network: torch.nn.Module, image: torch.Tensor) -> float:
    started = synchronised_clock(image.device)
    network(image)
    return synchronised_clock(image.device) - started


def measure_costs(
    arms: Sequence[tuple[str, Mapping[str, float]]],
    hparams: Mapping[str, object],
    image_size: tuple[int, int],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    repeats: int = 10,
    warmup: int = 2,
) -> list[ModelCost]:
    """Measure every arm side by side.

    Args:
        arms: ``(model name, penalty weights)`` per arm, e.g. ``("sparse_attention_unet", {"gamma": 1e-5})``;
            the penalties count in the training step.
        hparams: constructor arguments shared by all (``chans``, ``num_pool_layers``, ``drop_prob``).
        image_size: ``(H, W)`` of the network input.
        batch_size: slices per forward pass and training step.
        device: where to measure.
        repeats: timed forward passes per arm (interleaved rounds).
        warmup: untimed forward passes per arm first.

    Returns:
        One :class:`ModelCost` per arm, in order.
    """
    device = torch.device(device)
    image = _batch(batch_size, image_size, device)
    networks = _build_networks([model for model, _ in arms], hparams, device)
    peaks = [
        peak_step_bytes(network, image, model, weights)
        for network, (model, weights) in zip(networks, arms, strict=True)
    ]
    times = _interleaved_forward_ms(networks, image, repeats, warmup)
    shape = (int(image_size[0]), int(image_size[1]))
    return [
        _model_cost(model, weights, network, peak, series, shape, batch_size, device)
        for network, (model, weights), peak, series in zip(networks, arms, peaks, times, strict=True)
    ]


def _build_networks(
    models: Sequence[str], hparams: Mapping[str, object], device: torch.device
) -> list[torch.nn.Module]:
    """One network per model, each initialised from the same seed."""
    networks = []
    for model in models:
        torch.manual_seed(0)
        networks.append(build_model(model, **hparams).to(device))
    return networks


def _interleaved_forward_ms(
    networks: Sequence[torch.nn.Module], image: torch.Tensor, repeats: int, warmup: int
) -> list[list[float]]:
    """Per network, the wall times (ms) of ``repeats`` inference forward passes after ``warmup`` untimed ones.

    The timed passes go round by round over all networks, so that drift in the machine's state (clock
    boost, other load) falls equally on every network and the ratios between them hold.
    """
    for network in networks:
        network.eval()
        for _ in range(warmup):
            _forward_seconds(network, image)
    times: list[list[float]] = [[] for _ in networks]
    for _ in range(repeats):
        for network, series in zip(networks, times, strict=True):
            series.append(_forward_seconds(network, image) * 1e3)
    return times


def _model_cost(
    model: str,
    weights: Mapping[str, float],
    network: torch.nn.Module,
    peak: int,
    forward_ms: Sequence[float],
    image_size: tuple[int, int],
    batch_size: int,
    device: torch.device,
) -> ModelCost:
    """One arm's row from its network, its training step's peak bytes and its forward times."""
    arm = arm_of(model, weights)
    return ModelCost(
        arm=arm.name,
        model=model,
        label=arm.label,
        parameters=count_parameters(network),
        size_mb=state_size_mb(network),
        peak_step_mb=peak / 2**20,
        forward_ms=statistics.median(forward_ms),
        forward_ms_min=min(forward_ms),
        forward_ms_max=max(forward_ms),
        image_size=image_size,
        batch_size=batch_size,
        device=str(device),
    )
