"""What the command lines share: ``--set key=value`` overrides, logging to the terminal, user errors.

The command lines are :mod:`ray_jobs.train` (one run) and the sweep scripts in ``sweeps/``; library
messages reach them through ``logging`` (:func:`ray_jobs.log_to_stdout`). A user mistake
(bad configuration, data or cluster size) ends as one ``error: ...`` line and exit code 2, before any
training starts; library code raises, only these entry points print.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from collections.abc import Callable
from typing import Any

import ray
import yaml

from mri_models.data.validate import DataValidationError
from mri_models.package import PackageError
from ray_jobs.config import PROFILES, ConfigError, load_yaml
from ray_jobs.trainer import connect

# The exceptions that mean "the user's input is wrong", as opposed to a bug or a failed run.
USER_ERRORS = (ConfigError, DataValidationError, PackageError, FileNotFoundError)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict, values parsed as YAML (``lr=1e-3``, ``accelerations=[4,8]``)."""
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            values[key.strip().replace("-", "_")] = load_yaml(text)
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({reason})") from None
    return values


def add_common_arguments(parser: argparse.ArgumentParser, set_help: str) -> None:
    """The flags every entry point has: profile, data root, storage, name and ``--set``."""
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("MRI_DATA_ROOT") or None,
        help="fastMRI data root: a path or URI, e.g. s3://bucket/knee (default: $MRI_DATA_ROOT, else the "
        "profile's synthetic set)",
    )
    parser.add_argument("--storage", help="results directory or s3:// URI (default ~/ray_results)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )


def exit_on_user_error(action: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``action``; a user error prints one line and gives exit code 2, anything else propagates."""
    try:
        return 0, action()
    except USER_ERRORS as err:
        print(f"error: {err}", flush=True)
        return 2, None


# A run that failed because its storage refused a write: the cause in the words of the OS.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def storage_refusal(err: BaseException | str) -> str | None:
    """Why ``err`` (a failed run, its workers' errors included, or an error's text) is the storage refusing
    a write: "No space left on device", "Read-only file system"...; None for any other failure.

    Ray Train hands the workers' errors over as text (their tracebacks), pyarrow's own with its ``[errno
    N]``, Python's with ``[Errno N]``: the number is what is read.
    """
    text = str(err)
    for number in _STORAGE_ERRNOS:
        # Or the OS's words alone, as mri_models.storage.StorageError gives them ("<path>: No space ...").
        if re.search(rf"\[errno {number}\]", text, re.IGNORECASE) or f": {os.strerror(number)}" in text:
            return os.strerror(number)
    return None


def check_cluster() -> int:
    """``python -m ray_jobs.cli``: connect as the command lines do; one line either way, 2 if unusable."""
    code, _ = exit_on_user_error(connect)
    if code:
        return code
    resources = ray.cluster_resources()
    print(f"Ray cluster reachable: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(check_cluster())
