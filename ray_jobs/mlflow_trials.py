"""Every trial of a sweep as an MLflow run: Ray Tune's ``MLflowLoggerCallback``, for this project's sweeps.

The callback runs in the sweep's driver, which alone talks to the tracking server (the trials' workers need
no access to it). One MLflow experiment per sweep, named after it (its confirm stage's trials join it,
tagged ``stage=confirm``), one run per trial, named after the trial's directory (as TensorBoard names it):

- params: the trial's resolved training configuration (every ``TrainConfig`` field, the searched values
  and the seed among them) and its zero-filled baseline's validation metrics (``zero_filled_<metric>``);
- tags: ``arm`` (:mod:`mri_models.arms`), ``seed``, ``sweep``, ``stage``, ``trial_id``, ``experiment_dir``;
- metrics: every number of every report, with the report's ``epoch`` as the step (0: the untrained
  network), and ``gain_<metric>`` over the zero-filled input for every validation metric (positive: better,
  as in the analysis' tables; :func:`ray_jobs.tracking.epoch_metrics`);
- artifacts, when the trial ends: the validation images its rank-0 worker wrote for TensorBoard
  (:mod:`ray_jobs.images`), as ``images/<tag>/epoch_<NNNN>.png``.

A resumed sweep's driver continues each trial's run (found by its ``trial_id`` tag) instead of opening
another: Tune restores the callback, and with it the tracking URI, with the experiment.

Importing this module imports MLflow (Ray's integration does): :mod:`ray_jobs.tracking` imports it only
for a sweep that is tracked.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from mri_models import storage
from mri_models.experiment import ExperimentLayout
from mri_models.metrics import metric_table
from ray_jobs.baseline import baseline_metrics
from ray_jobs.config import ConfigError, TrainConfig
from ray_jobs.images import read_images
from ray_jobs.sweep_config import SweepSpec
from ray_jobs.tracking import epoch_metrics, mlflow_experiment_name


class MLflowTrials(MLflowLoggerCallback):
    """Ray Tune's MLflow logger for the trials of one stage of a sweep (what it logs: the module's doc).

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment_path: the stage's experiment directory (local path or URI).
        stage: ``search`` or ``confirm``.
    """

    def __init__(self, tracking_uri: str, experiment_path: str, stage: str) -> None:
        layout = ExperimentLayout(experiment_path)
        sweep = mlflow_experiment_name(layout.name, stage)
        tags = {"sweep": sweep, "stage": stage, "experiment_dir": layout.path}
        super().__init__(tracking_uri, experiment_name=sweep, tags=tags)
        self.experiment_path = layout.path
        self.stage = stage

    def setup(self, *args, **kwargs) -> None:
        """Open (or create) the MLflow experiment; read the sweep's spec and zero-filled baselines."""
        from mlflow.tracking import MlflowClient

        super().setup(*args, **kwargs)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        layout = ExperimentLayout(self.experiment_path)
        saved = storage.read_json(layout.sweep_file)
        if saved is None:
            raise ConfigError(f"MLflow tracking: no sweep at {layout.path} ({layout.sweep_file} is missing)")
        self._spec = SweepSpec(**saved["spec"])
        self._baselines = (storage.read_json(layout.baseline_file) or {}).get("baselines", [])
        self._trial_baselines: dict[Any, dict[str, Any] | None] = {}

    def log_trial_start(self, trial) -> None:
        """The trial's run: its own from before (a retried trial, a resumed sweep), else a new one."""
        if trial in self._trial_runs:
            self._client.update_run(self._trial_runs[trial], status="RUNNING")  # a retry after a failure
            return
        # Imported here: ray_jobs.tune imports this module.
        from ray_jobs.tune import trial_point

        # The configuration and baseline the trial trains with, chosen as its trial function chooses them.
        cfg = self._spec.suggestion_config(trial_point(trial.config))
        baseline = baseline_metrics(self._baselines, cfg)
        self._trial_baselines[trial] = baseline
        run_id = self._earlier_run(trial)
        if run_id is None:
            run_id = self._new_run(trial, cfg, baseline)
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._trial_runs[trial] = run_id

    def _earlier_run(self, trial) -> str | None:
        """The run this stage opened for ``trial`` before the sweep's driver was restarted, if any."""
        runs = self._client.search_runs(
            [self.mlflow_util.experiment_id],
            filter_string=f"tags.trial_id = '{trial.trial_id}' and tags.stage = '{self.stage}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _new_run(self, trial, cfg: TrainConfig, baseline: Mapping[str, Any] | None) -> str:
        """A run named after the trial's directory, with its tags and params."""
        from mlflow.entities import Param

        tags = {**self.tags, "trial_id": trial.trial_id, "arm": cfg.arm.name, "seed": str(cfg.seed)}
        run = self.mlflow_util.start_run(run_name=trial.storage.trial_dir_name or str(trial), tags=tags)
        params = {key: str(value) for key, value in cfg.model_dump(mode="json").items()}
        for name in metric_table():
            if baseline and name in baseline:
                params[f"zero_filled_{name}"] = str(baseline[name])
        self._client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        """One report as one batch of metrics, stepped by its epoch."""
        from mlflow.entities import Metric

        step = int(result.get("epoch", iteration))
        values = epoch_metrics(result, self._trial_baselines.get(trial))
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self._client.log_batch(self._trial_runs[trial], metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        """The trial's validation images as PNG artifacts, then the run ends (FAILED if the trial did)."""
        self._log_images(trial)
        super().log_trial_end(trial, failed)

    def _log_images(self, trial) -> None:
        """The images of the epochs Tune received (not those of an epoch whose report Tune lost)."""
        name = trial.storage.trial_dir_name
        if not name:
            return
        images = read_images(ExperimentLayout(self.experiment_path).trial_dir(name).images_dir)
        last = (trial.last_result or {}).get("epoch")
        images = [image for image in images if last is None or image.step <= last]
        if not images:
            return
        with tempfile.TemporaryDirectory(prefix="mlflow_images_") as local:
            for image in images:
                path = os.path.join(local, *image.tag.split("/"), f"epoch_{image.step:04d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as file:
                    file.write(image.png)
            self._client.log_artifacts(self._trial_runs[trial], local, artifact_path="images")
