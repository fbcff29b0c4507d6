"""Tune's experiment state kept whole and put back before a resume, and a restore Tune gives up on."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import pytest

from ray_jobs.tune_state import (
    KEPT_FILE,
    RESTORE_FAILED_MESSAGE,
    SET_ASIDE_DIR,
    TUNE_CONTROLLER_LOGGER,
    KeepTuneState,
    TuneRestoreFailed,
    restore_kept_state,
    watch_restore,
)

STATE = "experiment_state-2026-12-07_10-00-00.json"
SEARCHER = "basic-variant-state-2026-12-07_10-00-00.json"


def _keep(experiment: Path, files: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    (experiment / KEPT_FILE).write_bytes(buffer.getvalue())


def test_a_cut_off_state_and_a_newer_stray_one_give_way_to_the_kept_set(tmp_path):
    whole = {STATE: json.dumps({"trial_data": [["a", "b"]]}).encode(), SEARCHER: b"\x80searcher"}
    _keep(tmp_path, whole)
    (tmp_path / STATE).write_bytes(whole[STATE][:9])  # cut short by a full disk
    stray = "experiment_state-2026-12-07_11-00-00.json"  # a later start whose copy never completed
    (tmp_path / stray).write_bytes(b"{}")
    (tmp_path / "sweep.json").write_text("{}")  # not Tune's state: left alone

    assert restore_kept_state(str(tmp_path)) == sorted([STATE, SEARCHER])  # cut short; never copied
    assert {name: (tmp_path / name).read_bytes() for name in whole} == whole
    assert not (tmp_path / stray).exists() and (tmp_path / "sweep.json").read_text() == "{}"
    (aside,) = (tmp_path / SET_ASIDE_DIR).iterdir()
    assert (aside / STATE).read_bytes() == whole[STATE][:9] and (aside / stray).read_bytes() == b"{}"
    assert restore_kept_state(str(tmp_path)) == []  # now the kept set: nothing to do


def test_without_a_kept_copy_the_experiment_is_left_as_it_is(tmp_path):
    (tmp_path / STATE).write_bytes(b"{")
    assert restore_kept_state(str(tmp_path)) == []
    assert (tmp_path / STATE).read_bytes() == b"{" and not (tmp_path / SET_ASIDE_DIR).exists()


def _tune_gives_up() -> None:
    """What Ray 2.60's TuneController does when it cannot read the state back."""
    try:
        json.loads("{")
    except ValueError:
        logging.getLogger(TUNE_CONTROLLER_LOGGER).exception(RESTORE_FAILED_MESSAGE)


def test_a_restore_tune_gave_up_on_stops_before_any_trial():
    keeper = KeepTuneState("/nowhere")
    with watch_restore():
        keeper.setup()  # nothing went wrong
        _tune_gives_up()
        with pytest.raises(TuneRestoreFailed, match="JSONDecodeError: Expecting property name"):
            keeper.setup()
    _tune_gives_up()  # outside a resume: Tune's record alone
    keeper.setup()


def test_the_keeper_pickles_without_its_progress():
    import pickle

    keeper = KeepTuneState("s3://bucket/experiment")
    keeper._seen = (("x", 1, 2),)
    again = pickle.loads(pickle.dumps(keeper))
    assert again.experiment_path == "s3://bucket/experiment" and again._seen is None
