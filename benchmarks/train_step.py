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

Run ``python benchmarks/train_step.py --help``; ``--quick`` finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mri_models.losses import training_loss
from mri_models.models import AttentionOutput, AttentionUnet, ImageOutput, Unet

# (chans, num_pool_layers, image size)
SETTINGS: list[tuple[int, int, int]] = [(8, 3, 128), (16, 4, 128), (32, 4, 320)]
MODELS = ("fastMRI Unet", "ours Unet", "ours AttentionUnet (gamma>0)")
REFERENCE = MODELS[0]


def make_step(name: str, chans: int, pools: int, size: int, gamma: float) -> Callable[[], None]:
    """A closure doing one training step of the named model on a fixed random (1, 1, size, size) batch."""
    torch.manual_seed(0)
    if name == "fastMRI Unet":
        from fastmri.models import Unet as FastmriUnet

        model = FastmriUnet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    elif name == "ours Unet":
        model = Unet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    else:
        model = AttentionUnet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=0.0)
    model.train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, size, size, generator=generator)
    target = torch.randn(1, 1, size, size, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if name == "fastMRI Unet":
            loss = F.l1_loss(model(image), target)
        elif name == "ours Unet":
            loss = training_loss(model(image, return_attention=True), target, {}, ImageOutput).total
        else:
            result = model(image, return_attention=True)
            loss = training_loss(result, target, {"attention_l1": gamma}, AttentionOutput).total
        loss.backward()
        optimizer.step()

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
    chans: int, pools: int, size: int, gamma: float, warmup: int, rounds: int, steps: int
) -> dict[str, dict[str, float]]:
    steps_by_model = {name: make_step(name, chans, pools, size, gamma) for name in MODELS}
    for step in steps_by_model.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    for round_index in range(rounds):
        # Rotate the order every round so no model always runs right after another one.
        order = MODELS[round_index % len(MODELS) :] + MODELS[: round_index % len(MODELS)]
        for name in order:
            for _ in range(steps):
                start = time.perf_counter()
                steps_by_model[name]()
                times[name].append(time.perf_counter() - start)
    result = {}
    for name in MODELS:
        values = sorted(times[name])
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) >= 2 else (values[0],) * 3
        result[name] = {
            "median": statistics.median(values),
            "q1": q1,
            "q3": q3,
            "flops": count_flops(steps_by_model[name]),
        }
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
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--steps", type=int, help="timed steps per model and round (default 6, quick 3)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul peak")
    args = parser.parse_args(argv)
    if args.gamma <= 0:
        parser.error("--gamma must be > 0 (the sparse attention loss)")
    if args.settings:
        args.settings = [tuple(int(x) for x in s.split(",")) for s in args.settings]
    else:
        args.settings = SETTINGS[:2] if args.quick else SETTINGS
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 6)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"train step benchmark {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  "
        f"threads={torch.get_num_threads()}  batch 1, RMSprop, gamma={args.gamma:g}  warm-up {args.warmup}, "
        f"{args.rounds} interleaved rounds x {args.steps} steps per model"
    )
    peak = matmul_peak(args.matmul_size, repeats=5 if args.quick else 10)
    print(f"fp32 matmul peak ({args.matmul_size}x{args.matmul_size}, same threads): {peak / 1e9:.1f} GFLOP/s")

    summary = []
    for chans, pools, size in args.settings:
        if min(size, size) // 2**pools < 2:
            print(f"skipping chans {chans} / {pools} pools / {size}x{size}: too deep for the image")
            continue
        started = time.perf_counter()
        result = time_setting(chans, pools, size, args.gamma, args.warmup, args.rounds, args.steps)
        ref = result[REFERENCE]["median"]
        print(
            f"\n== chans {chans} / {pools} pools / {size}x{size}  "
            f"({args.rounds * args.steps} timed steps per model, {time.perf_counter() - started:.0f} s)"
        )
        rows = []
        for name in MODELS:
            r = result[name]
            rate = r["flops"] / r["median"]
            rows.append([
                name,
                f"{1e3 * r['median']:.1f}",
                f"{1e3 * r['q1']:.1f}-{1e3 * r['q3']:.1f}",
                f"{r['median'] / ref:.3f}",
                f"{r['flops'] / 1e9:.3f}",
                f"{rate / 1e9:.1f}",
                f"{100 * rate / peak:.0f}%",
            ])  # fmt: skip
        print_table(
            ["model", "step ms", "IQR ms", "vs fastMRI", "GFLOP/step", "GFLOP/s", "of peak"],
            rows,
        )
        ours = result["ours Unet"]["median"]
        attention = result[MODELS[2]]["median"]
        summary.append((f"{chans}/{pools}/{size}", ours / ref, attention / ours - 1.0))

    print("\nGoals: our Unet no slower than fastMRI's (ratio ~1.0); attention overhead <= 10% over our Unet")
    print_table(
        ["chans/pools/size", "ours Unet / fastMRI", "attention overhead", "verdict"],
        [
            [
                label,
                f"{ratio:.3f}",
                f"{100 * overhead:+.1f}%",
                ("Unet ok" if ratio <= 1.05 else "Unet SLOWER")
                + (", attention ok" if overhead <= 0.10 else ", attention over 10%"),
            ]
            for label, ratio, overhead in summary
        ],
    )
    print("(ratios within about +-5% are within this machine's run-to-run noise; see the IQR column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
