"""Training-step throughput and peak memory with the GPU step options, against fp32 eager in the same run.

For our U-Net and the Sparse Attention U-Net (the Attention U-Net with the ``attention_l1`` term, gamma > 0),
each variant of :mod:`mri_models.step_options` runs the step the Ray worker runs: the forward under
``autocast``, the loss in float32, zero_grad / (scaled) backward / ``RMSprop.step()``. Variants are
``+``-joined tokens as in ``train_step.py`` (``eager`` = fp32; ``bf16``/``fp16``, ``cl`` = channels_last,
``compile``); the default compares fp32 eager with ``bf16+cl+compile``. All (model, variant) pairs are
timed in interleaved rounds after a warm-up (which compiles), synchronising the device around each step,
and reported as slices/s with ratios against the same model's first variant measured in the same run.

Peak memory is what one training step holds above what was allocated before it (parameters, and the
optimiser state after warm-up): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the allocator events of ``torch.profiler`` summed in time order, as
:mod:`mri_models.model_cost` measures it (Inductor's CPU kernels allocate through the same allocator).

The default is the paper's size (chans 32, 4 pools, 320x320, batch 1) on CUDA when available. On this
CPU-only machine use ``--tiny`` (chans 8, 3 pools, 64x64, two steps per round): a smoke run of the same
code that prints what it would compare on a GPU; CPU numbers say nothing about GPU speed-ups.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from train_step import Variant, print_table

from mri_models.losses import training_loss
from mri_models.model_cost import peak_bytes_during
from mri_models.models import AttentionOutput, ImageOutput, build_model
from mri_models.step_options import (
    CompileFallbackWarning,
    autocast,
    compile_unavailable_reason,
    float32_result,
    make_grad_scaler,
    optimisation_step,
    prepare_network,
    to_network_input,
)

# name -> (model name, penalty weights, output protocol)
MODELS = {
    "U-Net": ("unet", {}, ImageOutput),
    "Sparse Attention U-Net": ("sparse_attention_unet", {"attention_l1": 0.1}, AttentionOutput),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    label: str, variant: Variant, hparams: dict, size: int, batch: int, device: torch.device
) -> tuple[Callable[[], None], bool]:
    """One training step closure; and whether it really is compiled (False after a fallback)."""
    name, weights, provides = MODELS[label]
    torch.manual_seed(0)
    model = build_model(name, **hparams).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileFallbackWarning)
        model = prepare_network(
            model, channels_last=variant.channels_last, compile=variant.compile, device=device
        )
    for warning in caught:
        print(f"  [{label} / {variant.label}] {warning.message}")
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(variant.precision, device)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 1, size, size, generator=generator).to(device)
    target = torch.randn(batch, 1, size, size, generator=generator).to(device)
    image = to_network_input(image, variant.channels_last)

    def step() -> None:
        with autocast(variant.precision, device):
            result = model(image, return_attention=True)
        loss = training_loss(float32_result(result), target, weights, provides).total
        optimisation_step(loss, optimizer, scaler)

    return step, variant.compile and not caught


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="chans 8, 3 pools, 64x64, 2 steps (CPU smoke run)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "bf16+cl+compile"],
        metavar="VARIANT",
        help="first one is the reference (default: eager bf16+cl+compile)",
    )
    parser.add_argument("--batch", type=int, default=1, help="slices per step (fastMRI: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps per pair, compiling included (default 3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, tiny 2)")
    parser.add_argument("--steps", type=int, help="timed steps per pair and round (default 10, tiny 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    args = parser.parse_args(argv)
    try:
        args.variants = tuple(dict.fromkeys(Variant.parse(v) for v in args.variants))
    except ValueError as error:
        parser.error(str(error))
    args.hparams = {"chans": 8, "num_pool_layers": 3} if args.tiny else {"chans": 32, "num_pool_layers": 4}
    args.size = 64 if args.tiny else 320
    args.warmup = args.warmup or (2 if args.tiny else 3)
    args.rounds = args.rounds or (2 if args.tiny else 5)
    args.steps = args.steps or (2 if args.tiny else 10)
    return args


@dataclass(frozen=True)
class StepRow:
    """One (model, variant) pair's measurement; ratios against the same model's first variant."""

    model: str
    variant: str
    compiled: bool  # False where compile was asked for and fell back to eager
    step_ms: float
    slices_per_second: float
    speed_vs_reference: float
    peak_step_mb: float
    memory_vs_reference: float
    vs_unet_percent: float  # the step time over the U-Net's with the same variant, minus one (NaN: U-Net)

    @property
    def fell_back(self) -> bool:
        return "compile" in self.variant and not self.compiled


def describe(args: argparse.Namespace, device: torch.device) -> str:
    reason = compile_unavailable_reason(device)
    return (
        f"gpu step benchmark {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}  "
        f"chans {args.hparams['chans']} / {args.hparams['num_pool_layers']} pools / {args.size}x{args.size}, "
        f"batch {args.batch}, RMSprop  warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps  "
        f"torch.compile: {'available' if reason is None else 'unavailable (' + reason + ')'}"
    )


def measure(args: argparse.Namespace, device: torch.device) -> list[StepRow]:
    """Build, warm up (compiling), then time every (model, variant) pair in interleaved rounds."""
    keys = [(label, variant) for label in MODELS for variant in args.variants]
    steps, compiled = {}, {}
    started = time.perf_counter()
    for key in keys:
        steps[key], compiled[key] = make_step(*key, args.hparams, args.size, args.batch, device)
        for _ in range(args.warmup):
            steps[key]()
    _sync(device)
    print(f"built and warmed up (compiling included) in {time.perf_counter() - started:.0f} s")
    peaks = {key: peak_bytes_during(steps[key], device) for key in keys}
    times: dict = {key: [] for key in keys}
    for round_index in range(args.rounds):
        order = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]
        for key in order:
            for _ in range(args.steps):
                _sync(device)
                start = time.perf_counter()
                steps[key]()
                _sync(device)
                times[key].append(time.perf_counter() - start)
    reference, rows = args.variants[0], []
    for label, variant in keys:
        median = statistics.median(times[(label, variant)])
        ref_median = statistics.median(times[(label, reference)])
        peak, ref_peak = peaks[(label, variant)], peaks[(label, reference)]
        unet = statistics.median(times[("U-Net", variant)])
        rows.append(StepRow(
            label, variant.label, compiled[(label, variant)], 1e3 * median, args.batch / median,
            ref_median / median, peak / 2**20, peak / ref_peak if ref_peak else math.nan,
            100 * (median / unet - 1) if label != "U-Net" else math.nan,
        ))  # fmt: skip
    return rows


def table_rows(rows: list[StepRow]) -> list[list[str]]:
    """The rows as :func:`print_table` cells."""
    return [
        [
            row.model, row.variant + (" (fell back)" if row.fell_back else ""),
            f"{row.step_ms:.1f}", f"{row.slices_per_second:.2f}", f"{row.speed_vs_reference:.2f}x",
            f"{row.peak_step_mb:.1f}",
            "-" if math.isnan(row.memory_vs_reference) else f"{row.memory_vs_reference:.2f}x",
            "" if math.isnan(row.vs_unet_percent) else f"{row.vs_unet_percent:+.1f}%",
        ]
        for row in rows
    ]  # fmt: skip


def headers(reference: Variant) -> list[str]:
    return ["model", "variant", "step ms", "slices/s", f"speed vs {reference.label}", "peak step MB",
            "memory vs ref", "vs U-Net"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(describe(args, device))
    rows = measure(args, device)
    print_table(headers(args.variants[0]), table_rows(rows))
    if device.type != "cuda":
        print(
            "\nCPU run: a smoke test of the code path. On a GPU (without --tiny, on a CUDA machine) the same "
            f"table compares, at chans 32 / 4 pools / 320x320, slices/s and peak step memory of "
            f"{', '.join(v.label for v in args.variants[1:])} against {args.variants[0].label} for both "
            "networks; expect bf16 + channels_last to use tensor cores and about half the activation "
            "memory, and compile to fuse the gates' element-wise passes."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
