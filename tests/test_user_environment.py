"""What a user's machine sees: the home directory left alone, and one-line errors for an unusable cluster."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free, so nothing listens once the socket closes


def _run(command: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke"],
        [sys.executable, "sweeps/gamma_sweep.py", "--profile", "smoke"],
    ],
    ids=["train", "sweep"],
)
def test_no_cluster_at_ray_address_is_one_line_and_exit_2(tiny_root, tmp_path, command):
    address = f"127.0.0.1:{_closed_port()}"
    env = {**os.environ, "RAY_ADDRESS": address}
    done = _run([*command, "--data-root", str(tiny_root), "--storage", str(tmp_path / "results")], env)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: no Ray cluster answers at RAY_ADDRESS={address}: start one with `ray start --head` and set "
        "RAY_ADDRESS to the address it prints, or unset RAY_ADDRESS to run on a local cluster"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_refused_token_is_one_line_and_exit_2(ray_head, tiny_root, tmp_path):
    env = {**ray_head.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # not the cluster's
    done = _run(
        [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", str(tiny_root),
         "--storage", str(tmp_path / "results")],
        env,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: the Ray cluster at {ray_head.address} refused this client" in done.stdout
    assert "RAY_AUTH_TOKEN" in done.stdout and "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_training_leaves_the_users_home_alone(ray_head, tiny_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**ray_head.env, "MRI_MODELS_CACHE_DIR": os.environ["MRI_MODELS_CACHE_DIR"], "HOME": str(home)}
    done = _run(
        [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", str(tiny_root),
         "--storage", str(tmp_path / "results"), "--set", "epochs=1"],
        env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = [path.relative_to(home) for path in home.rglob("*") if path.is_file()]
    assert all(path.parts[:2] == (".cache", "matplotlib") for path in written), written
