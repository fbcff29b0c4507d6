"""Object storage that fails as real stores do, through a fault-injecting proxy (:mod:`tests.s3_faults`) on
loopback in front of a real S3-protocol server (moto in server mode).

Every S3 request of this project is retried with bounded backoff (``MRI_MODELS_S3_ATTEMPTS`` attempts,
:class:`mri_models.storage.RetryingS3FileSystem`, also inside Ray's own syncing): reads and writes
through a store answering 503 SlowDown, 500, reset connections, cut-off answers and latency come back
whole and equal, and a lasting outage fails in one line naming the URI after exactly the bounded number of
attempts.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mri_models import storage
from mri_models.data.synthetic import generate_dataset
from mri_models.data.validate import validate_root
from ray_jobs.config import SYNTHETIC_DATA
from tests.conftest import s3_env
from tests.s3_faults import FAULT_KINDS, FaultPlan, faulty_proxy

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
