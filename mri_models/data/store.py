"""fastMRI HDF5 volumes on any storage (:mod:`mri_models.storage`): listing, versions, ranged reads.

HDF5 volumes are opened over a random-access file handle, so h5py reads only the byte ranges it needs
(the header, the attributes, one slice's k-space and target), never the whole file; the bytes read from
remote files are counted (:func:`remote_bytes_read`). Local paths are opened by h5py directly: the same
files, without the Python file-object layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h5py

from mri_models import storage

if TYPE_CHECKING:  # cache.py builds on this module
    from mri_models.data.cache import FileCache

VOLUME_SUFFIX = ".h5"


def volume_files(directory: str) -> list[storage.FileEntry]:
    """The HDF5 volumes (``*.h5``) directly under ``directory``, sorted by name.

    Raises:
        StorageError: the directory does not exist or cannot be listed (naming it and why).
    """
    entries = storage.list_files(directory, suffix=VOLUME_SUFFIX)
    if not entries and not storage.is_dir(directory):
        raise storage.StorageError(f"data directory {directory} does not exist")
    return entries


class _RemoteFile:
    """A pyarrow random-access file as h5py's file object: each read retried where its answer was cut off
    (:func:`mri_models.storage.retried_read`), the bytes read counted."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def read(self, size: int = -1) -> bytes:
        position = self.handle.tell()
        data = storage.retried_read(
            lambda: self.handle.read(None if size is None or size < 0 else size),
            lambda: self.handle.seek(position),
        )
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
    with storage.named_errors(uri), storage.open_input(uri) as handle:  # a HEAD: no content is read
        size, metadata = handle.size(), handle.metadata()
    tag = metadata.get("ETag") or metadata.get("Last-Modified") or str(storage.stat(uri).mtime_ns)
    return size, tag.decode() if isinstance(tag, bytes) else str(tag)


def download(uri: str, local_path: str, chunk_bytes: int = 8 << 20) -> None:
    """Copy a remote file to ``local_path`` (counted in :func:`remote_bytes_read`), each chunk a ranged read
    retried where its answer was cut off."""
    with storage.named_errors(uri), storage.open_input(uri) as source, open(local_path, "wb") as sink:
        size = source.size()
        while (position := source.tell()) < size:
            chunk = storage.retried_read(lambda: source.read(chunk_bytes), lambda: source.seek(position))  # noqa: B023
            if not chunk:
                raise storage.StorageError(f"{uri}: ended at byte {position} of {size}")
            _BYTES_READ[0] += len(chunk)
            sink.write(chunk)


@contextlib.contextmanager
def open_hdf5(uri: str | os.PathLike, cache: FileCache | None = None) -> Iterator[h5py.File]:
    """An HDF5 file opened for reading; remote files through ranged reads of a random-access handle.

    Args:
        uri: A local path or a URI.
        cache: A node-local cache of whole remote files; the local copy is read when there is one (or
            when it can be made), the object store otherwise.
    """
    uri = str(uri)
    if not storage.is_remote(uri):
        with h5py.File(storage.normalise(uri), "r") as hf:
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
    handle = storage.open_input(uri)
    with handle, h5py.File(_RemoteFile(handle), "r") as hf:
        yield hf
