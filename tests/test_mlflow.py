"""MLflow tracking of sweeps (``--mlflow URI``) against a real ``mlflow server`` on loopback.

The server keeps its runs in SQLite and serves the artifacts itself (uploads go through it, as from a
cluster's head), everything under the test's temporary directory. The slow tests run a two-trial smoke
sweep into it and check each run against the experiment's own files, then the MLflow UI's runs page in
headless Chromium, and continue a trial's run from a second driver as a resumed sweep does; the fast ones
check the failures before any trial and the pieces that need no server.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mri_models import storage
from mri_models.experiment import ExperimentLayout
from ray_jobs.baseline import mask_settings, record_baselines
from ray_jobs.config import make_train_config
from ray_jobs.images import read_images, write_event_file
from ray_jobs.sweep_config import load_sweep
from ray_jobs.tracking import EXTRA_HINT, epoch_metrics
from sweeps.sweep_command import sweep_main
from tests.ray_processes import BIN, free_port

REPO = Path(__file__).resolve().parents[1]
GAMMA_CONFIG = REPO / "sweeps" / "configs" / "gamma_sweep.yaml"
# Two trials side by side: Oktay's gate (whose coefficients the penalty can move) at gamma 0 and 0.01.
TWO_TRIALS = ["--profile", "smoke", "--set", "seeds=[0]", "--set", "search.psi_norm=[none]"]


@dataclass(frozen=True)
class MLflowServer:
    """A running ``mlflow server``: its tracking URI and the directory its artifacts land in."""

    uri: str
    artifacts: Path


def _stop(process: subprocess.Popen) -> None:
    """End ``process`` and the children in its session (by its id), SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_health(uri: str, server: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(
        f"mlflow server did not answer /health within {timeout:g} s: {log.read_text()[-2000:]}"
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MLflowServer]:
    """``mlflow server`` with a SQLite backend and served artifacts on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
    env = {**os.environ, "HOME": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = root / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_for_health(uri, server, log)
        yield MLflowServer(uri, root / "artifacts")
    finally:
        _stop(server)


@pytest.fixture(autouse=True, scope="module")
def tracking_uri_restored() -> Iterator[None]:
    """This process's MLflow tracking URI as before the module: the client calls made by its tests (runs
    read back, artifacts downloaded) may set it, and later sweeps in the session would log to a stopped
    server."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import mlflow

    mlflow.set_tracking_uri(previous)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture
def no_telemetry(monkeypatch) -> None:
    """This process's MLflow client sends (and writes under ~) no usage data."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_unreachable_tracking_uri_fails_before_any_trial(tmp_path, capsys, no_telemetry):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    code = sweep_main(GAMMA_CONFIG, [*TWO_TRIALS, "--storage", str(tmp_path), "--mlflow", uri])
    assert code == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], lines
    assert "Connection refused" in lines[0]
    assert time.monotonic() - started < 30  # no retries with back-off
    assert not any(tmp_path.iterdir()), "a bad tracking URI must not create the experiment"


def test_mlflow_flag_without_mlflow_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError, as uninstalled
    code = sweep_main(GAMMA_CONFIG, [*TWO_TRIALS, "--storage", str(tmp_path), "--mlflow", "http://x:1"])
    assert code == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and EXTRA_HINT in lines[0], lines


def test_epoch_metrics_keep_the_numbers_and_add_the_gain_over_zero_filled():
    result = {
        "epoch": 3, "ssim": 0.71, "nmse": 0.02, "psnr": 30.5, "mpand": math.nan, "diverged": 0.0,
        "done": False, "trial_id": "a1b2c_00000", "config": {"gamma": 0.1}, "training_iteration": 4,
        "checkpoint_dir_name": None, "date": "2026-12-07",
    }  # fmt: skip
    baseline = {"ssim": 0.6, "nmse": 0.05, "psnr": 25.0, "num_volumes": 2}
    metrics = epoch_metrics(result, baseline)
    gains = {"gain_ssim": 0.71 - 0.6, "gain_nmse": 0.05 - 0.02, "gain_psnr": 30.5 - 25.0}  # lower NMSE gains
    assert metrics.keys() == {"ssim", "nmse", "psnr", "diverged", *gains}
    for name, gain in gains.items():
        assert metrics[name] == pytest.approx(gain)
    assert epoch_metrics(result, None).keys() == {"ssim", "nmse", "psnr", "diverged"}


def test_read_images_gives_the_pngs_tensorboard_reads(tmp_path):
    rng = np.random.default_rng(0)
    for step in (1, 2):
        images = {"reconstruction": rng.random((8, 32)), "attention/level_1": rng.random((8, 8))}
        histograms = {"alpha/level_1": rng.integers(0, 5, 100)}
        write_event_file(str(tmp_path), images, step, "caption", histograms)
    write_event_file(str(tmp_path), {}, 3, None, histograms)  # an epoch with histograms only
    found = read_images(str(tmp_path))
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    expected = sorted(
        (event.step, tag, event.encoded_image_string)
        for tag in accumulator.Tags()["images"]
        for event in accumulator.Images(tag)
    )
    assert [(image.step, image.tag, image.png) for image in found] == expected
    assert {(image.step, image.tag) for image in found} == {
        (s, t) for s in (1, 2) for t in ("reconstruction", "attention/level_1")
    }


def _rendered_dom(url: str, home: Path) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts (``--virtual-time-budget``)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--disable-crash-reporter"]  # fmt: skip
    flags.append(f"--user-data-dir={home / 'chromium'}")
    command = [str(shutil.which("chromium")), *flags, "--virtual-time-budget=20000", "--dump-dom", url]
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home)}
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        env.pop(name, None)
    browser = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = browser.communicate(timeout=120)
    finally:
        _stop(browser)  # and whatever helper processes outlived it
    return out


def _expected_arm(experiment: Path, trial_id: str) -> str:
    """The arm of the configuration the trial's run recorded itself."""
    config = json.loads((experiment / "train_runs" / trial_id / "train_config.json").read_text())
    return make_train_config(config).arm.name


def _check_run(client, run, experiment: Path, trial, epochs: pd.DataFrame, zero_filled: dict) -> None:
    """One trial's run: name, tags, params, the metric histories by epoch, the images."""
    run_id = run.info.run_id
    assert run.info.run_name == trial.trial_dir and run.info.status == "FINISHED"
    assert run.data.tags["arm"] == _expected_arm(experiment, trial.trial_id)
    assert {key: run.data.tags[key] for key in ("seed", "sweep", "stage")} == {
        "seed": "0", "sweep": "tracked", "stage": "search",
    }  # fmt: skip
    config = json.loads((experiment / "train_runs" / trial.trial_id / "train_config.json").read_text())
    assert run.data.params == {
        **{key: str(value) for key, value in config.items()},
        **{f"zero_filled_{name}": str(zero_filled[name]) for name in ("nmse", "psnr", "ssim")},
    }
    reported = epochs[epochs["trial_id"] == trial.trial_id].sort_values("epoch")
    assert list(reported["epoch"]) == list(range(trial.epochs_run + 1))  # epoch 0: the untrained network
    for name, expected in (("ssim", reported["ssim"]), ("gain_ssim", reported["ssim"] - zero_filled["ssim"])):
        history = sorted(client.get_metric_history(run_id, name), key=lambda metric: metric.step)
        assert [metric.step for metric in history] == list(reported["epoch"]), name
        np.testing.assert_allclose([metric.value for metric in history], expected, rtol=1e-9, err_msg=name)
    # The images of every reported epoch from 1 (smoke writes each epoch's), as TensorBoard has them.
    images = EventAccumulator(str(experiment / trial.trial_dir / "images"), size_guidance={"images": 0})
    images.Reload()
    shown = {event.step: event.encoded_image_string for event in images.Images("reconstruction")}
    listed = [item.path for item in client.list_artifacts(run_id, "images/reconstruction")]
    epochs_with_images = range(1, trial.epochs_run + 1)
    assert listed == [f"images/reconstruction/epoch_{epoch:04d}.png" for epoch in epochs_with_images]
    assert client.list_artifacts(run_id, "images/attention/level_2")
    downloaded = Path(client.download_artifacts(run_id, listed[-1], str(experiment.parent / run_id)))
    assert downloaded.read_bytes() == shown[trial.epochs_run]
    with Image.open(io.BytesIO(downloaded.read_bytes())) as panel:
        assert panel.width == 4 * panel.height  # zero-filled | reconstruction | target | error


@dataclass(frozen=True)
class TrackedSweep:
    """A finished smoke sweep logged to the server, and where to look."""

    experiment: Path
    server: MLflowServer
    client: object  # mlflow.tracking.MlflowClient
    experiment_id: str
    tracking_uri_before: str | None  # this process's $MLFLOW_TRACKING_URI before and after the sweep
    tracking_uri_after: str | None


@pytest.fixture(scope="module")
def tracked_sweep(ray_head, mlflow_server, tmp_path_factory) -> Iterator[TrackedSweep]:
    """The two-trial smoke sweep run in this process with ``--mlflow`` (telemetry off meanwhile)."""
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        storage = tmp_path_factory.mktemp("sweeps")
        args = [*TWO_TRIALS, "--storage", str(storage), "--name", "tracked", "--mlflow", mlflow_server.uri]
        before = os.environ.get("MLFLOW_TRACKING_URI")
        assert sweep_main(GAMMA_CONFIG, args) == 0
        after = os.environ.get("MLFLOW_TRACKING_URI")
        client = MlflowClient(tracking_uri=mlflow_server.uri)
        experiment_id = client.get_experiment_by_name("tracked").experiment_id
        yield TrackedSweep(storage / "tracked", mlflow_server, client, experiment_id, before, after)


@pytest.mark.slow
def test_the_sweep_leaves_the_process_tracking_uri_as_it_was(tracked_sweep):
    import mlflow

    assert tracked_sweep.tracking_uri_after == tracked_sweep.tracking_uri_before
    assert mlflow.get_tracking_uri() != tracked_sweep.server.uri  # nor MLflow's own global setting


@pytest.mark.slow
def test_smoke_sweep_trials_are_mlflow_runs(tracked_sweep):
    experiment, client = tracked_sweep.experiment, tracked_sweep.client
    trials = pd.read_csv(experiment / "results" / "trials.csv")
    epochs = pd.read_csv(experiment / "results" / "epochs.csv")
    (baseline,) = json.loads((experiment / "baseline.json").read_text())["baselines"]
    runs = {run.data.tags["trial_id"]: run for run in client.search_runs([tracked_sweep.experiment_id])}
    assert len(trials) == 2 and sorted(runs) == sorted(trials["trial_id"])
    for trial in trials.itertuples():
        _check_run(client, runs[trial.trial_id], experiment, trial, epochs, baseline["metrics"])
    assert list(tracked_sweep.server.artifacts.rglob("epoch_0001.png")), "the images went through the server"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's `chromium` (apt-get install chromium)"
)
def test_mlflow_runs_page_shows_the_trials(tracked_sweep, tmp_path):
    trials = pd.read_csv(tracked_sweep.experiment / "results" / "trials.csv")
    url = f"{tracked_sweep.server.uri}/#/experiments/{tracked_sweep.experiment_id}/runs"
    dom = _rendered_dom(url, tmp_path)
    assert "tracked" in dom  # the experiment's name heads the page
    for name in trials["trial_dir"]:
        assert name in dom, f"the runs page does not show the run {name}"


def _restarted_experiment(root: Path) -> tuple[ExperimentLayout, str]:
    """A sweep's records (spec, baseline) and one trial directory with images of epochs 1 to 3."""
    validated = load_sweep(GAMMA_CONFIG, "smoke", {"seeds": [0], "search.psi_norm": ["none"]})
    layout = ExperimentLayout.under(str(root), "restarted")
    storage.write_json(layout.sweep_file, {"spec": validated.spec.model_dump(mode="json")})
    zero_filled = {
        "metrics": {"nmse": 0.1, "psnr": 20.0, "ssim": 0.5},
        "mask": mask_settings(validated.trials[0]),
    }
    record_baselines(layout.baseline_file, [zero_filled])
    name = "trial_abcde_00000_gamma=0,psi_norm=none,seed=0"
    for epoch in (1, 2, 3):  # 3: a stopped trial's worker validated one more epoch than Tune received
        panel = {"reconstruction": np.full((4, 16), epoch / 4)}
        write_event_file(layout.trial_dir(name).images_dir, panel, epoch, None)
    return layout, name


@pytest.mark.slow
def test_a_restarted_driver_continues_each_trials_run(mlflow_server, tmp_path, no_telemetry):
    from mlflow.tracking import MlflowClient
    from ray import cloudpickle
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from ray_jobs.mlflow_trials import MLflowTrials

    layout, name = _restarted_experiment(tmp_path)

    def trial() -> Trial:  # the trial as a (restarted) driver holds it: same id and directory
        context = StorageContext(str(tmp_path), layout.name, trial_dir_name=name)
        config = {"gamma": 0.0, "psi_norm": "none", "seed": 0}
        # A stub, as Tune makes restored trials: no trainable registered in this process.
        return Trial("run_trial", config=config, trial_id="abcde_00000", storage=context, stub=True)

    def report(callback: MLflowTrials, running: Trial, epoch: int, ssim: float) -> None:
        result = {"epoch": epoch, "ssim": ssim, "training_iteration": epoch + 1}
        running.update_last_result(result)
        callback.on_trial_result(iteration=epoch + 1, trials=[running], trial=running, result=result)

    # As Tune keeps it: pickled with the experiment when the Tuner is made, unpickled by each driver.
    pickled = cloudpickle.dumps(MLflowTrials(mlflow_server.uri, layout.path, "search"))
    first, running = cloudpickle.loads(pickled), trial()
    first.setup()
    first.on_trial_start(iteration=0, trials=[running], trial=running)
    report(first, running, 0, 0.4)
    report(first, running, 1, 0.55)
    # The driver is killed here; the resumed one restarts the trial, which reports epoch 2 and stops.
    second, running = cloudpickle.loads(pickled), trial()
    second.setup()
    second.on_trial_start(iteration=0, trials=[running], trial=running)
    report(second, running, 2, 0.6)
    second.on_trial_complete(iteration=3, trials=[running], trial=running)

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("restarted").experiment_id])
    assert (run.info.run_name, run.info.status) == (name, "FINISHED")
    history = sorted(client.get_metric_history(run.info.run_id, "gain_ssim"), key=lambda metric: metric.step)
    assert [metric.step for metric in history] == [0, 1, 2]
    np.testing.assert_allclose([metric.value for metric in history], [-0.1, 0.05, 0.1])
    listed = [item.path for item in client.list_artifacts(run.info.run_id, "images/reconstruction")]
    assert listed == ["images/reconstruction/epoch_0001.png", "images/reconstruction/epoch_0002.png"]
