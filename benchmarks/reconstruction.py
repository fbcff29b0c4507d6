"""Reconstruction throughput of ``mri-reconstruct``: volumes per second in this process against Ray Data.

On a profile's synthetic validation and test volumes (generated into a temporary cache), with a model
package of the profile's network (freshly initialised: throughput does not depend on the weights), it
times, in one run:

- **in-process**, one slice per forward pass (the reference, and what the platform's evaluation does);
- **in-process, batched** (``--batch-size``, default 8);
- **Ray Data**: ``map_batches`` over an actor pool (one actor per CPU of a local Ray started here, in a
  temporary directory), one slice per forward pass; the pool's start-up is part of the time, as it is for a
  user.

Each prints volumes/s and its ratio to the reference. Outputs go to temporary directories.

    .venv/bin/python benchmarks/reconstruction.py [--profile cpu] [--repeats 3] [--batch-size 8]
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


def _package(cfg, out: Path) -> str:
    from mri_models.models import build_model
    from mri_models.package import write_network

    network = build_model(cfg.model, **cfg.model_hparams())
    write_network(str(out), network, model=cfg.model, hparams=cfg.model_hparams(), arm=cfg.arm.name,
                  train_config=cfg.model_dump(mode="json"), selection={}, validation={}, data={})  # fmt: skip
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--model", default="attention_unet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reconstruction_") as scratch:
        os.environ["MRI_MODELS_CACHE_DIR"] = str(Path(scratch) / "cache")
        return _run(args, Path(scratch))


def _run(args: argparse.Namespace, scratch: Path) -> int:
    import ray
    import torch

    from mri_models.data import store
    from mri_models.reconstruct import MaskSetting
    from ray_jobs.config import make_train_config, profile_defaults
    from ray_jobs.data import ensure_synthetic_data
    from ray_jobs.predict import ReconstructionJob, run_in_process, run_on_ray

    cfg = make_train_config({**profile_defaults(args.profile), "model": args.model})
    root = ensure_synthetic_data(args.profile)
    uris = [entry.uri for split in ("singlecoil_val", "singlecoil_test")
            for entry in store.volume_files(str(root / split))]  # fmt: skip
    package = _package(cfg, scratch / "package")
    setting = MaskSetting(cfg.mask_type, cfg.accelerations[0], cfg.center_fractions[0])
    torch.set_num_threads(os.cpu_count() or 1)

    def job(name: str, batch_size: int) -> ReconstructionJob:
        from mri_models.package import read_manifest

        sha = read_manifest(package).weights_sha256
        return ReconstructionJob(package, str(scratch / name), setting, cfg.transform, batch_size, sha)

    def timed(run) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _row in run():
                pass
            times.append(time.perf_counter() - started)
        return len(uris) / statistics.median(times)

    results = {
        "in-process, 1 slice per pass": timed(lambda: run_in_process(job("a", 1), uris, "cpu")),
        f"in-process, {args.batch_size} slices per pass": timed(
            lambda: run_in_process(job("b", args.batch_size), uris, "cpu")
        ),
    }
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(scratch / "ray"),
             log_to_driver=False)  # fmt: skip
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        results[f"Ray Data, {cpus} actors, 1 slice per pass"] = timed(
            lambda: run_on_ray(job("c", 1), uris, None, False)
        )
    finally:
        ray.shutdown()
    reference = next(iter(results.values()))
    size = f"{cfg.model}, chans {cfg.chans}, {cfg.num_pool_layers} pools"
    print(f"{len(uris)} volumes of the {args.profile} profile ({size}), median of {args.repeats}")
    for name, rate in results.items():
        print(f"  {name:<40} {rate:7.2f} volumes/s  {rate / reference:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
