"""fastMRI data in object storage, on a real S3-protocol server (moto in server mode on loopback).

The same generated volumes are read from a local directory and from ``s3://``: listing, validation and the
rows the training pipeline makes must agree exactly, reads must be ranged (a slice costs its own bytes, not
the file's), and a bad URI, a missing bucket or prefix fails before anything trains, naming the URI.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import h5py
import numpy as np
import pytest

from mri_models import storage
from mri_models.data import store
from mri_models.data.cache import FileCache
from mri_models.data.slice_dataset import list_volumes
from mri_models.data.validate import DataValidationError, validate_root
from ray_jobs.config import make_train_config
from ray_jobs.data import iter_rows_locally, prepare_data, train_read_tasks, val_read_tasks
from tests.conftest import make_fastmri_volume, moto_server, s3_env

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("singlecoil_train", "singlecoil_val")


@pytest.fixture
def s3_root(s3_server, fastmri_root, request) -> str:
    """``fastmri_root`` uploaded to a bucket of its own."""
    bucket = f"knee-{abs(hash(request.node.name)) % 10**8}"
    return s3_server.upload(fastmri_root, f"s3://{bucket}/fastmri/knee")


def _cfg(**values):
    return make_train_config({"chans": 4, "num_pool_layers": 2, "batch_size": 1, **values})


def test_listing_and_validation_on_s3_match_local(fastmri_root, s3_root):
    for split in SPLITS:
        local = list_volumes(fastmri_root / split, cache_dir="")
        remote = list_volumes(f"{s3_root}/{split}", cache_dir="")
        assert [os.path.basename(str(v.fname)) for v in remote] == [v.fname.name for v in local]
        assert [(v.num_slices, v.metadata) for v in remote] == [(v.num_slices, v.metadata) for v in local]
        assert all(str(v.fname).startswith(f"{s3_root}/{split}/") for v in remote)
    report = validate_root(s3_root, SPLITS, check_values=False)
    assert report.ok, report.format()
    assert report.files_checked == validate_root(fastmri_root, SPLITS).files_checked == 5


@pytest.mark.parametrize("subsample", [{"sample_rate": 0.5}, {"volume_sample_rate": 0.5}])
def test_subsampling_on_s3_selects_the_same_slices_as_locally(fastmri_root, s3_root, subsample):
    cfg = _cfg(**subsample)
    local, remote = prepare_data(cfg, fastmri_root), prepare_data(cfg, s3_root)
    for split in ("train_slices", "val_slices"):
        names = [
            [(os.path.basename(str(path)), index) for path, index in getattr(d, split)]
            for d in (local, remote)
        ]
        assert names[0] == names[1] and 0 < len(names[0])


def test_training_and_validation_rows_from_s3_equal_local_rows(fastmri_root, s3_root):
    cfg = _cfg()
    local, remote = prepare_data(cfg, fastmri_root), prepare_data(cfg, s3_root)
    assert remote.root == s3_root and remote.image_size == local.image_size
    assert [s for _, s in remote.train_slices] == [s for _, s in local.train_slices]
    tasks = {
        True: lambda data: train_read_tasks(data.train_slices, 1, 0, 1, cfg.seed, cfg.slices_per_read),
        False: lambda data: val_read_tasks(data.val_slices, 0, 1, cfg.slices_per_read),
    }
    for training, make_tasks in tasks.items():
        rows = [
            list(iter_rows_locally(make_tasks(d), cfg, training=training, epoch=1)) for d in (local, remote)
        ]
        assert len(rows[0]) == len(rows[1]) > 0
        for a, b in zip(*rows, strict=True):
            assert (a["fname"], a["slice_num"]) == (b["fname"], b["slice_num"])
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["target"], b["target"])


def test_remote_reads_are_ranged(s3_server, tmp_path):
    # A volume of 24 slices of 256 x 148 complex64 k-space (~7 MB): one slice is 1/24 of it.
    root = tmp_path / "big"
    path = make_fastmri_volume(
        root / "singlecoil_val" / "big.h5", num_slices=24, kspace_shape=(256, 148), recon_size=(128, 128)
    )
    size = path.stat().st_size
    uri = s3_server.upload(root, "s3://ranged-reads/data")
    slice_bytes = 256 * 148 * 8 + 128 * 128 * 4  # one slice of k-space and its target

    before = store.remote_bytes_read()
    report = validate_root(uri, ("singlecoil_val",), check_values=False)
    metadata_bytes = store.remote_bytes_read() - before
    assert report.ok, report.format()
    assert metadata_bytes < size / 20, f"validation read {metadata_bytes} of {size} bytes"

    before = store.remote_bytes_read()
    with store.open_hdf5(f"{uri}/singlecoil_val/big.h5") as hf:
        kspace, target = hf["kspace"][7], hf["reconstruction_esc"][7]
    one_slice = store.remote_bytes_read() - before
    assert kspace.shape == (256, 148) and target.shape == (128, 128)
    assert slice_bytes <= one_slice < slice_bytes + 256 * 1024, (one_slice, slice_bytes, size)


def _big_volume_on_s3(s3_server, tmp_path, bucket: str, names=("big.h5",)) -> list[str]:
    """Volumes of 24 slices of 256 x 148 k-space (~7 MB each) uploaded to ``bucket``; their URIs."""
    root = tmp_path / bucket
    for name in names:
        make_fastmri_volume(
            root / "singlecoil_val" / name, num_slices=24, kspace_shape=(256, 148), recon_size=(128, 128)
        )
    uri = s3_server.upload(root, f"s3://{bucket}/data")
    return [f"{uri}/singlecoil_val/{name}" for name in names]


def test_cached_rows_equal_streamed_rows_and_later_epochs_read_nothing_remote(s3_root, tmp_path):
    streamed = _cfg()
    cached = _cfg(data_cache_gb=1, data_cache_dir=str(tmp_path / "cache"))
    data = prepare_data(streamed, s3_root)
    tasks = train_read_tasks(data.train_slices, 1, 0, 1, 0, streamed.slices_per_read)
    files = {task["path"] for task in tasks}
    whole_files = sum(storage.stat(uri).size for uri in files)

    reference = list(iter_rows_locally(tasks, streamed, training=True, epoch=1))
    before = store.remote_bytes_read()
    first = list(iter_rows_locally(tasks, cached, training=True, epoch=1))
    assert store.remote_bytes_read() - before == whole_files  # each file downloaded once, whole
    before = store.remote_bytes_read()
    second = list(iter_rows_locally(tasks, cached, training=True, epoch=1))
    assert store.remote_bytes_read() - before == 0  # served from the node's copies
    for rows in (first, second):
        for a, b in zip(reference, rows, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["target"], b["target"])


def test_cache_keeps_to_its_bound_evicting_the_least_recently_used(s3_server, tmp_path):
    uris = _big_volume_on_s3(s3_server, tmp_path, "cache-bound", ("a.h5", "b.h5", "c.h5"))
    size = storage.stat(uris[0]).size
    cache = FileCache(str(tmp_path / "cache"), max_bytes=int(2.5 * size))
    a, b = cache.local_copy(uris[0]), cache.local_copy(uris[1])
    assert cache.local_copy(uris[0]) == a  # a is now the most recently used
    c = cache.local_copy(uris[2])
    assert cache.size() <= cache.max_bytes
    assert os.path.exists(a) and os.path.exists(c) and not os.path.exists(b)
    assert FileCache(str(tmp_path / "small"), max_bytes=size - 1).local_copy(uris[0]) is None
    with store.open_hdf5(uris[0], FileCache(str(tmp_path / "small"), max_bytes=size - 1)) as hf:
        assert hf["kspace"].shape[0] == 24  # too big to cache: read from the object store


def test_a_changed_object_is_not_served_from_the_cache(s3_server, tmp_path):
    (uri,) = _big_volume_on_s3(s3_server, tmp_path, "cache-change")
    cache = FileCache(str(tmp_path / "cache"), max_bytes=1 << 30)
    with store.open_hdf5(uri, cache) as hf:
        old = hf["kspace"][0]
    (tmp_path / "new").mkdir()
    make_fastmri_volume(tmp_path / "new" / "big.h5", num_slices=24, kspace_shape=(256, 148),
                        recon_size=(128, 128), seed=99)  # fmt: skip
    s3_server.upload(tmp_path / "new", uri.rsplit("/", 1)[0])
    with store.open_hdf5(uri, cache) as hf:
        new = hf["kspace"][0]
    with h5py.File(tmp_path / "new" / "big.h5") as hf:
        np.testing.assert_array_equal(new, hf["kspace"][0])
    assert not np.array_equal(old, new)


def _copy_in_child(args) -> tuple[str, int]:
    directory, uri, barrier = args
    barrier.wait()
    path = FileCache(directory, max_bytes=1 << 30).local_copy(uri)
    return path, store.remote_bytes_read()


def test_concurrent_processes_download_a_file_once_and_share_it(s3_server, tmp_path):
    (uri,) = _big_volume_on_s3(s3_server, tmp_path, "cache-race")
    directory = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(4) as pool:
        barrier = manager.Barrier(4)
        results = pool.map(_copy_in_child, [(directory, uri, barrier)] * 4)
    (path,) = {path for path, _ in results}
    assert sum(read for _, read in results) == storage.stat(uri).size  # one download among the four
    with h5py.File(path) as local, store.open_hdf5(uri) as remote:
        np.testing.assert_array_equal(local["kspace"][()], remote["kspace"][()])
    name = os.path.basename(path)
    assert sorted(os.listdir(directory)) == sorted([name, f"{name}.lock", "evict.lock"])  # no partial file


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("s3://no-such-bucket/knee", "s3://no-such-bucket/knee: bucket s3://no-such-bucket does not exist"),
        ("s4://bucket/knee", "s4://bucket/knee"),
    ],
)
def test_unreachable_roots_fail_before_training_naming_the_uri(s3_server, root, message):
    with pytest.raises((DataValidationError, FileNotFoundError), match=message.replace(".", r"\.")):
        prepare_data(_cfg(), root)


def test_missing_prefix_and_bad_file_on_s3_are_named(s3_server, fastmri_root):
    with pytest.raises(DataValidationError, match=r"s3://.*/nothing-here: data root does not exist"):
        prepare_data(
            _cfg(), s3_server.upload(fastmri_root, "s3://prefix-test/knee").replace("knee", "nothing-here")
        )
    (fastmri_root / "singlecoil_val" / "garbage.h5").write_bytes(b"not an hdf5 file at all")
    uri = s3_server.upload(fastmri_root, "s3://bad-file/knee")
    with pytest.raises(DataValidationError, match=r"singlecoil_val/garbage\.h5: cannot be opened as HDF5"):
        prepare_data(_cfg(), uri)


@pytest.fixture(scope="module")
def locked_bucket(tmp_path_factory) -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    """``s3://locked/knee`` on a moto server that enforces credentials, and two sets of AWS variables that
    it refuses: an unknown access key, and a real user's key without any permission."""
    # The first four requests are let through unauthenticated: they set the bucket and the user up.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="4") as endpoint:
        keys = {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                "region_name": "us-east-1"}  # fmt: skip
        s3, iam = boto3.client("s3", **keys), boto3.client("iam", **keys)
        volume = make_fastmri_volume(tmp_path_factory.mktemp("locked") / "v.h5")
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="knee/singlecoil_train/v.h5", Body=volume.read_bytes())
        iam.create_user(UserName="no-permissions")
        user = iam.create_access_key(UserName="no-permissions")["AccessKey"]
        yield (
            "s3://locked/knee",
            {
                "unknown key": s3_env(endpoint, "AKIAUNKNOWN", "wrong"),
                "no permission": s3_env(endpoint, user["AccessKeyId"], user["SecretAccessKey"]),
            },
        )


@pytest.mark.parametrize("credentials", ["unknown key", "no permission"])
def test_denied_access_fails_before_training_naming_the_uri(locked_bucket, credentials, monkeypatch):
    root, envs = locked_bucket
    for key, value in envs[credentials].items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DataValidationError) as raised:
        prepare_data(_cfg(), root)
    assert f"{root}: access denied" in str(raised.value) and "AWS_ACCESS_KEY_ID" in str(raised.value)
    volume = f"{root}/singlecoil_train/v.h5"
    with pytest.raises(storage.StorageError, match=rf"^{re.escape(volume)}: access denied"):
        with store.open_hdf5(volume):
            pass
    command = [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", root]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=os.environ)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{root}: access denied" in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_train_cli_names_a_missing_bucket_in_one_line(s3_server):
    command = [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root",
               "s3://no-such-bucket/knee"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=os.environ)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "s3://no-such-bucket/knee" in done.stdout and "Traceback" not in done.stdout + done.stderr
