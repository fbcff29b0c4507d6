"""The GPU check: what a GPU node does with the paper profile, in one command with a fixed time limit.

On a CUDA machine with PyTorch (Ray is not needed), three parts, each against a reference measured in the
same run:

(a) the training step at the paper size (chans 32, 4 pools, 320x320, batch 1) for the U-Net and the
    Sparse Attention U-Net, fp32 eager against bf16 + channels_last and bf16 + channels_last + compile:
    slices/s, peak step memory and the attention overhead (``gpu_step.py``'s measurement);
(b) the trainer-side transform (``transform_on: trainer``: mask, column inverse FFT, crop, magnitude,
    normalisation batched on the device) against the read tasks' per-slice ``fast`` transform on the CPU:
    equal within 1e-5 of the largest magnitude (as ``tests/test_fast_transform.py`` holds it on CPU), and
    milliseconds per slice each;
(c) 1, 2 and 4 training processes sharing the GPU at once, each running the paper profile's step for the
    same wall time: aggregate slices/s against one process alone, what packing trials on one GPU
    (``gpus_per_worker`` 0.5 or 0.25) buys.

It writes ``gpu_check.json`` (after every part, so a run cut off by the limit keeps what it measured) and
``gpu_check.md`` (the tables) to ``--out``. A part that would start after ``--time-limit`` seconds is
skipped and says so. On this CPU-only machine ``--tiny`` runs the same code at chans 8, 3 pools, 64x64 in
seconds (CI runs it); CPU numbers say nothing about a GPU.

    python benchmarks/gpu_check.py --out gpu_check --time-limit 480
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gpu_step import headers, measure, table_rows
from gpu_step import parse_args as step_args
from train_step import Variant

from mri_models.data.hybrid_transforms import hybrid_batch_to_images, hybrid_sample, unet_sample_fast
from mri_models.data.subsample import RandomMaskFunc
from mri_models.data.transforms import SliceInputs

TOLERANCE = 1e-5  # of the largest magnitude: float32 rounding is ~1e-7 of it (tests/test_fast_transform.py)
PACKED = (1, 2, 4)
PAPER_STEP = "bf16+cl"  # the paper profile's step (precision bf16, channels_last, not compiled)


@dataclass
class Check:
    """Everything the check measured, as written to ``gpu_check.json``."""

    device: str
    torch: str
    tiny: bool
    step: list[dict] = field(default_factory=list)
    transform: dict = field(default_factory=dict)
    packing: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _write(out: Path, name: str, text: str) -> None:
    """Write whole (a temporary file renamed over the old one)."""
    handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, out / name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slices(count: int, rows: int, cols: int, recon: int) -> list[SliceInputs]:
    """Random knee-sized k-space with unacquired edge columns, its target, a 4x random mask each."""
    rng, inputs = np.random.default_rng(0), []
    for index in range(count):
        kspace = (rng.standard_normal((rows, cols)) + 1j * rng.standard_normal((rows, cols))) * 1e-4
        kspace = kspace.astype(np.complex64)
        kspace[:, : cols // 40] = 0
        kspace[:, cols - cols // 50 :] = 0
        target = rng.random((recon, recon), dtype=np.float32)
        attrs = {"max": float(target.max()), "recon_size": (recon, recon, 1)}
        mask = RandomMaskFunc([0.08], [4], seed=index)
        inputs.append(SliceInputs(kspace, target, attrs, "check.h5", index, mask, (7, index)))
    return inputs


def check_transform(device: torch.device, tiny: bool, batch: int = 8, repeats: int = 5) -> dict:
    """(b): the batched device transform against the per-slice read-task transform, values and time."""
    rows, cols, recon = (128, 74, 64) if tiny else (640, 368, 320)
    inputs = _slices(batch, rows, cols, recon)
    started = time.perf_counter()
    for _ in range(repeats):
        expected = [unet_sample_fast(slice_inputs) for slice_inputs in inputs]
    read_task_ms = 1e3 * (time.perf_counter() - started) / (repeats * batch)
    shipped = [hybrid_sample(slice_inputs) for slice_inputs in inputs]  # what the read tasks ship
    arguments = ([s.hybrid for s in shipped], [s.mask for s in shipped], [s.crop_size for s in shipped],
                 [s.target for s in shipped])  # fmt: skip
    hybrid_batch_to_images(*arguments, device=device)  # warm-up (cuFFT plans)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        out = hybrid_batch_to_images(*arguments, device=device)
    _sync(device)
    trainer_ms = 1e3 * (time.perf_counter() - started) / (repeats * batch)
    worst = 0.0
    for index, sample in enumerate(expected):
        for name in ("image", "target", "mean", "std"):
            ours, reference = getattr(out, name)[index].cpu(), getattr(sample, name)
            scale = float(reference.abs().max()) or 1.0
            worst = max(worst, float((ours - reference).abs().max()) / scale)
    return {"slices": batch, "shape": [rows, cols], "max_relative_difference": worst,
            "equal_within_tolerance": worst <= TOLERANCE, "read_task_ms_per_slice": read_task_ms,
            "trainer_ms_per_slice": trainer_ms}  # fmt: skip


def packing_worker(args: argparse.Namespace) -> int:
    """One of (c)'s processes: warm up, wait for the common start, train until the common end; print the
    slices done as JSON."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    step_settings = step_args(["--tiny"] if args.tiny else [])
    from gpu_step import make_step  # here: the worker needs nothing else of it

    variant, size = Variant.parse(PAPER_STEP), step_settings.size
    step, _ = make_step("U-Net", variant, step_settings.hparams, size, 1, device)
    for _ in range(3):
        step()
    _sync(device)
    time.sleep(max(0.0, args.start_at - time.time()))
    slices = 0
    while time.time() < args.start_at + args.seconds:
        step()
        slices += 1
    _sync(device)
    print(json.dumps({"slices": slices, "seconds": time.time() - args.start_at}))
    return 0


def check_packing(device: torch.device, tiny: bool, seconds: float) -> list[dict]:
    """(c): 1, 2 and 4 processes training at once on the device; aggregate slices/s against one alone."""
    rows, alone = [], math.nan
    for count in PACKED:
        start_at = time.time() + (20 if not tiny else 8)  # every process built and warmed up by then
        command = [sys.executable, __file__, "--packing-worker", "--device", str(device), "--start-at",
                   str(start_at), "--seconds", str(seconds), *(["--tiny"] if tiny else [])]  # fmt: skip
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]
        results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in processes]
        total = sum(r["slices"] for r in results) / max(r["seconds"] for r in results)
        alone = total if count == 1 else alone
        rows.append({"processes": count, "slices_per_second": total, "vs_one_process": total / alone,
                     "per_process": [r["slices"] / r["seconds"] for r in results]})  # fmt: skip
    return rows


def markdown(check: Check, reference: Variant) -> str:
    """The three tables."""
    lines = [f"# GPU check: {check.device}, torch {check.torch}{' (tiny setting)' if check.tiny else ''}\n"]
    if check.step:
        lines += ["## (a) Training step\n", "| " + " | ".join(headers(reference)) + " |",
                  "|" + "---|" * len(headers(reference))]  # fmt: skip
        lines += ["| " + " | ".join(cells) + " |" for cells in check_rows(check)]
    if check.transform:
        t = check.transform
        lines += ["\n## (b) Trainer-side transform\n", "| slices | max difference / largest value | equal "
                  f"within {TOLERANCE:g} | read task ms/slice (CPU) | trainer ms/slice ({check.device}) |",
                  "|---|---|---|---|---|",
                  f"| {t['slices']} | {t['max_relative_difference']:.2e} | {t['equal_within_tolerance']} | "
                  f"{t['read_task_ms_per_slice']:.2f} | {t['trainer_ms_per_slice']:.3f} |"]  # fmt: skip
    if check.packing:
        lines += ["\n## (c) Training processes sharing the device\n",
                  "| processes | aggregate slices/s | vs one process |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['processes']} | {r['slices_per_second']:.1f} | {r['vs_one_process']:.2f}x |"
                  for r in check.packing]  # fmt: skip
    lines += [f"\nskipped (time limit): {', '.join(check.skipped)}"] if check.skipped else []
    return "\n".join(lines) + "\n"


def check_rows(check: Check) -> list[list[str]]:
    from gpu_step import StepRow

    return table_rows([StepRow(**row) for row in check.step])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="chans 8, 3 pools, 64x64: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="where the JSON and tables go")
    parser.add_argument("--time-limit", type=float, default=480.0, help="no part starts after this (s)")
    parser.add_argument("--packing-seconds", type=float, help="each packing run's time (default 20, tiny 2)")
    parser.add_argument("--packing-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.packing_seconds = args.packing_seconds or (2.0 if args.tiny else 20.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.packing_worker:
        return packing_worker(args)
    started, device = time.monotonic(), torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                  torch.__version__, args.tiny)  # fmt: skip
    step_settings = step_args([*(["--tiny"] if args.tiny else []), "--device", str(device),
                               "--variants", "eager", PAPER_STEP, f"{PAPER_STEP}+compile"])  # fmt: skip
    parts = [
        ("step", lambda: [asdict(row) for row in measure(step_settings, device)]),
        ("transform", lambda: check_transform(device, args.tiny)),
        ("packing", lambda: check_packing(device, args.tiny, args.packing_seconds)),
    ]
    for name, run in parts:
        if time.monotonic() - started > args.time_limit:
            check.skipped.append(name)
            continue
        print(f"gpu check: {name} ...", flush=True)
        setattr(check, name, run())
        _write(args.out, "gpu_check.json", json.dumps(asdict(check), indent=2))
    _write(args.out, "gpu_check.json", json.dumps(asdict(check), indent=2))
    text = markdown(check, step_settings.variants[0])
    _write(args.out, "gpu_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
