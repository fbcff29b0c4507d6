"""The Tune driver: grid searches whose trials are Ray Train runs, scheduled by ASHA or FIFO.

Each trial function builds the trainer of :mod:`ray_jobs.trainer` with Tune's report callback. Its Train
run is named after the trial id under ``<experiment>/train_runs`` and records its resolved configuration
there, so a retried or restored trial resumes its own checkpoints, and the analysis knows every trial's
configuration without re-deriving it. ASHA's rung records persist in ``asha_state.txt``
(:mod:`ray_jobs.asha`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.error import TuneError
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from mri_models import experiment, storage
from mri_models.experiment import CANDIDATE_KEY, ExperimentLayout
from mri_models.metrics import primary_objective
from ray_jobs.asha import PersistentASHAScheduler, asha_options, rung_epochs
from ray_jobs.baseline import baselines_for, mask_settings, record_baselines
from ray_jobs.config import ConfigError, TrainConfig, make_train_config
from ray_jobs.confirm import CONFIRM_SUFFIX, confirm_sweep, rank_configurations
from ray_jobs.data import PreparedData, ensure_synthetic_data, prepare_data
from ray_jobs.final_evaluation import evaluate_runs, pending
from ray_jobs.preemption import IN_EPOCH_KEY
from ray_jobs.search_space import as_distribution, tune_space
from ray_jobs.sweep_config import SweepSpec, ValidatedSweep
from ray_jobs.tracking import check_tracking_uri, tracking_callbacks, tracking_scope
from ray_jobs.trainer import (
    build_trainer,
    check_cluster_fits,
    claim_run_name,
    connect,
    node_worker_slots,
    resolve_use_gpu,
)
from ray_jobs.tune_state import KeepTuneState, TuneRestoreFailed, restore_kept_state, watch_restore
from ray_jobs.worker import RungWait

logger = logging.getLogger(__name__)

TRIAL_CPUS = 0.1  # the trial function only waits on its trainer; its workers reserve their own CPUs
# A custom resource that nodes safe from loss advertise (the head; on-demand, not spot, nodes), e.g.
# `ray start --head --resources='{"trial_driver": 1000}'`. When the cluster has it, every trial function
# (and with it the Train controller, which Ray Train places on the trial's node) runs there and holds no
# CPU: a reclaimed or crashed worker node then only costs the training workers it hosted, which Train
# restarts elsewhere from the trial's last checkpoint. Without it, trials may run on any node.
TRIAL_DRIVER_RESOURCE = "trial_driver"
TRIAL_DRIVER_SHARE = 0.001  # of the resource per trial: a thousand trials per unit


def trial_resources() -> dict[str, float]:
    """What one trial function reserves: a share of ``trial_driver`` where the cluster has it, else CPU."""
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) > 0:
        return {"cpu": 0.0, TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SHARE}
    return {"cpu": TRIAL_CPUS}


class EpochReports(TuneReportCallback):
    """Ray Train's reports to Tune, less the checkpoints saved within an epoch (a preempted node's,
    :data:`ray_jobs.preemption.IN_EPOCH_KEY`): those are no epoch, for ASHA, ``result.json`` or the tables."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and metrics[0].get(IN_EPOCH_KEY):
            return
        super().after_report(run_context, metrics, checkpoint)


def trial_point(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's values from its Tune config: a confirm stage's candidate is one Tune value (a dict)."""
    candidate = config.get(CANDIDATE_KEY) or {}
    return {**candidate, **{key: value for key, value in config.items() if key != CANDIDATE_KEY}}


def trial_dirname(trial) -> str:
    """``trial_<id>_gamma=1e-06,seed=0``: the grid values as given (Tune's default rounds to 4 decimals, so
    every small gamma became ``gamma=0.0000``). Also the run name TensorBoard shows."""
    values = []
    for key, value in trial_point(trial.evaluated_params).items():
        text = format(value, "g") if isinstance(value, float) else str(value)
        values.append(f"{key}={text}".replace(os.sep, "_"))
    return f"trial_{trial.trial_id}_{','.join(values)}"[:200]


class EpochStepTensorBoard(TBXLoggerCallback):
    """Tune's TensorBoard scalars with the epoch as their step, 0 for the untrained network's report.

    Tune steps by ``training_iteration``, which counts reports: with the epoch-0 report every epoch would
    sit one step to the right of its validation images and coefficient histograms (:mod:`ray_jobs.images`).
    """

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if isinstance(result.get("epoch"), (int, float)):
            result = {**result, TRAINING_ITERATION: int(result["epoch"])}
        super().log_trial_result(iteration, trial, result)


def make_scheduler(spec: SweepSpec, layout: ExperimentLayout) -> TrialScheduler:
    """ASHA on the primary metric with ``epoch`` as time attribute, or FIFO."""
    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    # run_trial gives every ASHA trial's workers a RungWait: they end a stopped run themselves.
    return PersistentASHAScheduler(state_path=layout.asha_state_file, stops_in_workers=True, **_asha(spec))


def _asha(spec: SweepSpec) -> dict[str, Any]:
    """The sweep's ASHA settings, the same for the scheduler and for the workers that wait at its rungs."""
    return asha_options(spec.max_epochs, spec.scheduler.grace_period, spec.scheduler.reduction_factor)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param space: grids (or a confirm stage's candidates) times seeds, or a search space whose
    suggestions each run with the search's one seed."""
    if not spec.is_grid:
        return {**tune_space(spec.search), "seed": spec.seeds[0]}
    if spec.candidates:
        return {CANDIDATE_KEY: tune.grid_search(spec.candidates), "seed": tune.grid_search(spec.seeds)}
    return {
        **{key: tune.grid_search(values) for key, values in spec.search.items()},
        "seed": tune.grid_search(spec.seeds),
    }


def make_searcher(spec: SweepSpec, max_concurrent: int) -> Searcher | BasicVariantGenerator | None:
    """Seeded suggestions: Tune's random sampling, or Optuna's TPE; None for a grid (Tune's default).

    Tune saves the searcher with every experiment checkpoint and ``Tuner.restore`` reloads it, so a resumed
    search keeps its history and its count of suggestions.

    Args:
        spec: the sweep.
        max_concurrent: trials at once. Tune applies ``TuneConfig.max_concurrent_trials`` to a Searcher (it
            wraps it in a ConcurrencyLimiter) but ignores it, with a warning, for a BasicVariantGenerator
            passed in: random sampling would start every trial at once, and on a small cluster their
            workers then held every CPU while their Ray Data read tasks waited for one, forever.
    """
    if spec.search_alg == "random":
        return BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=max_concurrent)
    if spec.search_alg == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.search_seed))
    return None


def run_trial(
    config: dict[str, Any],
    *,
    spec: SweepSpec,
    data: PreparedData,
    experiment_path: str,
    baselines: list[dict[str, Any]],
) -> None:
    """One Tune trial: the Ray Train run of one grid point, candidate or suggestion, resumed from its own
    checkpoints if any.

    The run lives under ``train_runs/<trial id>``; its validation images go to the Tune trial directory's
    ``images`` (TensorBoard shows them as ``<trial>/images`` beside the trial's scalars). Under ASHA its
    workers wait for the scheduler's decision at every rung (:class:`ray_jobs.worker.RungWait`), so a trial
    ASHA stops trains no epoch after the decision.
    """
    # The driver validated every grid trial (of a search, its probe points); a searcher's suggestion is
    # validated here, as it is made, in the trial's own process (which loads its plugins here).
    cfg = spec.suggestion_config(trial_point(config))
    context = tune.get_context()
    name = context.get_trial_id()
    layout = ExperimentLayout(experiment_path)
    claim_run_name(cfg, layout.train_runs, name)
    baseline = next((b["metrics"] for b in baselines if b["mask"] == mask_settings(cfg)), None)
    trial_dir = layout.trial_dir(os.path.basename(context.get_trial_dir().rstrip("/")))
    callbacks = [EpochReports()]
    rung_wait = None
    if spec.scheduler.type == "asha":  # the workers wait for ASHA's decision at every rung
        rung_wait = RungWait(layout.asha_state_file, name, tuple(rung_epochs(_asha(spec)).items()))
    trainer = build_trainer(
        cfg,
        data,
        name,
        layout.train_runs,
        callbacks=callbacks,
        baseline=baseline,
        image_dir=trial_dir.images_dir,
        rung_wait=rung_wait,
    )
    trainer.fit()


def concurrency(sweep: ValidatedSweep) -> int:
    """Trials that fit at once: CPUs (and GPUs) over what one trial holds, leaving CPU for Ray Data, on the
    cluster as a whole and node by node (:func:`ray_jobs.trainer.node_worker_slots`)."""
    cfg, num_trials = sweep.trials[0], sweep.num_trials
    trial_cpus = trial_resources()["cpu"]
    gpus = resolve_use_gpu(cfg)
    # On GPUs each trial budgets a Ray Data task of its own (packed trials each stream their data).
    data_cpus = cfg.data_cpus_per_task if gpus else 0.0
    per_trial = trial_cpus + cfg.num_workers * cfg.cpus_per_worker + data_cpus
    resources = ray.cluster_resources()
    fit = int((resources.get("CPU", 0) - cfg.data_cpus_per_task) // per_trial)
    node_fit = node_worker_slots(cfg, trial_cpus, gpus) // cfg.num_workers
    # The nodes are checked unless the cluster still waits for its GPU nodes (the autoscaler adds them).
    gpu_fit = int(resources.get("GPU", 0) / (cfg.num_workers * cfg.gpus_per_worker) + 1e-9)
    placed_now = not gpus or gpu_fit > 0
    fit = min(fit, node_fit) if placed_now else fit
    if gpus:
        # No GPU yet with GPUs requested: an autoscaling cluster; let Tune queue trials as nodes arrive.
        fit = min(fit, gpu_fit) if gpu_fit else num_trials
    chosen = sweep.spec.max_concurrent_trials or max(1, min(fit, num_trials))
    # Raises with the arithmetic when even one trial (or the requested number) does not fit.
    extra_cpus = round((trial_cpus + data_cpus) * chosen, 6)
    check_cluster_fits(cfg, concurrent_runs=chosen, extra_cpus=extra_cpus)
    if placed_now:
        _check_nodes_fit(cfg, chosen, node_fit, trial_cpus)
    return chosen


def _check_nodes_fit(cfg: TrainConfig, trials: int, node_fit: int, trial_cpus: float) -> None:
    """Raise when ``trials`` at once cannot each be placed on the nodes with room left for Ray Data."""
    if trials <= node_fit:
        return
    driver = f" + {trial_cpus} CPU for its trial's driver" if trial_cpus else ""
    largest = max((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0)
    raise ConfigError(
        f"{trials} trial(s) x {cfg.num_workers} worker(s) of {cfg.cpus_per_worker} CPU{driver} leave no "
        f"room for a Ray Data task ({cfg.data_cpus_per_task} CPU) on the nodes (the largest has {largest:g} "
        "CPUs): "
        "lower cpus_per_worker or max_concurrent_trials, or give the head the trial_driver resource "
        "(a trial whose node has no room for its data waits forever)"
    )


def _sweep_to_run(
    layout: ExperimentLayout, sweep: ValidatedSweep, resume: bool
) -> tuple[ValidatedSweep, dict | None]:
    """The sweep a (resumed) sweep runs, and the saved record when resuming.

    Raises:
        ConfigError: an existing experiment without ``resume``, or nothing to resume.
    """
    saved = storage.read_json(layout.sweep_file)
    if saved is not None and not resume:
        raise ConfigError(
            f"experiment {layout.name!r} already exists at {layout.path}; pass --resume to continue it or "
            "choose another --name"
        )
    if resume and saved is None:
        raise ConfigError(f"nothing to resume: no experiment at {layout.path}")
    # A resumed sweep continues with the configuration it started with.
    return (ValidatedSweep.of(SweepSpec(**saved["spec"])), saved) if saved else (sweep, None)


def prepare_sweep_data(configs: Sequence[TrainConfig], root: str) -> PreparedData:
    """Validate the data for every trial (the pooling depth may vary over the grid) and index it."""
    data = prepare_data(configs[0], root)
    for depth in sorted({cfg.num_pool_layers for cfg in configs} - {configs[0].num_pool_layers}):
        prepare_data(next(cfg for cfg in configs if cfg.num_pool_layers == depth), root)
    return data


def _make_tuner(
    sweep: ValidatedSweep,
    storage_path: str,
    name: str,
    trainable,
    max_concurrent: int,
    resume: bool,
    tracking_uri: str | None = None,
    stage: str = "search",
) -> tune.Tuner:
    spec, layout = sweep.spec, ExperimentLayout.under(storage_path, name)
    if resume:
        path, filesystem = storage.ray_storage(layout.path)
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    root, filesystem = storage.ray_storage(storage_path)  # S3: Ray's syncing retries as ours does
    objective = primary_objective()
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=objective.metric,
            mode=objective.mode,
            search_alg=make_searcher(spec, max_concurrent),
            num_samples=spec.num_samples or 1,
            scheduler=make_scheduler(spec, layout),
            max_concurrent_trials=max_concurrent,
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=filesystem,
            verbose=1,
            # A trial whose driver died with its node is restarted; its Train run resumes from the trial's
            # own checkpoints (Train's FailureConfig covers the workers, this one the trial function).
            failure_config=tune.FailureConfig(max_failures=sweep.trials[0].max_failures),
            callbacks=[
                KeepTuneState(layout.path),
                EpochStepTensorBoard(),
                *tracking_callbacks(tracking_uri, layout.path, stage),
            ],
        ),
    )


@dataclass(frozen=True)
class SweepResult:
    """Where a sweep's experiments are.

    Attributes:
        search: the search's (or grid's) experiment directory (local path or URI).
        confirm: the confirm stage's, when the sweep has one (its tables are the sweep's results).
    """

    search: str
    confirm: str | None = None

    @property
    def final(self) -> str:
        """The experiment whose tables and best configuration are the sweep's."""
        return self.confirm or self.search


def run_sweep(
    sweep: ValidatedSweep,
    name: str,
    storage_path: str,
    data_root: str | None,
    resume: bool,
    tracking_uri: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep, then its confirm stage if it has one.

    Args:
        sweep: the sweep, every trial validated (a resumed experiment continues with its own spec).
        name: the experiment's name under ``storage_path`` (the confirm stage's: ``<name>-confirm``).
        storage_path: local path, NFS or s3:// URI shared by all nodes.
        data_root: the data (default: the saved experiment's, else the profile's synthetic data).
        resume: continue the experiment of that name (and its confirm stage, when it had started).
        tracking_uri: an MLflow tracking server (or store) every trial is logged to; None: none.

    Raises:
        ConfigError: bad configuration, data, cluster size, or an existing experiment without ``resume``.
    """
    check_tracking_uri(tracking_uri)  # a wrong address fails now, not once the data and cluster are ready
    with tracking_scope():
        search, results = _run_stage(sweep, name, storage_path, data_root, resume, tracking_uri)
        spec = search.sweep.spec
        if spec.confirm is None:
            return SweepResult(search.layout.path)
        confirm_name = name + CONFIRM_SUFFIX
        started = storage.exists(ExperimentLayout.under(storage_path, confirm_name).sweep_file)
        # A confirm stage that had started continues with the candidates it recorded.
        candidates = confirm_sweep(spec, rank_configurations(results, spec))
        root = search.data_root
        confirm, _ = _run_stage(candidates, confirm_name, storage_path, root, started, tracking_uri)
        return SweepResult(search.layout.path, confirm.layout.path)


@dataclass(frozen=True)
class _Stage:
    sweep: ValidatedSweep
    layout: ExperimentLayout
    data_root: str


def _run_stage(
    sweep: ValidatedSweep,
    name: str,
    storage_path: str,
    data_root: str | None,
    resume: bool,
    tracking_uri: str | None,
) -> tuple[_Stage, Any]:
    """One Tune experiment of a sweep (its search or its confirm stage) and its final evaluation."""
    layout = ExperimentLayout.under(storage_path, name)
    sweep, saved = _sweep_to_run(layout, sweep, resume)
    spec = sweep.spec
    root = str(data_root or (saved["data_root"] if saved else ensure_synthetic_data(spec.profile)))
    data = prepare_sweep_data(sweep.trials, root)
    connect()
    max_concurrent = concurrency(sweep)
    baselines = baselines_for(data, sweep.trials)
    record_baselines(layout.baseline_file, baselines)
    storage.write_json(layout.data_roles_file, data.roles())
    stage = "confirm" if spec.candidates else "search"
    if not resume:
        record = {
            "spec": spec.model_dump(mode="json"),
            "search_keys": spec.point_keys,
            "max_epochs": spec.max_epochs,
            "data_root": str(root),
            "stage": stage,
        }
        storage.write_json(layout.sweep_file, record)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, spec=spec, data=data, experiment_path=layout.path, baselines=baselines
        ),
        trial_resources(),
    )
    logger.info(
        "%s %s %r: %d trials (%s; seeds: %d), %s scheduler, up to %d at once, data %s, results in %s",
        "resuming" if resume else "starting", stage, name, sweep.num_trials, describe_space(spec),
        len(spec.seeds), spec.scheduler.type, max_concurrent, data.root, layout.path,
    )  # fmt: skip
    try:
        results = _fit(lambda: _make_tuner(sweep, storage_path, name, trainable, max_concurrent, resume,
                                           tracking_uri, stage), layout, resume)  # fmt: skip
        evaluate_finished_trials(layout, results, data)
    except storage.StorageError as err:  # the store stopped answering once trials ran: not a user error
        raise SweepStopped(layout.name, str(err)) from None
    except Exception as err:
        reason = _storage_failure(err, layout.path)
        if reason is None:
            raise
        raise SweepStopped(layout.name, reason) from None
    return _Stage(sweep, layout, root), results


def _fit(make_tuner: Callable[[], tune.Tuner], layout: ExperimentLayout, resume: bool) -> tune.ResultGrid:
    """``Tuner.fit``; a resumed sweep first gets back the last complete set of Tune's state files, and a
    restore that Tune gives up on (a read the store cut off) is tried again, never started afresh.

    Raises:
        SweepStopped: Tune could not read the state back after the storage's attempts.
    """
    if not resume:
        return make_tuner().fit()
    failure = None
    attempts = storage.s3_attempts() if storage.is_remote(layout.path) else 1  # a local file stays as it is
    for _ in range(attempts):
        restore_kept_state(layout.path)
        try:
            with watch_restore():
                return make_tuner().fit()
        except TuneRestoreFailed as err:
            failure = err
            logger.warning("Tune could not read the state of %s back (%s): trying again", layout.path, err)
    raise SweepStopped(
        layout.name, f"{layout.path}: Tune could not read its experiment state back ({failure})"
    )


def _storage_failure(err: Exception, path: str) -> str | None:
    """Whether the experiment's storage is why Tune failed, and how: a storage error in the text Tune made
    of a scheduler's or callback's error (``TuneError``), or the storage refusing a write now (Tune's own
    files then come out empty or cut short: a trial's ``error.pkl`` it cannot read back, an ``EOFError``
    or ``UnpicklingError``)."""
    if isinstance(err, TuneError):
        found = re.findall(r"^\S*StorageError: (.+)$", str(err), re.MULTILINE)
        return found[-1] if found else None
    if not isinstance(err, (OSError, EOFError, pickle.UnpicklingError)):
        return None
    probe = storage.join(path, ".storage_probe")
    try:
        storage.write_bytes(probe, bytes(64 << 10))  # a few blocks: an empty file fits on a full disk
    except storage.StorageError as refused:  # in the OS's words where it gives its error number
        number = re.search(r"\[errno (\d+)\]", str(refused), re.IGNORECASE)
        return f"{path}: {os.strerror(int(number.group(1)))}" if number else str(refused)  # it names the URI
    fs, probe_path = storage.filesystem(probe)
    fs.delete_file(probe_path)
    return None


class SweepStopped(Exception):
    """The sweep's storage failed after its trials started (an outage outlasting the retries); its
    experiment and every trial's checkpoints so far stay, and ``--resume`` continues it.

    Attributes:
        name: the experiment's name.
        reason: the failed operation's URI and cause, in one line.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def describe_space(spec: SweepSpec) -> str:
    """The searched space in a line: ``weight_decay: 2, model: 3`` (a grid), ``candidates: 3``, ``optuna over
    weight_decay: loguniform``."""
    if spec.candidates:
        return f"candidates: {len(spec.candidates)}"
    if spec.is_grid:
        return ", ".join(f"{key}: {len(values)}" for key, values in spec.search.items())
    kinds = {key: as_distribution(values).kind for key, values in spec.search.items()}
    return f"{spec.search_alg} over " + ", ".join(f"{key}: {kind}" for key, kind in kinds.items())


def evaluate_finished_trials(layout: ExperimentLayout, results, data: PreparedData) -> None:
    """The final evaluation of every trial that completed or was stopped by ASHA (not errored or
    diverged) and has none yet (:mod:`ray_jobs.final_evaluation`); a resumed sweep does only the rest."""
    runs, stopped = [], layout.stopped_trials()
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if result.error is not None or not trial_id or (result.metrics or {}).get("diverged"):
            continue
        run = layout.train_run(trial_id)
        cfg = make_train_config(storage.read_json(run.config_file))
        # A trial that ran its course owns every epoch it checkpointed, also one whose last report a killed
        # driver never copied to the experiment; a stopped one ends at the last report Tune received.
        last_epoch = int(result.metrics.get("epoch", cfg.epochs)) if trial_id in stopped else None
        item = pending(cfg, run, data, last_epoch=last_epoch)
        if item is not None:
            runs.append(item)
    if runs:
        logger.info("final evaluation of %d trial(s) on the test split (%s)", len(runs), data.test_source)
        evaluate_runs(runs, data, resolve_use_gpu(runs[0].cfg))


def result_checkpoint(metrics: dict[str, Any] | None, experiment_path: str) -> ray.train.Checkpoint | None:
    """The Ray Train checkpoint of one Tune result of a sweep (None: the result has none, or it was not kept).

    Ray 2.60 runs a Train run inside a Tune trial through ``TuneReportCallback``, which does not hand the
    checkpoint to Tune (it is in storage already) but adds its path to the result as ``checkpoint_path``:
    so ``Result.checkpoint`` and ``ExperimentAnalysis.get_best_checkpoint`` find none, while
    ``result.metrics["checkpoint_path"]`` names it. The checkpoint is looked up under the trial's own run
    in ``experiment_path`` (``train_runs/<trial id>/<checkpoint dir>``), so it is found after the experiment
    was moved or copied (a laptop after the cluster is gone), and on object storage with its scheme.

    Args:
        metrics: one result's metrics (``Result.metrics``, ``ExperimentAnalysis.best_result``, a row of
            ``result.json``).
        experiment_path: the sweep's directory, local or a URI.
    """
    path, trial_id = (metrics or {}).get(CHECKPOINT_PATH_KEY), (metrics or {}).get("trial_id")
    if not path or not trial_id:
        return None
    uri = storage.join(ExperimentLayout(experiment_path).train_run(trial_id).path, os.path.basename(path))
    if not experiment.is_complete_checkpoint(uri):
        return None
    return ray.train.Checkpoint(uri)
