"""What evaluation costs: validating a data root once, a trial's final evaluation, and the attention
measurements and epoch-0 validation of every run.

Measured in one process, on a profile's synthetic data (generated into a temporary cache, nothing in the
home directory), against references from the same run:

- **validation**: ``check_root`` of the train, val and test splits with the NaN/Inf scan, without the
  cache (what every ``prepare_data`` call paid before), with a cold cache (the first call) and a warm one
  (every later call of a study); ratios to the uncached check;
- **final evaluation**: ``evaluate_volumes`` of a checkpoint on the test split at every test setting
  (network and zero-filled), against one training epoch of the same configuration in the same process
  (forward, loss, backward and Adam over the training rows): the evaluation's cost in epochs;
- **attention measurements**: the Attention U-Net's forward over the validation rows (the reference), and
  the same with what ``ray_jobs.worker.validation_pass`` adds for attention (``MpandAccumulator`` and
  ``AttentionStatsAccumulator``: norms, a 1,000-bin histogram, fractions): their share of validation; and
  that validation pass against the training epoch: what each run's epoch-0 record costs, in epochs.

    .venv/bin/python benchmarks/evaluation_cost.py [--profile cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evaluation_cost_") as cache:
        os.environ["MRI_MODELS_CACHE_DIR"] = cache
        return _run(args, Path(cache))


def _run(args: argparse.Namespace, cache: Path) -> int:
    import torch

    from mri_models.data.validate import check_root
    from mri_models.losses import training_loss
    from mri_models.models import build_model, get_architecture
    from ray_jobs.checkpoints import save_checkpoint
    from ray_jobs.config import make_train_config, profile_defaults
    from ray_jobs.data import ensure_synthetic_data, iter_rows_locally, prepare_data, train_read_tasks
    from ray_jobs.final_evaluation import evaluate_volumes

    root = ensure_synthetic_data(args.profile)
    cfg = make_train_config({**profile_defaults(args.profile), "model": "attention_unet", "use_gpu": False})
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    splits = ("singlecoil_train", "singlecoil_val", "singlecoil_test")
    uncached = _median_seconds(lambda: check_root(root, splits), args.repeats)
    validated = cache / "validated-bench"
    started = time.perf_counter()
    check_root(root, splits, cache_dir=validated)
    cold = time.perf_counter() - started
    warm = _median_seconds(lambda: check_root(root, splits, cache_dir=validated), args.repeats)
    files = sum(1 for split in splits for _ in (root / split).glob("*.h5"))
    size = sum(p.stat().st_size for split in splits for p in (root / split).glob("*.h5")) / 2**20
    print(f"validation of {files} files ({size:.0f} MiB) under {root.name}:")
    print(f"  no cache    {uncached * 1e3:8.1f} ms  1.00x (reference)")
    print(f"  cold cache  {cold * 1e3:8.1f} ms  {cold / uncached:.2f}x")
    print(f"  warm cache  {warm * 1e3:8.1f} ms  {warm / uncached:.3f}x")

    data = prepare_data(cfg, root)
    network = build_model(cfg.model, **cfg.model_hparams())
    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr)
    provides = get_architecture(cfg.model).provides

    def train_epoch() -> None:
        network.train()
        rows = list(iter_rows_locally(train_read_tasks(data.train_slices, 0, 0, 1, cfg.seed, 8), cfg,
                                      training=True))  # fmt: skip
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            image = torch.stack([torch.as_tensor(r["image"]) for r in batch])[:, None]
            target = torch.stack([torch.as_tensor(r["target"]) for r in batch])[:, None]
            loss = training_loss(network(image, return_attention=True), target, {}, provides).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch = _median_seconds(train_epoch, args.repeats)
    checkpoint = cache / "checkpoint"
    checkpoint.mkdir()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_checkpoint(str(checkpoint), network, optimizer, scheduler, 0, [])
    evaluation = _median_seconds(
        lambda: evaluate_volumes(cfg, str(checkpoint), data.test_slices, use_gpu=False), args.repeats
    )
    forward, measured = _validation_seconds(network, cfg, data, args.repeats)
    settings = len(cfg.test_settings())
    print(f"final evaluation of {cfg.model} ({args.profile} profile, chans {cfg.chans}): "
          f"{len(data.test_slices)} test slices x {settings} settings, network and zero-filled")  # fmt: skip
    print(f"  one training epoch ({len(data.train_slices)} slices)  {epoch:7.2f} s  1.00x (reference)")
    print(f"  final evaluation                      {evaluation:7.2f} s  {evaluation / epoch:.2f}x")
    print(f"validation forward of {len(data.val_slices)} slices    {forward:7.2f} s  1.00x (reference)")
    print(f"  + MPAND and alpha statistics          {measured:7.2f} s  {measured / forward:.3f}x")
    print(f"  the epoch-0 validation, in epochs     {measured:7.2f} s  {measured / epoch:.2f}x")
    return 0


def _validation_seconds(network, cfg, data, repeats: int) -> tuple[float, float]:
    """Median seconds of a validation forward pass without and with the attention measurements."""
    import torch

    from mri_models.attention_metrics import AttentionStatsAccumulator, MpandAccumulator
    from ray_jobs.data import iter_rows_locally, train_read_tasks

    tasks = train_read_tasks(data.val_slices, 0, 0, 1, cfg.seed, cfg.slices_per_read)
    rows = list(iter_rows_locally(tasks, cfg, training=False))
    images = [
        torch.stack([torch.as_tensor(r["image"]) for r in rows[start : start + cfg.batch_size]])[:, None]
        for start in range(0, len(rows), cfg.batch_size)
    ]

    @torch.no_grad()
    def validate(measure: bool) -> None:
        network.eval()
        mpand, alphas = MpandAccumulator(), AttentionStatsAccumulator()
        for image in images:
            result = network(image, return_attention=True)
            if measure:
                mpand.add(result.skip_norms_before, result.skip_norms_after)
                alphas.add(result.attention_maps)
        mpand.compute(), alphas.compute()

    validate(True)  # warm-up
    return _median_seconds(lambda: validate(False), repeats), _median_seconds(lambda: validate(True), repeats)


if __name__ == "__main__":
    raise SystemExit(main())
