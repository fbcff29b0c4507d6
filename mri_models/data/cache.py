"""A size-bounded per-node copy of remote HDF5 files, shared by the concurrent read tasks of one node.

Streaming from object storage reads each slice's bytes again every epoch. With a cache, the first read
task of a node that needs a volume downloads the whole file once into a local directory, and every later
read on that node (the next epochs, the validation passes, other trials of a sweep) opens the local copy.

Safe under concurrent processes (Ray Data runs several read tasks per node):

- a per-file lock makes exactly one process download a file; the others wait for it and then share it;
- a file appears under its final name only when complete (written as ``.part``, then ``os.replace``);
- files are keyed by URI, size and content tag (S3's ETag), so a changed object is never served stale;
- after each download the least recently used files are deleted until the directory holds at most
  ``max_bytes`` (it can exceed it by the files being downloaded at that moment). A reader that has a file
  open keeps reading it after deletion (POSIX); a reader that loses the race to open it falls back to
  reading the object store (:func:`mri_models.data.store.open_hdf5`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from mri_models.data import store

_SUFFIX = ".h5"


def default_file_cache_dir() -> str:
    """``<temp dir>/mri_models-data-cache``: node-local, and cleaned with the node's temporary files."""
    return os.path.join(tempfile.gettempdir(), "mri_models-data-cache")


@dataclass(frozen=True)
class FileCache:
    """A directory of whole remote files, holding at most ``max_bytes`` of them.

    Args:
        directory: Where the copies live on this node (created on first use).
        max_bytes: Size bound of the directory's files; a file larger than this is never cached.
    """

    directory: str
    max_bytes: int

    def local_copy(self, uri: str) -> str | None:
        """The path of a complete local copy of ``uri``, downloading it if needed; None if it cannot fit.

        Raises:
            StorageError: the object cannot be read (naming the URI).
        """
        size, tag = store.version(uri)
        if size > self.max_bytes:
            return None
        os.makedirs(self.directory, exist_ok=True)
        key = hashlib.sha256(f"{uri}\0{size}\0{tag}".encode()).hexdigest()[:32]
        path = os.path.join(self.directory, key + _SUFFIX)
        with FileLock(path + ".lock"):
            if os.path.exists(path):
                os.utime(path)  # recently used: the last to be evicted
                return path
            partial = path + ".part"
            store.download(uri, partial)
            os.replace(partial, path)
        self._evict(keep=path)
        return path

    def size(self) -> int:
        """Bytes of the complete files in the cache now."""
        return sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[float, int, str]]:
        files = []
        for name in os.listdir(self.directory):
            if name.endswith(_SUFFIX):
                path = os.path.join(self.directory, name)
                try:
                    info = os.stat(path)
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                files.append((info.st_mtime, info.st_size, path))
        return sorted(files)

    def _evict(self, keep: str) -> None:
        """Delete least recently used files until the cache fits its bound (never ``keep``)."""
        with FileLock(os.path.join(self.directory, "evict.lock")):
            files = self._files()
            total = sum(size for _, size, _ in files)
            for _, size, path in files:
                if total <= self.max_bytes:
                    break
                if path != keep:
                    Path(path).unlink(missing_ok=True)
                    total -= size
