"""Training-step time of our U-Net and Attention U-Net against fastMRI's U-Net, and achieved FLOP rates.

One step is forward + backward + ``RMSprop.step()`` on a batch of one (H, W) image, as fastMRI trains. For
each setting (channels / pooling layers / image size) the three models are timed in interleaved rounds
(so that a slow moment of the machine hits all of them alike) after a warm-up, and the median step time
is reported with ratios against fastMRI's U-Net measured in the same run:

- ``fastmri.models.Unet`` with ``F.l1_loss`` (the reference);
- ``mri_models.models.Unet`` with ``training_loss`` (plain L1: no attention maps);
- ``mri_models.models.AttentionUnet`` with ``training_loss`` and the ``attention_l1`` term, gamma > 0
  (the Sparse Attention U-Net: attention maps returned and penalised).

FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, forward and backward; normalisation and element-wise work are not counted), divided by the median
step time, and compared with this machine's fp32 matmul peak measured in the same run with the same thread
count.

Step options (``--variants``, :mod:`mri_models.step_options`): each variant is ``+``-joined tokens out of
``fp32`` / ``bf16`` / ``fp16`` (autocast precision, loss in float32, a GradScaler for fp16), ``cl``
(channels_last network and input) and ``compile`` (``torch.compile``, Inductor); ``eager`` is plain fp32.
Every model runs every variant, all interleaved in the same rounds, and each variant's rows are compared
with fastMRI's U-Net and with our U-Net *in the same variant*; a last table compares each variant with the
first one. ``--paper-size`` measures only the paper's setting (chans 32, 4 pools, 320x320, batch 1).

Run ``python benchmarks/train_step.py --help``; ``--quick`` finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mri_models.losses import training_loss
from mri_models.models import AttentionOutput, AttentionUnet, ImageOutput, Unet
from mri_models.step_options import (
    PRECISIONS,
    autocast,
    float32_result,
    make_grad_scaler,
    optimisation_step,
    prepare_network,
    to_network_input,
)

# (chans, num_pool_layers, image size)
SETTINGS: list[tuple[int, int, int]] = [(8, 3, 128), (16, 4, 128), (32, 4, 320)]
MODELS = ("fastMRI Unet", "ours Unet", "ours AttentionUnet (gamma>0)")
REFERENCE = MODELS[0]
PAPER_SIZE = (32, 4, 320)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the step runs: autocast precision, channels_last memory format, torch.compile."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``eager``, or ``+``-joined tokens: a precision (fp32, bf16, fp16), ``cl``, ``compile``."""
        tokens = [] if text == "eager" else text.split("+")
        unknown = [t for t in tokens if t not in (*PRECISIONS, "cl", "compile")]
        if unknown:
            raise ValueError(f"unknown variant token(s) {unknown} in {text!r}")
        precision = next((t for t in tokens if t in PRECISIONS), "fp32")
        return cls(precision, "cl" in tokens, "compile" in tokens)

    @property
    def label(self) -> str:
        parts = [self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
        return "+".join(parts) if parts != ["fp32"] else "fp32 eager"


def make_step(
    name: str, chans: int, pools: int, size: int, gamma: float, variant: Variant = Variant()
) -> Callable[[], None]:
    """A closure doing one training step of the named model on a fixed random (1, 1, size, size) batch.

    The step is what the worker does with :mod:`mri_models.step_options`: forward under ``autocast``, the
    loss in float32, then zero_grad / (scaled) backward / step.
    """
    torch.manual_seed(0)
    if name == "fastMRI Unet":
        from fastmri.models import Unet as FastmriUnet

        model = FastmriUnet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    elif name == "ours Unet":
        model = Unet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    else:
        model = AttentionUnet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    model.train()
    model = prepare_network(model, channels_last=variant.channels_last, compile=variant.compile, device="cpu")
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scaler = make_grad_scaler(variant.precision, "cpu")
    generator = torch.Generator().manual_seed(1)
    image = to_network_input(torch.randn(1, 1, size, size, generator=generator), variant.channels_last)
    target = torch.randn(1, 1, size, size, generator=generator)

    def step() -> None:
        with autocast(variant.precision, "cpu"):
            result = model(image) if name == "fastMRI Unet" else model(image, return_attention=True)
        if name == "fastMRI Unet":
            loss = F.l1_loss(result.float(), target)
        elif name == "ours Unet":
            loss = training_loss(float32_result(result), target, {}, ImageOutput).total
        else:
            weights = {"attention_l1": gamma}
            loss = training_loss(float32_result(result), target, weights, AttentionOutput).total
        optimisation_step(loss, optimizer, scaler)

    return step


def count_flops(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_peak(n: int, repeats: int) -> float:
    """fp32 FLOP/s of an n x n matmul (median of ``repeats``), with the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def time_setting(
    chans: int,
    pools: int,
    size: int,
    gamma: float,
    warmup: int,
    rounds: int,
    steps: int,
    variants: tuple[Variant, ...] = (Variant(),),
    models: tuple[str, ...] = MODELS,
) -> dict[tuple[Variant, str], dict[str, float]]:
    """Median / quartile step seconds and FLOPs per (variant, model), all timed in interleaved rounds."""
    keys = [(variant, name) for variant in variants for name in models]
    steps_by_key = {key: make_step(key[1], chans, pools, size, gamma, key[0]) for key in keys}
    for step in steps_by_key.values():
        for _ in range(warmup):  # the first call of a compiled model compiles
            step()
    times: dict[tuple[Variant, str], list[float]] = {key: [] for key in keys}
    for round_index in range(rounds):
        # Rotate the order every round so no model always runs right after another one.
        order = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]
        for key in order:
            for _ in range(steps):
                start = time.perf_counter()
                steps_by_key[key]()
                times[key].append(time.perf_counter() - start)
    # FLOPs are those of the math, counted once per model on an eager fp32 step (compiled kernels would
    # hide them from the counter; autocast does not change them).
    flops = {name: count_flops(make_step(name, chans, pools, size, gamma)) for name in models}
    result = {}
    for key in keys:
        values = sorted(times[key])
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) >= 2 else (values[0],) * 3
        result[key] = {"median": statistics.median(values), "q1": q1, "q3": q3, "flops": flops[key[1]]}
    return result


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the two 128x128 settings, fewer steps (< 1 min)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--gamma", type=float, default=0.1, help="sparsity weight of the attention model (> 0)"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        metavar="CHANS,POOLS,SIZE",
        help="e.g. 8,3,128 16,4,128 (default: all three; --quick: the two 128x128 ones)",
    )
    parser.add_argument(
        "--paper-size", action="store_true", help="only the paper's setting: chans 32, 4 pools, 320x320"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager"],
        metavar="VARIANT",
        help="step options to compare, e.g. eager cl compile cl+compile bf16+cl (default: eager)",
    )
    parser.add_argument(
        "--skip-fastmri", action="store_true", help="time only our two models (faster at paper size)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--steps", type=int, help="timed steps per model and round (default 6, quick 3)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul peak")
    args = parser.parse_args(argv)
    if args.gamma <= 0:
        parser.error("--gamma must be > 0 (the sparse attention loss)")
    try:
        args.variants = tuple(dict.fromkeys(Variant.parse(v) for v in args.variants))
    except ValueError as error:
        parser.error(str(error))
    if args.settings:
        args.settings = [tuple(int(x) for x in s.split(",")) for s in args.settings]
    elif args.paper_size:
        args.settings = [PAPER_SIZE]
    else:
        args.settings = SETTINGS[:2] if args.quick else SETTINGS
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 6)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = MODELS[1:] if args.skip_fastmri else MODELS
    print(
        f"train step benchmark {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  "
        f"threads={torch.get_num_threads()}  batch 1, RMSprop, gamma={args.gamma:g}  warm-up {args.warmup}, "
        f"{args.rounds} interleaved rounds x {args.steps} steps per model and variant  "
        f"variants: {', '.join(v.label for v in args.variants)}"
    )
    peak = matmul_peak(args.matmul_size, repeats=5 if args.quick else 10)
    print(f"fp32 matmul peak ({args.matmul_size}x{args.matmul_size}, same threads): {peak / 1e9:.1f} GFLOP/s")

    summary = []
    for chans, pools, size in args.settings:
        if min(size, size) // 2**pools < 2:
            print(f"skipping chans {chans} / {pools} pools / {size}x{size}: too deep for the image")
            continue
        started = time.perf_counter()
        result = time_setting(
            chans, pools, size, args.gamma, args.warmup, args.rounds, args.steps, args.variants, models
        )
        print(
            f"\n== chans {chans} / {pools} pools / {size}x{size}  "
            f"({args.rounds * args.steps} timed steps per model and variant, "
            f"{time.perf_counter() - started:.0f} s)"
        )
        rows = []
        first = args.variants[0]
        for variant in args.variants:
            ref = result[(variant, models[0])]["median"]
            for name in models:
                r = result[(variant, name)]
                rate = r["flops"] / r["median"]
                rows.append([
                    f"{name} [{variant.label}]",
                    f"{1e3 * r['median']:.1f}",
                    f"{1e3 * r['q1']:.1f}-{1e3 * r['q3']:.1f}",
                    f"{r['median'] / ref:.3f}",
                    f"{r['median'] / result[(first, name)]['median']:.3f}",
                    f"{r['flops'] / 1e9:.3f}",
                    f"{rate / 1e9:.1f}",
                    f"{100 * rate / peak:.0f}%",
                ])  # fmt: skip
            ours = result[(variant, "ours Unet")]
            attention = result[(variant, MODELS[2])]
            ratio = ours["median"] / ref if not args.skip_fastmri else float("nan")
            summary.append((
                f"{chans}/{pools}/{size}",
                variant.label,
                ratio,
                attention["median"] / ours["median"] - 1.0,
                attention["q1"] / ours["q1"] - 1.0,
            ))  # fmt: skip
        print_table(
            [
                "model [variant]",
                "step ms",
                "IQR ms",
                f"vs {models[0]}",
                f"vs {first.label}",
                "GFLOP/step",
                "GFLOP/s",
                "of peak",
            ],
            rows,
        )

    print("\nGoals: our Unet no slower than fastMRI's (ratio ~1.0); attention overhead <= 10% over our Unet")
    print_table(
        ["chans/pools/size", "variant", "ours Unet / fastMRI", "attention overhead", "(of q1s)", "verdict"],
        [
            [
                label,
                variant,
                f"{ratio:.3f}",
                f"{100 * overhead:+.1f}%",
                f"{100 * overhead_q1:+.1f}%",
                # ratio is NaN with --skip-fastmri: no verdict on our U-Net then.
                ("Unet -" if math.isnan(ratio) else "Unet ok" if ratio <= 1.05 else "Unet SLOWER")
                + (", attention ok" if overhead <= 0.10 else ", attention over 10%"),
            ]
            for label, variant, ratio, overhead, overhead_q1 in summary
        ],
    )
    print("(ratios within about +-5% are within this machine's run-to-run noise; see the IQR column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
