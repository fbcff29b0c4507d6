"""Object storage that fails as real stores do, through a fault-injecting proxy (:mod:`tests.s3_faults`) on
loopback in front of a real S3-protocol server (moto in server mode).

Every S3 request of this project is retried with bounded backoff (``MRI_MODELS_S3_ATTEMPTS`` attempts,
:class:`mri_models.storage.RetryingS3FileSystem`, also inside Ray's own syncing): reads and writes
through a store answering 503 SlowDown, 500, reset connections, cut-off answers and latency come back
whole and equal, and a lasting outage fails in one line naming the URI after exactly the bounded number of
attempts.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from mri_models import storage
from mri_models.data import store
from mri_models.data.synthetic import generate_dataset
from mri_models.data.validate import validate_root
from ray_jobs.config import SYNTHETIC_DATA
from tests.conftest import s3_env
from tests.s3_faults import FAULT_KINDS, FaultPlan, faulty_proxy
from tests.sweep_tables import comparable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def flaky(s3_server, monkeypatch) -> Iterator[FaultPlan]:
    """This process's AWS variables pointing at a proxy in front of the session's S3 server; its plan."""
    plan = FaultPlan(fraction=0.0, seed=7)
    with faulty_proxy(s3_server.endpoint, plan) as endpoint:
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        yield plan


def test_reads_writes_and_listings_through_a_flaky_store_come_back_whole(s3_server, flaky):
    plan = flaky
    bucket = s3_server.create_bucket("flaky-roundtrip")
    rng = random.Random(0)
    sizes = [rng.choice([10, 5_000, 300_000]) for _ in range(24)]
    payloads = {f"{bucket}/run/file_{i}.bin": rng.randbytes(size) for i, size in enumerate(sizes)}
    plan.fraction = 0.3  # of requests: each fault kind about 6% of them
    for uri, data in payloads.items():
        storage.write_bytes(uri, data)
    for uri, data in payloads.items():
        assert storage.read_bytes(uri) == data, uri  # never a cut-off answer taken for the file
    listed = {entry.uri: entry.size for entry in storage.list_files(f"{bucket}/run")}
    assert listed == {uri: len(data) for uri, data in payloads.items()}
    assert storage.read_bytes(f"{bucket}/run/missing.bin") is None  # absence stays an answer
    assert all(plan.counts[kind] > 0 for kind in FAULT_KINDS), plan.counts


def test_hdf5_read_in_ranges_through_a_flaky_store_equals_the_local_files(s3_server, flaky, tmp_path):
    """h5py's ranged reads and the node cache's download: an answer cut off after its headers (which the
    AWS SDK does not retry) is asked for again, and the data equal the local files'."""
    plan = flaky
    local = tmp_path / "data"
    generate_dataset(local, seed=0, **{**SYNTHETIC_DATA["smoke"], "num_train": 1, "num_val": 1})
    root = s3_server.upload(local, "s3://flaky-hdf5/knee")
    plan.fraction, plan.kinds = 0.3, ("truncated", "slowdown", "reset")
    validate_root(root)  # every file's header, attributes and shapes, read in ranges
    for path in sorted(local.rglob("*.h5")):
        uri = f"{root}/{path.relative_to(local)}"
        with store.open_hdf5(uri) as remote, h5py.File(path, "r") as here:
            assert np.array_equal(remote["kspace"][()], here["kspace"][()]), uri
        store.download(uri, str(tmp_path / "copy.h5"))
        assert (tmp_path / "copy.h5").read_bytes() == path.read_bytes(), uri
    assert plan.counts["truncated"] > 0, plan.counts


def test_the_retrying_filesystem_keeps_its_attempts_when_pickled(s3_server, monkeypatch):
    monkeypatch.setenv(storage.S3_ATTEMPTS_VARIABLE, "5")
    fs, path = storage.filesystem("s3://bucket/prefix")
    assert isinstance(fs, storage.RetryingS3FileSystem) and path == "bucket/prefix"
    copy = pickle.loads(pickle.dumps(fs))  # as Ray sends a run's storage filesystem to its workers
    assert isinstance(copy, storage.RetryingS3FileSystem) and copy.max_attempts == 5
    path, ray_fs = storage.ray_storage("s3://bucket/prefix/")  # what Ray's RunConfig is given
    assert path == "bucket/prefix" and isinstance(ray_fs, storage.RetryingS3FileSystem)
    assert storage.ray_storage(str(REPO)) == (str(REPO), None)


@pytest.mark.parametrize("attempts", [1, 4])
def test_a_lasting_outage_fails_in_one_line_after_exactly_the_bounded_attempts(s3_server, flaky, attempts,
                                                                                monkeypatch):  # fmt: skip
    plan = flaky
    monkeypatch.setenv(storage.S3_ATTEMPTS_VARIABLE, str(attempts))
    plan.outage = True
    with pytest.raises(storage.StorageError) as raised:
        storage.read_bytes("s3://outage-bucket/knee/sweep.json")
    assert str(raised.value).startswith("s3://outage-bucket/knee/sweep.json: ")
    assert "\n" not in str(raised.value)
    assert plan.counts["outage"] == attempts  # one request, its retries, no more


def test_the_training_command_names_the_unreachable_data_root_in_one_line(s3_server, flaky, tmp_path):
    plan = flaky
    local = tmp_path / "data"
    generate_dataset(local, seed=0, **{**SYNTHETIC_DATA["smoke"], "num_train": 2, "num_val": 1})
    root = s3_server.upload(local, "s3://outage-data/knee")
    validate_root(root)  # reachable through the proxy
    plan.outage = True
    env = {**os.environ, storage.S3_ATTEMPTS_VARIABLE: "2"}
    command = [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", root,
               "--storage", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and root in errors[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written before the data is reachable"


def _store_csv(uri: str) -> pd.DataFrame:
    """A CSV from object storage as a DataFrame."""
    data = storage.read_bytes(uri)
    assert data is not None, f"{uri} was not written"
    return pd.read_csv(io.BytesIO(data))


def _sweep_job(ray_head, data: str, results: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """The smoke gamma sweep (2 trials, 6 epochs, ASHA) as a Ray job whose runtime environment carries ``env``
    (as a user points a cluster at an S3 endpoint). One trial at a time: ASHA's decisions depend on the order
    trials reach a rung, and two at once reach them in whichever order the faults' delays make (CI: the
    second trial stopped at a rung it had passed on local disk)."""
    return [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": env}), "--",
        "python", "sweeps/gamma_sweep.py", "--profile", "smoke", "--data-root", data, "--storage", results,
        "--name", "sweep", "--set", "seeds=[0]", "--set", "search.gamma=[0,1e-4]",
        "--set", "search.psi_norm=[instance]", "--set", "epochs=6", "--set", "image_every_epochs=0",
        "--set", "data_cache_gb=0.5", "--set", f"data_cache_dir={tmp_path / 'node_cache'}",
        "--set", "max_concurrent_trials=1",
    ]  # fmt: skip


def _some_epoch_reported(experiment: str) -> bool:
    """Some trial of the experiment has reported a trained epoch (read from the server, past the proxy)."""
    fs, path = storage.filesystem(experiment)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    reports = [info.path for info in fs.get_file_info(selector) if info.path.endswith("/result.json")]
    return any((storage.read_text(f"s3://{report}") or "").count("\n") >= 2 for report in reports)


def _run(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_sweep_on_a_flaky_store_through_an_outage_equals_the_sweep_on_local_disk(
    ray_head, s3_server, tmp_path
):
    """Data and experiment on S3 behind the fault proxy (5% of requests fail, every kind), then an outage in
    the middle of the sweep: the sweep stops in one line naming the URI after the bounded retries; once the
    store is back, ``--resume`` finishes it, and its tables equal those of the same sweep on local disk,
    number for number; the analysis reads it from S3."""
    local = tmp_path / "data"
    generate_dataset(local, seed=0, **{**SYNTHETIC_DATA["smoke"], "num_train": 2, "num_val": 1})
    reference = subprocess.run(
        _sweep_job(ray_head, str(local), str(tmp_path / "local"), {}, tmp_path), env=ray_head.env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    data = s3_server.upload(local, "s3://sweep-data/knee")
    results = s3_server.create_bucket("sweep-results") + "/experiments"
    experiment = f"{results}/sweep"
    plan = FaultPlan(fraction=0.05, seed=3)
    with faulty_proxy(s3_server.endpoint, plan) as endpoint:
        command = _sweep_job(ray_head, data, results, {**s3_env(endpoint), storage.S3_ATTEMPTS_VARIABLE: "3"},
                             tmp_path)  # fmt: skip
        job = _run(command, ray_head.env, tmp_path / "outage.log")
        deadline = time.monotonic() + 400
        while job.poll() is None and not _some_epoch_reported(experiment) and time.monotonic() < deadline:
            time.sleep(1)
        assert job.poll() is None, (tmp_path / "outage.log").read_text()[-3000:]
        plan.outage = True
        assert job.wait(timeout=600) == 1, (tmp_path / "outage.log").read_text()[-3000:]
        text = (tmp_path / "outage.log").read_text()
        # `ray job submit` shows the job's log as it runs and again in its failure status: one line, twice.
        stopped = sorted({line for line in text.splitlines() if line.startswith("sweep 'sweep' stopped: s3://")})
        assert len(stopped) == 1 and stopped[0].endswith(
            "(every trial's last complete checkpoint is kept: once the storage answers again, then run the "
            "same command with --resume)"
        ), text[-3000:]
        plan.outage = False
        resumed = subprocess.run([*command, "--resume"], env=ray_head.env, capture_output=True, text=True,
                                 timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        print(f"\nS3 requests through the proxy: {dict(plan.counts)}\n{stopped[0]}")
        assert all(plan.counts[kind] > 0 for kind in FAULT_KINDS), plan.counts
    for name, keys in (("trials.csv", ["gamma"]), ("epochs.csv", ["gamma", "epoch"])):
        on_s3 = comparable(_store_csv(f"{experiment}/results/{name}"), keys)
        on_disk = comparable(pd.read_csv(tmp_path / "local" / "sweep" / "results" / name), keys)
        pd.testing.assert_frame_equal(on_s3, on_disk, check_exact=True)
    cached = sorted(p.stat().st_size for p in (tmp_path / "node_cache").glob("*.h5"))
    assert cached == sorted(storage.stat(f"{data}/{p.relative_to(local)}").size for p in local.rglob("*.h5"))

    # The analysis reads the experiment from S3 and writes a local report.
    out = tmp_path / "report"
    analysis = subprocess.run(
        [sys.executable, "-m", "analysis", "--experiment", experiment, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ,
    )  # fmt: skip
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "gamma_curves.png" in report and (out / "gamma_curves.png").is_file()
    # The reconstructions step read the validation volumes from the experiment's s3:// data root.
    assert list(out.glob("reconstructions_*.png")) and "reconstructions:" not in report, report
