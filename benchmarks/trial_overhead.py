"""The fixed cost of a sweep trial: ours against the Ray floor, measured in the same run.

Each Tune trial of a sweep wraps a Ray Train run. Besides its epochs, it pays a fixed cost: from the trial
function's start to the first epoch (Train controller, worker group, placement group, process start, torch
and our imports, DDP set-up, the model) and from the last epoch to the end (final report, shutdown). This
script runs, one trial at a time on a local Ray (``--cpus``, 2 by default):

- **floor**: a trial whose TorchTrainer (1 worker, the cpu profile's resources) reports once and returns:
  what Ray Tune + Ray Train cost with nothing of ours in them;
- **ours**: ``ray_jobs.tune.run_trial`` exactly as a sweep runs it (config validation, run record, the
  TorchTrainer with our worker loop), for ``--epochs`` epochs of the smoke profile's data.

Per trial it records the trial function's wall time and, for ours, the epochs' own ``epoch_seconds``; the
fixed cost is wall time minus epochs. It prints each kind's median over ``--repeats`` trials and the
ratio ours / floor. No timed assertions: run it on a quiet machine.

    .venv/bin/python benchmarks/trial_overhead.py [--repeats 3] [--epochs 2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from mri_models.experiment import HISTORY_FILE, RunLayout
from mri_models.storage import join, read_json
from ray_jobs.config import PROFILES
from ray_jobs.data import ensure_synthetic_data, prepare_data
from ray_jobs.sweep_config import SweepSpec
from ray_jobs.tune import TRIAL_CPUS, run_trial


def _floor_loop(config: dict) -> None:
    ray.train.report({"epoch": 1, "ssim": 0.0})


def floor_trial(config: dict, *, storage: str, out: str) -> None:
    started = time.time()
    trainer = TorchTrainer(
        _floor_loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": PROFILES["cpu"]["cpus_per_worker"]}
        ),
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(), storage_path=storage, callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()
    Path(out, f"{tune.get_context().get_trial_id()}.json").write_text(
        json.dumps({"wall": time.time() - started, "epochs": 0.0})
    )


def our_trial(config: dict, *, spec: SweepSpec, data, storage: str, out: str) -> None:
    started = time.time()
    run_trial(config, spec=spec, data=data, train_storage=storage, baselines=[])
    run = RunLayout(str(Path(storage, tune.get_context().get_trial_id())))
    history = read_json(join(max(run.checkpoints()), HISTORY_FILE))
    Path(out, f"{tune.get_context().get_trial_id()}.json").write_text(
        json.dumps({"wall": time.time() - started, "epochs": sum(row["epoch_seconds"] for row in history)})
    )


def run_kind(trial_function, repeats: int, storage: Path, name: str, **parameters) -> list[dict]:
    out = storage / f"{name}-timings"
    out.mkdir(parents=True)
    trainable = tune.with_parameters(
        trial_function, storage=str(storage / f"{name}_runs"), out=str(out), **parameters
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPUS}),
        param_space={"seed": tune.grid_search(list(range(repeats)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    tuner.fit()
    return [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        root = ensure_synthetic_data("smoke", base_dir=storage / "data")
        spec = SweepSpec(experiment="overhead", profile="cpu", train={"epochs": args.epochs, "chans": 4})
        data = prepare_data(spec.trial_configs()[0], root)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            floor = run_kind(floor_trial, args.repeats, storage, "floor")
            ours = run_kind(our_trial, args.repeats, storage, "ours", spec=spec, data=data)
        finally:
            ray.shutdown()

    def median(rows: list[dict], key) -> float:
        return statistics.median(key(row) for row in rows)

    floor_fixed = median(floor, lambda r: r["wall"] - r["epochs"])
    our_fixed = median(ours, lambda r: r["wall"] - r["epochs"])
    print(f"trials of each kind: {args.repeats}, one at a time, {args.cpus} CPUs")
    print(f"floor (Tune + Train, empty loop): wall {median(floor, lambda r: r['wall']):.1f} s")
    print(
        f"ours ({args.epochs} epochs of the smoke data, cpu profile resources): wall "
        f"{median(ours, lambda r: r['wall']):.1f} s, epochs {median(ours, lambda r: r['epochs']):.1f} s"
    )
    print(f"fixed cost per trial: floor {floor_fixed:.1f} s, ours {our_fixed:.1f} s")
    print(
        f"ratio ours / floor: {our_fixed / floor_fixed:.2f}x (what is ours: {our_fixed - floor_fixed:+.1f} s)"
    )


if __name__ == "__main__":
    main()
