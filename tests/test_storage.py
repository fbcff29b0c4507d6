"""What a location means (``~``, relative paths, ``file://``, ``s3://``) and how files are written.

:mod:`mri_models.storage` is the one place paths and URIs are joined, listed, read and written, so these
meanings hold for data roots, experiment directories and model packages alike. The S3 cases run against a
real S3-protocol server (moto).
"""

from __future__ import annotations

import os

import pytest

from mri_models import storage


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home directory of its own (``~``), and a current directory elsewhere."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def test_tilde_is_the_home_directory(home):
    assert storage.normalise("~/runs") == str(home / "runs")
    assert storage.join("~", "runs", "a.json") == str(home / "runs" / "a.json")
    storage.write_json("~/runs/a.json", {"a": 1})
    assert (home / "runs" / "a.json").is_file()
    assert storage.read_json(str(home / "runs" / "a.json")) == {"a": 1}
    assert [entry.uri for entry in storage.list_files("~/runs")] == [str(home / "runs" / "a.json")]


def test_relative_paths_are_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalise("data/knee/") == str(tmp_path / "data" / "knee")
    assert storage.join("data", "knee") == str(tmp_path / "data" / "knee")
    storage.write_text("data/notes.txt", "hello")
    assert (tmp_path / "data" / "notes.txt").read_text() == "hello"
    assert storage.is_dir("data") and storage.is_file("data/notes.txt") and not storage.is_remote("data")


def test_file_uris_are_local_paths(tmp_path):
    uri = f"file://{tmp_path}/pkg"
    assert not storage.is_remote(uri) and storage.bucket(uri) is None
    assert storage.normalise(uri) == str(tmp_path / "pkg")
    assert storage.join(uri, "model.pt") == str(tmp_path / "pkg" / "model.pt")
    storage.write_bytes(storage.join(uri, "model.pt"), b"weights")
    assert (tmp_path / "pkg" / "model.pt").read_bytes() == b"weights"
    assert storage.read_bytes(f"{uri}/model.pt") == b"weights"
    assert storage.filesystem(uri)[1] == str(tmp_path / "pkg")
    [entry] = storage.list_files(uri)
    assert (entry.name, entry.uri, entry.size) == ("model.pt", str(tmp_path / "pkg" / "model.pt"), 7)


def test_absence_is_an_answer_not_an_error(tmp_path):
    assert storage.read_bytes(str(tmp_path / "none.json")) is None
    assert storage.read_json(str(tmp_path / "no" / "such" / "file.json")) is None
    assert storage.list_files(str(tmp_path / "none")) == [] == storage.subdirectories(str(tmp_path / "none"))
    assert not storage.exists(str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match=rf"^{tmp_path}/none\.h5: no such file$"):
        storage.stat(str(tmp_path / "none.h5"))


def test_listings_are_sorted_entries_of_one_kind(tmp_path):
    for name in ("b.parquet", "a.parquet", "c.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "z_dir").mkdir()
    (tmp_path / "checkpoint_1").mkdir()
    assert [e.name for e in storage.list_files(str(tmp_path))] == ["a.parquet", "b.parquet", "c.txt"]
    parquet = storage.list_files(str(tmp_path), suffix=".parquet")
    assert [e.name for e in parquet] == ["a.parquet", "b.parquet"]
    assert [(e.name, e.uri) for e in storage.subdirectories(str(tmp_path))] == [
        ("checkpoint_1", str(tmp_path / "checkpoint_1")),
        ("z_dir", str(tmp_path / "z_dir")),
    ]


def test_a_local_write_replaces_the_file_whole(tmp_path):
    target = str(tmp_path / "deep" / "er" / "record.json")
    storage.write_json(target, {"epoch": 1})
    storage.write_json(target, {"epoch": 2})
    assert storage.read_json(target) == {"epoch": 2}
    assert os.listdir(tmp_path / "deep" / "er") == ["record.json"]


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # fails while writing the temporary file
    occupied = tmp_path / "occupied"
    (occupied / "inside").mkdir(parents=True)
    with pytest.raises(storage.StorageError, match=rf"^{occupied}: .*directory") as failure:
        storage.write_bytes(str(occupied), b"data")  # fails at the rename over a non-empty directory
    assert "\n" not in str(failure.value)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["occupied", "record.json"]


def test_an_unknown_scheme_fails_in_one_line_naming_the_uri():
    with pytest.raises(storage.StorageError, match=r"^nosuch://bucket/x: not a location pyarrow.fs can open"):
        storage.read_bytes("nosuch://bucket/x")


def test_s3_uris_join_with_slashes_and_keep_their_spelling():
    assert storage.is_remote("s3://bucket/knee")
    assert storage.normalise("s3://bucket/knee/") == "s3://bucket/knee"
    assert (
        storage.join("s3://bucket/knee/", "singlecoil_val", "a.h5") == "s3://bucket/knee/singlecoil_val/a.h5"
    )
    assert storage.bucket("s3://bucket/knee/singlecoil_val") == "s3://bucket"


def test_s3_reads_writes_and_listings(s3_server):
    root = storage.join(s3_server.create_bucket("storage-meanings"), "experiments", "sweep")
    assert storage.read_json(storage.join(root, "sweep.json")) is None
    assert storage.list_files(root) == [] == storage.subdirectories(root)
    storage.write_json(storage.join(root, "sweep.json"), {"name": "sweep"})
    storage.write_bytes(storage.join(root, "train_runs", "t1", "history.json"), b"[]")
    assert storage.read_json(f"{root}/sweep.json") == {"name": "sweep"}
    assert storage.is_dir(root) and storage.is_file(f"{root}/sweep.json") and storage.exists(root)
    assert [(e.name, e.uri, e.size) for e in storage.list_files(root)] == [
        ("sweep.json", f"{root}/sweep.json", len(b'{\n  "name": "sweep"\n}'))
    ]
    assert [(e.name, e.uri) for e in storage.subdirectories(root)] == [("train_runs", f"{root}/train_runs")]
    assert storage.stat(f"{root}/train_runs/t1/history.json").size == 2
    with pytest.raises(storage.StorageError, match=rf"^{root}/none\.json: no such file$"):
        storage.stat(f"{root}/none.json")
