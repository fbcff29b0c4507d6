"""Shared fixtures: small volumes written in the exact fastMRI single-coil HDF5 layout.

These fixtures deliberately do not use ``mri_models.data.synthetic``: the reader, transforms and validator
are tested on files built here from first principles, so a bug in the generator cannot hide a bug in them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mri_models.data.volume import build_ismrmrd_header, write_volume
from tests.ray_processes import BIN, free_port, head_env, head_flags, kill_sessions, ray_start

# Ray reads its authentication mode when it is first imported; the integration tests' head runs with token
# authentication on (as Ray 2.60 recommends), so every Ray client in this process must send the token. The
# token is an environment variable, never a file: `ray get-auth-token --generate` would write
# ~/.ray/auth_token, after which the user's own `ray start --head` + `ray.init()` fails to authenticate.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

# matplotlib keeps its font cache and config in ~/.cache/matplotlib and ~/.config/matplotlib unless
# MPLCONFIGDIR says otherwise; the tests (and the analysis subprocesses, which inherit it) use a temporary
# one, removed when the session ends.
_MATPLOTLIB_DIR = tempfile.TemporaryDirectory(prefix="mri_models_tests_mpl_")
os.environ.setdefault("MPLCONFIGDIR", _MATPLOTLIB_DIR.name)


@pytest.fixture(scope="session", autouse=True)
def _caches_in_temporary_directories(tmp_path_factory) -> Iterator[None]:
    """Slice listings, synthetic datasets and baselines go under the session's temporary directory."""
    previous = os.environ.get("MRI_MODELS_CACHE_DIR")
    os.environ["MRI_MODELS_CACHE_DIR"] = str(tmp_path_factory.mktemp("mri_models_cache"))
    yield
    if previous is None:
        os.environ.pop("MRI_MODELS_CACHE_DIR", None)
    else:
        os.environ["MRI_MODELS_CACHE_DIR"] = previous


def centred_ifft2(kspace: np.ndarray) -> np.ndarray:
    """fastMRI's centred orthonormal 2-D inverse FFT over the last two axes."""
    shifted = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifftn(shifted, axes=(-2, -1), norm="ortho"), axes=(-2, -1))


def centre_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """fastMRI's centre crop over the last two axes."""
    h, w = image.shape[-2:]
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return image[..., top : top + shape[0], left : left + shape[1]]


def make_fastmri_volume(
    path: Path,
    num_slices: int = 3,
    kspace_shape: tuple[int, int] = (64, 40),
    recon_size: tuple[int, int] = (32, 32),
    seed: int = 0,
    acquisition: str = "CORPD_FBK",
    with_target: bool = True,
) -> Path:
    """Write a valid fastMRI single-coil volume of random k-space with a target derived as fastMRI does.

    The acquired phase-encoding band is narrower than the matrix, like real knee data, so the header's
    padding_left/right are non-trivial.
    """
    rng = np.random.default_rng(seed)
    height, width = kspace_shape
    shape = (num_slices, height, width)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64) * 1e-4
    pe_maximum = width - 5  # columns [padding_left, padding_right) are acquired
    pe_center = pe_maximum // 2
    padding_left = width // 2 - pe_center
    kspace[..., :padding_left] = 0
    kspace[..., padding_left + pe_maximum + 1 :] = 0
    header = build_ismrmrd_header((height, width, 1), (*recon_size, 1), pe_center, pe_maximum)
    target = centre_crop(np.abs(centred_ifft2(kspace)), recon_size).astype(np.float32)
    attrs = {
        "acquisition": acquisition,
        "max": float(target.max()),
        "norm": float(np.linalg.norm(target)),
        "patient_id": f"patient-{seed:04d}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(path, kspace, header, attrs, target if with_target else None)
    return path


class DriverProcess(subprocess.Popen):
    """A sweep or study driver started in a session of its own, its output going to a log file.

    Never to a pipe: a pipe that nobody reads while the driver runs fills at 64 KiB, and then the driver's
    next print blocks. A Tune driver printing the worker logs Ray forwards to it stops its control loop
    there, while its trials keep training and no result reaches Tune: the sweep hangs.
    """

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:  # the child keeps its own descriptor
            super().__init__(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip

    def output(self, timeout: float | None = None) -> str:
        """Wait for the driver to end (``timeout`` seconds at most) and return everything it printed."""
        self.wait(timeout=timeout)
        return self.log.read_text()


def finished_trials(experiment: Path, last_epoch: int = 2) -> dict[str, str]:
    """``result.json`` of every Tune trial of ``experiment`` that reported ``last_epoch`` (smoke: 2)."""
    finished = {}
    for result in experiment.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("epoch") == last_epoch:
            finished[result.parent.name] = result.read_text()
    return finished


def kill_once_a_trial_finished(driver: DriverProcess, experiment: Path) -> dict[str, str]:
    """SIGKILL a sweep driver's process group once one of its trials finished; returns those trials."""
    deadline = time.monotonic() + 300
    while not finished_trials(experiment) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    finished = finished_trials(experiment)
    assert finished and driver.poll() is None, "the driver ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    return finished


@pytest.fixture
def fastmri_volume() -> Callable[..., Path]:
    """``make_fastmri_volume(path, ...)``: write one small valid volume and return its path."""
    return make_fastmri_volume


@pytest.fixture
def fastmri_root(tmp_path: Path) -> Path:
    """A data root with three train, two val and two held-out test volumes (with targets) of varying widths
    and both knee contrasts."""
    for i, width in enumerate((40, 41, 44)):
        make_fastmri_volume(
            tmp_path / "singlecoil_train" / f"file_train{i}.h5",
            num_slices=3 + i,
            kspace_shape=(64, width),
            seed=i,
            acquisition=("CORPD_FBK", "CORPDFS_FBK")[i % 2],
        )
    for i, width in enumerate((40, 43)):
        make_fastmri_volume(
            tmp_path / "singlecoil_val" / f"file_val{i}.h5",
            num_slices=4,
            kspace_shape=(64, width),
            seed=10 + i,
        )
    for i, acquisition in enumerate(("CORPD_FBK", "CORPDFS_FBK")):
        make_fastmri_volume(
            tmp_path / "singlecoil_test" / f"file_test{i}.h5", num_slices=3, seed=30 + i,
            acquisition=acquisition,
        )
    return tmp_path


@dataclass(frozen=True)
class RayHead:
    """A running head started with ``ray start`` (token authentication on), as a user's would be."""

    address: str
    dashboard_url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One real 2-CPU Ray head (``ray start --head``) shared by every integration test of the session.

    RAY_ADDRESS is set for the head's processes: Ray Train's placement-group cleaner looks the cluster up
    by address, and without it a second Ray instance on the machine makes that lookup fail and leaks the
    placement groups of stopped trials.
    """
    import ray

    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    # As after `source .venv/bin/activate`: a job's `python` entrypoint resolves with the head's PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    sessions: set[int] = set()
    try:
        ray_start([*head_flags(port, dashboard_port), "--num-cpus=2"], head_env(env), sessions)
        os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
        ray.init(address=address, log_to_driver=False)
        yield RayHead(address, f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        ray.shutdown()
        kill_sessions(sessions)  # this head's processes only; another run's cluster or the user's stay up


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """The ``ray`` module connected to the session's head."""
    import ray

    return ray


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small fastMRI-format root for training runs: 4 train, 3 val and 2 test volumes of 32 x 32 images."""
    root = tmp_path_factory.mktemp("tiny_root")
    for i in range(4):
        make_fastmri_volume(
            root / "singlecoil_train" / f"train{i}.h5", num_slices=4, kspace_shape=(64, 40 + i), seed=i
        )
    for i in range(3):
        make_fastmri_volume(
            root / "singlecoil_val" / f"val{i}.h5", num_slices=3 + i, kspace_shape=(64, 41), seed=20 + i
        )
    for i, acquisition in enumerate(("CORPD_FBK", "CORPDFS_FBK")):
        make_fastmri_volume(
            root / "singlecoil_test" / f"test{i}.h5", num_slices=3, seed=40 + i, acquisition=acquisition
        )
    return root


@dataclass(frozen=True)
class S3Server:
    """A real S3-protocol server (moto in server mode) on a loopback port, and the AWS variables for it."""

    endpoint: str
    env: dict[str, str]

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True, **_S3_KEYS)

    def create_bucket(self, bucket: str) -> str:
        self.filesystem().create_dir(bucket)
        return f"s3://{bucket}"

    def upload(self, local_root: Path, uri: str) -> str:
        """Copy a local directory tree to ``uri`` (``s3://bucket/prefix``), creating the bucket."""
        import pyarrow.fs as pafs

        self.create_bucket(uri.removeprefix("s3://").split("/", 1)[0])
        pafs.copy_files(str(local_root), uri.removeprefix("s3://"), pafs.LocalFileSystem(), self.filesystem())
        return uri


_S3_KEYS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}


@contextlib.contextmanager
def moto_server(**server_env: str) -> Iterator[str]:
    """A ``moto_server`` process on a free loopback port (``server_env`` added to its environment); its
    endpoint URL. Stopped on exit."""
    port = free_port()
    server = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **server_env},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def s3_env(endpoint: str, access_key: str = "testing", secret_key: str = "testing") -> dict[str, str]:
    """The standard AWS variables pointing at ``endpoint`` with these credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": _S3_KEYS["region"],
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on a laptop or CI runner
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """``moto_server`` on 127.0.0.1; this process's AWS variables point at it for the session."""
    with moto_server() as endpoint:
        env = s3_env(endpoint, _S3_KEYS["access_key"], _S3_KEYS["secret_key"])
        with pytest.MonkeyPatch.context() as patch:  # restores the variables after the session
            for key, value in env.items():
                patch.setenv(key, value)
            yield S3Server(endpoint, env)
