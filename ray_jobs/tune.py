"""The Tune driver: ASHA-scheduled grid searches whose trials are Ray Train runs.

Each trial function builds the trainer of :mod:`ray_jobs.train` with Tune's report callback. Its Train run
is named after the trial id under ``<experiment>/train_runs``, so a retried or restored trial resumes its
own checkpoints and never another trial's. ASHA's rung records are persisted next to the experiment
(``asha_state.txt``) after every decision and reloaded when the sweep is restored: Ray does not save
scheduler state, and without it a resumed sweep would prune from an empty history.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import posixpath
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from analysis.collect import ASHA_STATE_FILE, SWEEP_FILE
from ray_jobs import storage
from ray_jobs.config import ConfigError
from ray_jobs.sweep_config import SweepSpec, load_sweep_spec

TRIAL_CPUS = 0.1  # the trial function only waits on its trainer; its workers reserve their own CPUs
TRAIN_RUNS_DIR = "train_runs"
METRIC, MODE = "ssim", "max"


class PersistentASHAScheduler(ASHAScheduler):
    """ASHA whose rung records survive an interrupted driver.

    Args:
        state_path: file (local path or URI) the records are written to after every change.
        **kwargs: ASHAScheduler arguments.
    """

    def __init__(self, state_path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.state_path = state_path
        self.stopped_trials: list[str] = []
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the records since then
        # are in the state file.
        self.__dict__.update(state)
        self._load()

    def _load(self) -> None:
        if not storage.exists(self.state_path):
            return
        saved = json.loads(storage.read_text(self.state_path))
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=True):
            for (milestone, recorded), saved_rung in zip(bracket._rungs, rungs, strict=True):
                if not math.isclose(milestone, saved_rung["milestone"]):
                    raise ConfigError(
                        f"{self.state_path} was written for other ASHA rungs ({saved_rung['milestone']} vs "
                        f"{milestone}); the sweep's scheduler settings changed"
                    )
                recorded.clear()
                recorded.update(saved_rung["recorded"])
        self.stopped_trials = list(saved.get("stopped_trials", []))
        self._num_stopped = len(self.stopped_trials)

    def _save(self) -> None:
        state = {
            "brackets": [
                [{"milestone": milestone, "recorded": recorded} for milestone, recorded in bracket._rungs]
                for bracket in self._brackets
            ],
            "stopped_trials": self.stopped_trials,
        }
        storage.write_text(self.state_path, json.dumps(state))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        reached_end = result.get(self._time_attr, 0) >= self._max_t
        if action == TrialScheduler.STOP and not reached_end and trial.trial_id not in self.stopped_trials:
            self.stopped_trials.append(trial.trial_id)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def make_scheduler(spec: SweepSpec, experiment_path: str) -> TrialScheduler:
    """ASHA on validation SSIM with ``epoch`` as time attribute, or FIFO."""
    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    return PersistentASHAScheduler(
        state_path=storage.join(experiment_path, ASHA_STATE_FILE),
        time_attr="epoch",
        max_t=spec.max_epochs,
        grace_period=min(spec.scheduler.grace_period, spec.max_epochs),
        reduction_factor=spec.scheduler.reduction_factor,
    )


def run_trial(config: dict[str, Any], *, spec: SweepSpec, data, train_storage: str) -> None:
    """One Tune trial: the Ray Train run of one grid point, resumed from its own checkpoints if any."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.config import make_train_config
    from ray_jobs.train import build_trainer

    cfg = make_train_config(spec.trial_values(config))
    name = ray.tune.get_context().get_trial_id()
    build_trainer(cfg, data, name, train_storage, callbacks=[TuneReportCallback()]).fit()


def concurrency(spec: SweepSpec, num_trials: int) -> int:
    """Trials that fit at once: CPUs (and GPUs) over what one trial holds, leaving CPU for Ray Data."""
    import ray

    from ray_jobs.train import check_cluster_fits, resolve_use_gpu

    cfg = spec.trial_configs()[0]
    per_trial = TRIAL_CPUS + cfg.num_workers * cfg.cpus_per_worker
    resources = ray.cluster_resources()
    fit = int((resources.get("CPU", 0) - cfg.data_cpus_per_task) // per_trial)
    if resolve_use_gpu(cfg):
        gpu_fit = int(resources.get("GPU", 0) // cfg.num_workers)
        # No GPU yet with GPUs requested: an autoscaling cluster; let Tune queue trials as nodes arrive.
        fit = min(fit, gpu_fit) if gpu_fit else num_trials
    chosen = spec.max_concurrent_trials or max(1, min(fit, num_trials))
    # Raises with the arithmetic when even one trial (or the requested number) does not fit.
    check_cluster_fits(cfg, concurrent_runs=chosen, extra_cpus=round(TRIAL_CPUS * chosen, 6))
    return chosen


def _experiment_exists(experiment_path: str) -> bool:
    return storage.exists(storage.join(experiment_path, SWEEP_FILE))


def run_sweep(spec: SweepSpec, name: str, storage_path: str, data_root: Path | None, resume: bool):
    """Run (or resume) a sweep and write its result tables; returns the collected experiment.

    Raises:
        ConfigError: bad configuration, data, cluster size, or an existing experiment without ``resume``.
    """
    import ray
    from ray import tune

    from analysis.collect import write_tables
    from ray_jobs.data import ensure_synthetic_data, prepare_data

    experiment_path = storage.join(storage_path, name)
    exists = _experiment_exists(experiment_path)
    if exists and not resume:
        raise ConfigError(
            f"experiment {name!r} already exists under {storage_path}; pass --resume to continue it or "
            "choose another --name"
        )
    if resume and not exists:
        raise ConfigError(f"nothing to resume: no experiment {name!r} under {storage_path}")
    if resume:  # the sweep continues with the configuration it started with
        saved = json.loads(storage.read_text(storage.join(experiment_path, SWEEP_FILE)))
        spec = SweepSpec(**saved["spec"])
    configs = spec.trial_configs()
    root = data_root or (Path(saved["data_root"]) if resume else ensure_synthetic_data(spec.profile))
    data = prepare_data(configs[0], Path(root))
    for cfg in configs:  # data-dependent checks (pooling depth) for every distinct architecture
        if cfg.num_pool_layers != configs[0].num_pool_layers:
            prepare_data(cfg, Path(root))
            break

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    max_concurrent = concurrency(spec, len(configs))
    if not resume:
        record = {
            "spec": spec.model_dump(mode="json"),
            "search_keys": [*spec.search, "seed"],
            "max_epochs": spec.max_epochs,
            "data_root": str(root),
        }
        storage.write_text(storage.join(experiment_path, SWEEP_FILE), json.dumps(record, indent=2))

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, spec=spec, data=data, train_storage=storage.join(experiment_path, TRAIN_RUNS_DIR)
        ),
        {"cpu": TRIAL_CPUS},
    )
    print(
        f"{'resuming' if resume else 'starting'} sweep {name!r}: {len(configs)} trials "
        f"({', '.join(f'{k}: {len(v)}' for k, v in spec.search.items())}, seeds: {len(spec.seeds)}), "
        f"{spec.scheduler.type} scheduler, up to {max_concurrent} at once, data {data.root}, "
        f"results in {experiment_path}",
        flush=True,
    )
    if resume:
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {key: tune.grid_search(values) for key, values in spec.search.items()}
        param_space["seed"] = tune.grid_search(spec.seeds)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                scheduler=make_scheduler(spec, experiment_path),
                max_concurrent_trials=max_concurrent,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=1),
        )
    tuner.fit()
    return write_tables(experiment_path)


def print_summary(experiment, search_keys: list[str], top: int = 5) -> None:
    """Status counts and the best configurations by mean best-epoch SSIM over seeds."""
    trials = experiment.trials
    print(
        f"\n{len(trials)} trials: "
        + ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    )
    keys = [key for key in search_keys if key != "seed" and key in trials]
    ranked = (
        trials.groupby(keys, dropna=False)["best_ssim"]
        .agg(["mean", "std", "count"])
        .sort_values("mean", ascending=False)
        if keys
        else trials[["best_ssim"]].describe().T
    )
    print(f"best configurations by validation SSIM (mean over seeds):\n{ranked.head(top).to_string()}")
    print(f"tables: {posixpath.join(experiment.path, 'results')}/trials.csv and epochs.csv")
    for problem in experiment.problems:
        print(f"note: {problem}")


def sweep_main(default_config: Path, argv: list[str] | None = None) -> int:
    """The command line shared by the entry scripts in ``sweeps/``."""
    from mri_models.data.validate import DataValidationError
    from ray_jobs.train import add_set_argument, default_storage, parse_overrides

    parser = argparse.ArgumentParser(
        description=f"Run the sweep of {default_config.name} on the Ray cluster."
    )
    parser.add_argument("--profile", choices=["smoke", "cpu", "paper"], default="cpu")
    parser.add_argument("--config", type=Path, default=default_config, help="sweep YAML")
    parser.add_argument(
        "--data-root", type=Path, help="fastMRI data root (default: the profile's synthetic set)"
    )
    parser.add_argument("--storage", help="experiments directory or s3:// URI (default ~/ray_results)")
    parser.add_argument("--name", help="experiment name (default: from the config and profile)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    parser.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial")
    add_set_argument(
        parser, "a TrainConfig field (lr=3e-4) or a sweep field (seeds=[0], search.gamma=[0,1e-3])"
    )
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if args.workers_per_trial is not None:
            overrides["workers_per_trial"] = args.workers_per_trial
        spec = load_sweep_spec(args.config, args.profile, overrides)
        name = args.name or f"{spec.experiment}-{spec.profile}"
        experiment = run_sweep(spec, name, args.storage or default_storage(), args.data_root, args.resume)
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        print(f"error: {err}", flush=True)
        return 2
    print_summary(experiment, [*spec.search, "seed"])
    return 0
