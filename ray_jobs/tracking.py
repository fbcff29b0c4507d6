"""Experiment tracking outside TensorBoard: every trial of a sweep as an MLflow run (optional extra).

``--mlflow URI`` (default ``$MLFLOW_TRACKING_URI``) checks the tracking URI before the sweep starts
(:func:`check_tracking_uri`) and adds :class:`ray_jobs.mlflow_trials.MLflowTrials` to the sweep's Tune
callbacks: one MLflow experiment per sweep, one run per trial with its configuration, per-epoch metrics
(with the gain over the zero-filled input, :func:`epoch_metrics`), tags and validation images. MLflow is
imported only then: Ray's MLflow integration imports it as soon as it is imported, and every trial's
process imports the Tune driver's module, which imports this one.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from ray.tune.result import AUTO_RESULT_KEYS

from mri_models.metrics import metric_table
from ray_jobs.config import ConfigError
from ray_jobs.confirm import CONFIRM_SUFFIX

EXTRA_HINT = "pip install -e '.[mlflow]'"
# The check's HTTP settings: a server that answers at all answers one search at once, while MLflow's own
# defaults (several retries with back-off, long timeouts) keep a mistyped address waiting for minutes.
CHECK_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Tune's own bookkeeping in every result, not the trial's measurements (``epoch`` is the step).
NOT_METRICS = frozenset({*AUTO_RESULT_KEYS, "done", "trial_id", "epoch"})


def tracking_callbacks(tracking_uri: str | None, experiment: str, stage: str) -> list:
    """Tune callbacks that log every trial of one stage of a sweep to ``tracking_uri`` (none: []).

    Args:
        tracking_uri: an MLflow tracking URI (a server's ``http(s)://`` address, or any store MLflow opens);
            None or empty: no tracking.
        experiment: the stage's experiment directory (local path or URI, ``ExperimentLayout.path``): its
            ``sweep.json`` and ``baseline.json`` are read when Tune starts, its trials' images when they end.
        stage: ``search`` or ``confirm`` (a tag of every run).

    Raises:
        ConfigError: MLflow is not installed, or the tracking URI does not answer
            (:func:`check_tracking_uri`).
    """
    if not tracking_uri:
        return []
    check_tracking_uri(tracking_uri)
    from ray_jobs.mlflow_trials import MLflowTrials

    return [MLflowTrials(tracking_uri, experiment, stage)]


def _require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401  (the optional extra)
    except ImportError:
        raise ConfigError(f"--mlflow / MLFLOW_TRACKING_URI needs MLflow: {EXTRA_HINT}") from None


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block (MLflow reads its HTTP settings at each request)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def tracking_scope() -> Iterator[None]:
    """The process's MLflow tracking URI as it was before the block, after it.

    Ray's MLflow callback calls ``mlflow.set_tracking_uri``, which also sets ``$MLFLOW_TRACKING_URI`` so
    that subprocesses inherit it: a sweep run in a process that goes on (a notebook, the tests) would
    otherwise log whatever that process runs next to the sweep's server.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:  # imported only when tracking was on
            mlflow.set_tracking_uri(previous)  # None unsets the variable
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _reason(err: BaseException) -> str:
    """The gist of an MLflow error in one line: the socket error if there is one (refused, unknown host)."""
    text = " ".join(str(err).split())
    socket_error = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    return socket_error.group(0).strip() if socket_error else text[:300]


def check_tracking_uri(tracking_uri: str | None) -> None:
    """Fail now, in one line, if MLflow is missing or ``tracking_uri`` is no usable tracking store.

    One search for an experiment, without retries and with a short timeout (:data:`CHECK_HTTP_SETTINGS`).

    Raises:
        ConfigError: naming the extra to install, or the URI and why it is unusable.
    """
    if not tracking_uri:
        return
    _require_mlflow()
    from mlflow.tracking import MlflowClient

    with _environment(CHECK_HTTP_SETTINGS):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except Exception as err:  # MlflowException, or whatever the store's own library raised
            raise ConfigError(
                f"MLflow tracking URI {tracking_uri} is not usable ({_reason(err)}): start a server (`mlflow "
                "server --backend-store-uri sqlite:///mlflow.db`) or correct --mlflow / MLFLOW_TRACKING_URI"
            ) from None


def mlflow_experiment_name(experiment_name: str, stage: str) -> str:
    """The sweep's name, which names its MLflow experiment: a confirm stage's ``<name>-confirm`` gives
    ``<name>``."""
    return experiment_name.removesuffix(CONFIRM_SUFFIX) if stage == "confirm" else experiment_name


def epoch_metrics(result: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, float]:
    """A report's metrics for MLflow: its finite numbers, less Tune's bookkeeping, and ``gain_<metric>``,
    the gain of each validation metric over the zero-filled ``baseline`` (positive: better).

    Undefined values (NaN: the MPAND of a network without attention, the training loss of epoch 0) are
    left out, as MLflow's charts cannot draw them.
    """
    values = {
        key: float(value)
        for key, value in result.items()
        if key not in NOT_METRICS
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }
    for name, metric in metric_table().items():
        if name in values and baseline and name in baseline:
            sign = 1.0 if metric.higher_is_better else -1.0
            values[f"gain_{name}"] = sign * (values[name] - float(baseline[name]))
    return values
