"""Paths and URIs: joining, listing, reading and writing files on a local disk or in object storage.

Every file this project reads or writes outside its own process (data roots, experiment and study
directories, model packages) goes through this module, so a location means the same everywhere:

- **Local paths** have ``~`` expanded and are made absolute against the current working directory when
  they are used (symbolic links are kept as given). ``data``, ``./data`` and ``~/data`` name what
  ``os.path.abspath(os.path.expanduser(...))`` names.
- **``file://`` URIs** are local paths: the prefix is dropped (``file:///data/knee`` is ``/data/knee``) and
  the rest is treated as above.
- **Any other ``scheme://`` URI** (``s3://bucket/knee``, ``gs://...``, whatever ``pyarrow.fs`` knows) is
  remote: it is kept as given, less a trailing slash, joined with ``/``, and opened with
  ``pyarrow.fs.FileSystem.from_uri``. S3 takes its endpoint and credentials from the standard AWS
  variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``...).

Absence is an answer, not an error: reading a missing file gives None and listing a missing directory
gives an empty list (on S3 a missing bucket too, as S3 answers). A location that cannot be reached (a URI
``pyarrow.fs`` cannot open, denied access, an endpoint that does not answer) raises :class:`StorageError`,
one line naming the URI and why. Writes are atomic for readers: a local file is written to a temporary
file beside it and renamed over the target; an object store makes an object visible only once its upload
is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

_FILE_SCHEME = "file://"


class StorageError(FileNotFoundError):
    """A location cannot be reached or holds no such file; the message names the URI and why, in one line.

    A ``FileNotFoundError``, so command lines report it as a user error.
    """


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory: where it is, and what identifies a file's content version.

    Attributes:
        uri: The entry's location, as :func:`join` makes it from the listed directory.
        name: Its name within the directory.
        size: Bytes (0 for a directory).
        mtime_ns: Last modification (0 where the store does not say, as for S3 "directories").
    """

    uri: str
    name: str
    size: int
    mtime_ns: int


# ----------------------------------------------------------------------------------------- locations


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI of a remote store (``s3://...``), not a local path or ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith(_FILE_SCHEME)


def normalise(location: str | os.PathLike) -> str:
    """A remote URI as given without a trailing slash, or a local path with ``~`` expanded, made absolute."""
    text = str(location)
    if is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text.removeprefix(_FILE_SCHEME)))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``parts`` joined onto the normalised ``base``: with ``/`` for a URI, as the OS joins a local path."""
    root = normalise(base)
    return posixpath.join(root, *parts) if is_remote(root) else os.path.join(root, *parts)


def bucket(uri: str) -> str | None:
    """``s3://bucket`` of ``s3://bucket/prefix`` (None for a local path)."""
    if not is_remote(uri):
        return None
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem of a location, and the path within it.

    Raises:
        StorageError: the URI is not one ``pyarrow.fs`` can open.
    """
    text = normalise(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{text}: not a location pyarrow.fs can open ({_one_line(err)})") from None
    return (RetryingS3FileSystem.like(fs) if isinstance(fs, pafs.S3FileSystem) else fs), path


# Attempts per S3 request (the first and the retries) of every S3 filesystem made here; 503 SlowDown, 500s,
# throttling, timeouts and reset connections are retried with AWS's standard strategy (exponential
# backoff with jitter, each wait capped at 20 s), so a lasting outage fails after a bounded time.
S3_ATTEMPTS_VARIABLE = "MRI_MODELS_S3_ATTEMPTS"
DEFAULT_S3_ATTEMPTS = 8


def s3_attempts() -> int:
    """Attempts per S3 request: ``$MRI_MODELS_S3_ATTEMPTS`` (a whole number >= 1), else 8."""
    text = os.environ.get(S3_ATTEMPTS_VARIABLE, str(DEFAULT_S3_ATTEMPTS))
    if not text.isdigit() or int(text) < 1:
        raise StorageError(f"{S3_ATTEMPTS_VARIABLE}={text!r}: expected a whole number of attempts >= 1")
    return int(text)


def _rebuild_retrying_s3(options: dict[str, Any], max_attempts: int) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem retrying each request up to ``max_attempts`` times, and keeping that setting
    when pickled: pyarrow's own pickling drops the retry strategy, and Ray pickles a run's storage
    filesystem to every worker, which would fall back to pyarrow's 3 attempts.

    Args:
        max_attempts: attempts per request (AWS's standard retry strategy).
        **options: ``pyarrow.fs.S3FileSystem`` options (region, endpoint_override, credentials...).
    """

    def __init__(self, max_attempts: int, **options: Any) -> None:
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
        super().__init__(retry_strategy=retry, **options)
        self.max_attempts = max_attempts
        self._options = options

    @classmethod
    def like(cls, fs: pafs.S3FileSystem, max_attempts: int | None = None) -> RetryingS3FileSystem:
        """The same store as ``fs`` (region, endpoint, credentials) with ``max_attempts`` (default:
        :func:`s3_attempts`)."""
        _, (options,) = pafs.S3FileSystem.__reduce__(fs)
        return cls(max_attempts or s3_attempts(), **options)

    def __reduce__(self):
        return _rebuild_retrying_s3, (self._options, self.max_attempts)


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """A storage location as Ray's ``RunConfig(storage_path=..., storage_filesystem=...)`` takes it: an S3
    URI as the path within its bucket and a :class:`RetryingS3FileSystem` (so Ray's own syncing and
    checkpoint uploads retry as this module's reads and writes do); anything else as it is, None."""
    text = normalise(location)
    if not is_remote(text):
        return text, None
    fs, path = filesystem(text)
    return (path, fs) if isinstance(fs, RetryingS3FileSystem) else (text, None)


_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation")
_DENIED = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN"}


def _one_line(err: BaseException) -> str:
    """The cause in one line: for S3, the error and operation without pyarrow's preamble or request id."""
    if isinstance(err, OSError) and err.strerror and err.filename:  # the OS's own: the caller names the URI
        return err.strerror
    text = str(err).strip()
    aws = _AWS_ERROR.search(text)
    if aws and aws.group(1) in _DENIED:
        return (
            f"access denied ({aws.group(1)} on {aws.group(2)}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and their permissions on it"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    return re.sub(r" \(Request ID: [^)]*\)", "", first)


# An answer whose body was cut off after its headers came: the AWS SDK's retries (which cover requests
# that got no answer, or an error answer) have already passed by then.
_CUT_OFF = re.compile(r"Failed to flush response stream|curlCode: 18\b|Transferred a partial file")


def cut_off(err: OSError) -> bool:
    """Whether an S3 read failed because its answer's body was cut off (worth asking for again)."""
    return bool(_CUT_OFF.search(str(err)))


def retried_read(read: Callable[[], T], again: Callable[[], None], attempts: int | None = None) -> T:
    """``read()``, made again after ``again()`` (re-positioning the handle) when its answer was cut off.

    The AWS SDK retries a request whose answer did not come (a reset, a 503), not a body cut off after a
    successful answer: pyarrow then raises ``INTERNAL_FAILURE ... Failed to flush response stream`` from
    the read itself. Ranged reads are stateless, so the same range is asked for again, with the same
    bounded exponential backoff, up to :func:`s3_attempts` in all.
    """
    attempts = attempts or s3_attempts()
    for attempt in range(attempts):
        try:
            return read()
        except OSError as err:
            if attempt == attempts - 1 or not cut_off(err):
                raise
            time.sleep(min(_READ_BACKOFF_S * 2**attempt, _READ_BACKOFF_MAX_S))
            again()
    raise AssertionError("unreachable")


_READ_BACKOFF_S, _READ_BACKOFF_MAX_S = 0.05, 5.0


@contextlib.contextmanager
def named_errors(uri: str) -> Iterator[None]:
    """Turns the ``OSError`` of a storage operation on ``uri`` into a one-line :class:`StorageError`.

    Every function here applies it; callers that go on reading a handle from :func:`open_input`
    wrap their reads in it too.
    """
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as err:
        raise StorageError(f"{uri}: {_one_line(err)}") from None


# ----------------------------------------------------------------------------------------- queries


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    with named_errors(uri):
        return fs.get_file_info(path)


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file or directory is at ``uri``."""
    return _info(str(uri)).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a directory (on S3: a prefix with objects under it)."""
    return _info(str(uri)).type == pafs.FileType.Directory


def is_file(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a file."""
    return _info(str(uri)).type == pafs.FileType.File


def stat(uri: str) -> FileEntry:
    """Size and modification time of one file.

    Raises:
        StorageError: there is no file at ``uri``, or it cannot be reached.
    """
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: no such file")
    return _entry(uri, info)


def _listing(directory: str, kind: pafs.FileType) -> list[FileEntry]:
    fs, path = filesystem(directory)
    with named_errors(directory):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    entries = [_entry(join(directory, info.base_name), info) for info in infos if info.type == kind]
    return sorted(entries, key=lambda entry: entry.name)


def _entry(uri: str, info: pafs.FileInfo) -> FileEntry:
    return FileEntry(uri, info.base_name, int(info.size or 0), int(info.mtime_ns or 0))


def list_files(directory: str | os.PathLike, suffix: str = "") -> list[FileEntry]:
    """The files directly under ``directory`` whose name ends with ``suffix``, sorted by name.

    Empty when the directory does not exist.
    """
    return [entry for entry in _listing(str(directory), pafs.FileType.File) if entry.name.endswith(suffix)]


def subdirectories(directory: str | os.PathLike) -> list[FileEntry]:
    """The directories directly under ``directory``, sorted by name; empty when it does not exist."""
    return _listing(str(directory), pafs.FileType.Directory)


# ----------------------------------------------------------------------------------------- reading


def open_input(uri: str, *, random_access: bool = True) -> pafs.NativeFile:
    """A handle on a file, to use as a context manager: random access (for S3, ranged reads) or one
    sequential stream (for S3, one streamed GET).

    Raises:
        StorageError: there is no file at ``uri``, or it cannot be reached.
    """
    fs, path = filesystem(uri)
    with named_errors(uri):
        return fs.open_input_file(path) if random_access else fs.open_input_stream(path)


def read_bytes(uri: str) -> bytes | None:
    """A whole file, or None when it does not exist.

    Raises:
        StorageError: the file cannot be read (denied access, an endpoint that does not answer...).
    """
    fs, path = filesystem(uri)

    def whole() -> bytes:
        with fs.open_input_stream(path) as handle:
            return handle.read()

    with named_errors(uri):
        try:
            return retried_read(whole, lambda: None)  # a stream cut off is asked for again, whole
        except FileNotFoundError:
            return None


def read_text(uri: str) -> str | None:
    """A whole UTF-8 file, or None when it does not exist."""
    data = read_bytes(uri)
    return None if data is None else data.decode()


def read_json(uri: str) -> Any:
    """A JSON file's content, or None when the file does not exist."""
    text = read_text(uri)
    return None if text is None else json.loads(text)


# ----------------------------------------------------------------------------------------- writing


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating its directory; readers see the old content or the new, never half.

    Locally the data goes to a temporary file beside the target, renamed over it (and removed if anything
    fails); an object store publishes the object when its upload completes.

    Raises:
        StorageError: the file cannot be written (naming it and why).
    """
    fs, path = filesystem(uri)
    with named_errors(uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if not isinstance(fs, pafs.LocalFileSystem):
            with fs.open_output_stream(path) as sink:
                sink.write(data)
            return
        # Unique per process and thread, so concurrent writers of one file never share a temporary file.
        temporary = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
        try:
            with fs.open_output_stream(temporary) as sink:
                sink.write(data)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            raise


def write_text(uri: str, text: str) -> None:
    """Write a whole UTF-8 file atomically (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode())


def write_json(uri: str, value: Any) -> None:
    """Write ``value`` as indented JSON atomically (see :func:`write_bytes`)."""
    write_text(uri, json.dumps(value, indent=2))
