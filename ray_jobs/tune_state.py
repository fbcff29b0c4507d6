"""Tune's experiment state kept whole, and a sweep resumed from it or not at all.

Tune's driver saves its experiment state (every trial's status and checkpoints, the searcher's and the
callbacks' state) into a local staging directory, then copies those files to the experiment one by one. A
copy that fails part-way leaves a set that does not belong together: on a full disk a truncated
``experiment_state-<date>.json``; on an object store going away one file new and the next old. And when
``Tuner.restore`` cannot read the state (a damaged file, or one read cut off by a flaky store), Tune logs
"Failed to restore the run state" and starts the experiment again from nothing, under new trial ids, in
the same directory.

So a sweep keeps its own copy: :class:`KeepTuneState`, a Tune callback, puts the staging directory's
state files, each time Tune has saved them, into one file (:data:`KEPT_FILE`), written atomically. Before a
resume, :func:`restore_kept_state` puts that set back where the experiment's files differ from it (the
others are moved aside, not deleted); and :func:`watch_restore` turns a restore that Tune gave up on into
:class:`TuneRestoreFailed` before any trial starts, instead of a new experiment.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray import tune

from mri_models import storage

logger = logging.getLogger(__name__)

KEPT_FILE = "tune_state_kept.zip"  # not .json/.pkl: Tune's own restore copies those around
SET_ASIDE_DIR = "tune_state_set_aside"
# Tune's experiment state, its searcher's (basic-variant-state-, searcher-state-) and callbacks'
# (callback-states-) files, one per driver start, in the experiment's top directory.
STATE_FILE = re.compile(r"^(experiment_state-.+\.json|[a-z-]+-states?-.+\.(json|pkl))$")
EXPERIMENT_STATE_PREFIX = "experiment_state-"
# What Tune logs (ray/tune/execution/tune_controller.py, Ray 2.60) when it could not restore the state and
# starts the experiment again.
RESTORE_FAILED_MESSAGE = "Failed to restore the run state."
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"


class TuneRestoreFailed(Exception):
    """Tune could not read the experiment's state back (it would have started the experiment again)."""


def _is_state_file(path: Path) -> bool:
    return path.is_file() and STATE_FILE.match(path.name) is not None


def _state_files(directory: Path) -> dict[str, bytes] | None:
    """The state files of a staging directory, or None while one of them is not whole JSON (Tune's own
    ``experiment_state`` write is not atomic: it may be mid-write or cut short by a full disk)."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if _is_state_file(p)}
    try:
        for name, data in files.items():
            if name.startswith(EXPERIMENT_STATE_PREFIX):
                json.loads(data)
    except ValueError:
        return None
    return files if any(name.startswith(EXPERIMENT_STATE_PREFIX) for name in files) else None


def _bundle(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


class KeepTuneState(tune.Callback):
    """After each step in which Tune saved its state, and at the end, one atomic copy of the whole set.

    Args:
        experiment_path: the experiment directory (local path or URI).
    """

    def __init__(self, experiment_path: str) -> None:
        self.experiment_path = experiment_path
        self._seen: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks into tuner.pkl
        return {"experiment_path": self.experiment_path, "_seen": None}

    def setup(self, **info: Any) -> None:
        """Before the first trial: where Tune gave up restoring, the sweep stops here."""
        failure = _RESTORE_WATCH.failure
        if failure is not None:
            raise TuneRestoreFailed(failure)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._keep(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._keep(trials)

    def _keep(self, trials: list) -> None:
        if not trials:
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        try:
            seen = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(staging.iterdir())
                         if _is_state_file(p))  # fmt: skip
        except FileNotFoundError:
            return
        if seen == self._seen:
            return
        files = _state_files(staging)
        if files is None:
            return
        try:
            storage.write_bytes(storage.join(self.experiment_path, KEPT_FILE), _bundle(files))
        except (
            storage.StorageError
        ) as err:  # Tune's own copy may still get through; the next step tries again
            logger.warning("could not keep a copy of Tune's experiment state: %s", err)
            return
        self._seen = seen


def restore_kept_state(experiment_path: str) -> list[str]:
    """Put the kept copy of Tune's state back where the experiment's state files differ from it.

    A state file that is not in the copy, or differs from it, is moved to :data:`SET_ASIDE_DIR` first.

    Returns:
        The names of the files put back (empty when the experiment's set was the kept one, or there is no
        kept copy: a sweep from before this copy, or one stopped before Tune first saved).
    """
    kept = storage.read_bytes(storage.join(experiment_path, KEPT_FILE))
    if kept is None:
        return []
    with zipfile.ZipFile(io.BytesIO(kept)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    present = {e.name: e.uri for e in storage.list_files(experiment_path) if STATE_FILE.match(e.name)}
    contents = {name: storage.read_bytes(uri) for name, uri in present.items()}
    differing = [name for name, data in contents.items() if data != files.get(name)]
    missing = [name for name in files if name not in present]
    if not differing and not missing:
        return []
    aside = storage.join(experiment_path, SET_ASIDE_DIR, time.strftime("%Y-%m-%d_%H-%M-%S"))
    for name in differing:
        storage.write_bytes(storage.join(aside, name), contents[name] or b"")
        if name not in files:
            fs, path = storage.filesystem(present[name])
            fs.delete_file(path)
    for name in sorted({*differing, *missing} & files.keys()):
        storage.write_bytes(storage.join(experiment_path, name), files[name])
    logger.warning(
        "Tune's experiment state in %s was not the last complete set (%s): put back its kept copy%s",
        experiment_path, ", ".join(sorted({*differing, *missing})),
        f"; the files replaced are in {aside}" if differing else "",
    )  # fmt: skip
    return sorted({*differing, *missing} & files.keys())


class _RestoreWatch(logging.Handler):
    """Catches Tune's own record of a restore it gave up on, with its error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.failure: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == RESTORE_FAILED_MESSAGE and record.exc_info and record.exc_info[1]:
            err = record.exc_info[1]
            self.failure = f"{type(err).__name__}: {' '.join(str(err).split())}"


_RESTORE_WATCH = _RestoreWatch()


@contextlib.contextmanager
def watch_restore() -> Iterator[None]:
    """Within: a restore Tune gives up on makes :class:`KeepTuneState` stop the sweep before any trial."""
    tune_logger = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    _RESTORE_WATCH.failure = None
    tune_logger.addHandler(_RESTORE_WATCH)
    try:
        yield
    finally:
        tune_logger.removeHandler(_RESTORE_WATCH)
        _RESTORE_WATCH.failure = None
