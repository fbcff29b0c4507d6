"""Small helpers to read and write text files on the experiment storage (local path, NFS or s3://)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(os.path.expanduser(base)), *parts)


def exists(uri: str) -> bool:
    fs, path = _resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = _resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a whole file; on a local disk via a temporary file and a rename, so readers never see half."""
    fs, path = _resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = path + ".tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    if tmp != path:
        fs.move(tmp, path)
