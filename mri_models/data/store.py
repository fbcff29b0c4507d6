"""Data roots on a local disk or in object storage, read through ``pyarrow.fs``.

A data root is a local path or any URI ``pyarrow.fs`` understands (``s3://bucket/knee``, ``gs://...``).
Files are listed with their size and modification time, and HDF5 volumes are opened over a random-access
file handle, so h5py reads only the byte ranges it needs (the header, the attributes, one slice's
k-space and target), never the whole file. S3 takes its endpoint and credentials from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``...).

Local paths are opened by h5py directly: the same files, without the Python file-object layer.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import pyarrow.fs as pafs

if TYPE_CHECKING:  # cache.py builds on this module
    from mri_models.data.cache import FileCache


class DataStoreError(FileNotFoundError):
    """A data root or file cannot be reached; the message names the URI and why, in one line."""


@dataclass(frozen=True)
class FileEntry:
    """One file under a data root: where it is, and what identifies its content's version."""

    uri: str
    name: str
    size: int
    mtime_ns: int


def is_remote(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a URI (``s3://...``) rather than a local path."""
    return "://" in str(root) and not str(root).startswith("file://")


def normalise(root: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), or a local path made absolute."""
    text = str(root)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def bucket(uri: str) -> str | None:
    """``s3://bucket`` of ``s3://bucket/prefix`` (None for a local path)."""
    if not is_remote(uri):
        return None
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if is_remote(root) else os.path.join(root, *parts)


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataStoreError(f"{uri}: not a location pyarrow.fs can open ({_first_line(err)})") from None


_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation")
_DENIED = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN"}


def _first_line(err: BaseException) -> str:
    """The cause in one line: for S3, the error and operation without pyarrow's preamble or request id."""
    text = str(err).strip()
    aws = _AWS_ERROR.search(text)
    if aws and aws.group(1) in _DENIED:
        return (
            f"access denied ({aws.group(1)} on {aws.group(2)}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and their permissions on it"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    return re.sub(r" \(Request ID: [^)]*\)", "", first)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = _resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as err:  # a missing bucket, denied access, an endpoint that does not answer
        raise DataStoreError(f"{uri}: {_first_line(err)}") from None


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def list_files(directory: str, suffix: str = ".h5") -> list[FileEntry]:
    """The files directly under ``directory`` whose name ends with ``suffix``, sorted by name.

    Raises:
        DataStoreError: the directory does not exist or cannot be listed (naming it and why).
    """
    fs, path = _resolve(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=False))
    except FileNotFoundError:
        raise DataStoreError(f"data directory {directory} does not exist") from None
    except OSError as err:
        raise DataStoreError(f"{directory}: {_first_line(err)}") from None
    entries = [
        FileEntry(
            join(directory, info.base_name), info.base_name, int(info.size or 0), int(info.mtime_ns or 0)
        )
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
    ]
    return sorted(entries, key=lambda entry: entry.name)


def subdirectories(directory: str) -> list[str]:
    """Names of the directories directly under ``directory`` (none when it is missing)."""
    fs, path = _resolve(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise DataStoreError(f"{directory}: {_first_line(err)}") from None
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def stat(uri: str) -> FileEntry:
    """Size and modification time of one file."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise DataStoreError(f"{uri}: no such file")
    return FileEntry(uri, posixpath.basename(uri), int(info.size or 0), int(info.mtime_ns or 0))


class _CountingFile:
    """A pyarrow random-access file as h5py's file object, counting the bytes it reads."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(None if size is None or size < 0 else size)
        _BYTES_READ[0] += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


_BYTES_READ = [0]


def remote_bytes_read() -> int:
    """Bytes this process has read from remote HDF5 files so far (what the ranged reads cost)."""
    return _BYTES_READ[0]


def version(uri: str) -> tuple[int, str]:
    """Size and a tag that changes whenever the content does: the ETag where the store gives one (S3),
    else the modification time. S3's modification time has whole-second resolution, so a same-size
    overwrite within a second would keep it; the ETag does not."""
    fs, path = _resolve(uri)
    try:
        with fs.open_input_file(path) as handle:  # a HEAD request: no content is read
            size, metadata = handle.size(), handle.metadata()
    except FileNotFoundError:
        raise DataStoreError(f"{uri}: no such file") from None
    except OSError as err:
        raise DataStoreError(f"{uri}: {_first_line(err)}") from None
    tag = metadata.get("ETag") or metadata.get("Last-Modified") or str(stat(uri).mtime_ns)
    return size, tag.decode() if isinstance(tag, bytes) else str(tag)


def download(uri: str, local_path: str, chunk_bytes: int = 8 << 20) -> None:
    """Copy a remote file to ``local_path`` (counted in :func:`remote_bytes_read`)."""
    fs, path = _resolve(uri)
    try:
        with fs.open_input_stream(path) as source, open(local_path, "wb") as sink:
            while chunk := source.read(chunk_bytes):
                _BYTES_READ[0] += len(chunk)
                sink.write(chunk)
    except FileNotFoundError:
        raise DataStoreError(f"{uri}: no such file") from None
    except OSError as err:
        raise DataStoreError(f"{uri}: {_first_line(err)}") from None


@contextlib.contextmanager
def open_hdf5(uri: str | os.PathLike, cache: FileCache | None = None) -> Iterator[h5py.File]:
    """An HDF5 file opened for reading; remote files through ranged reads of a random-access handle.

    Args:
        uri: A local path or a URI.
        cache: A node-local cache of whole remote files; the local copy is read when there is one (or
            when it can be made), the object store otherwise.
    """
    uri = str(uri)
    if not is_remote(uri):
        with h5py.File(uri, "r") as hf:
            yield hf
        return
    if cache is not None and (local := cache.local_copy(uri)) is not None:
        try:
            hf = h5py.File(local, "r")
        except FileNotFoundError:  # evicted by another process between the copy and this open
            pass
        else:
            with hf:
                yield hf
            return
    fs, path = _resolve(uri)
    try:
        handle = fs.open_input_file(path)
    except FileNotFoundError:
        raise DataStoreError(f"{uri}: no such file") from None
    except OSError as err:
        raise DataStoreError(f"{uri}: {_first_line(err)}") from None
    with handle, h5py.File(_CountingFile(handle), "r") as hf:
        yield hf
