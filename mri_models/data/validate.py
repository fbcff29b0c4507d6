"""Validate a fastMRI single-coil data root before training on it.

Every ``.h5`` file of each split is checked for what the reader, the transforms and the metrics rely on:
the required datasets, their dtypes and ranks, shapes against the ISMRMRD header, the header fields, the
file attributes, finite values, and a target consistent with the split. Problems are reported as text that
names the file, the key or value at fault and what was expected, e.g.::

    singlecoil_train/file3.h5: kspace is float32, expected complex64 (or complex)

The module is a library (``validate_file``, ``validate_root``, ``check_root``; training calls ``check_root``
before it starts) and a command line tool::

    python -m mri_models.data.validate ROOT [--splits singlecoil_train singlecoil_val] [--no-values]

Training validates a file once: a valid file's result is remembered in a cache directory under a key of
its URI, size and modification time, the checks asked for and this module's own code, so a study that
prepares the same data for every sweep and pooling depth scans each file's values once, and a file that
changes (or a change to the checks) is checked again. Bad files are never remembered. The command line
tool always checks everything.

Exit status: 0 when every file is valid; 1 when a file or a split is bad; 2 when not a single file could be
checked (the root is missing, not a directory, empty, or none of its splits holds a ``.h5`` file). Files are
only ever opened read-only; nothing is written under the root.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mri_models import storage
from mri_models.data import store
from mri_models.data import volume as volume_module
from mri_models.data.slice_dataset import default_cache_dir
from mri_models.data.volume import (
    KNEE_ACQUISITIONS,
    KSPACE_KEY,
    REQUIRED_ATTRS,
    TARGET_KEY,
    HeaderError,
    VolumeMetadata,
    parse_ismrmrd_header,
    read_header_xml,
)

DEFAULT_SPLITS = ("singlecoil_train", "singlecoil_val")
MASK_KEY = "mask"  # the 1-D sampling mask fastMRI's test files carry instead of a target
# Test files have no target, hence no ``max``/``norm`` (they carry acceleration attributes instead).
TEST_REQUIRED_ATTRS = ("acquisition", "patient_id")
# Upper bound on the bytes read at once by the finiteness scan: a real knee slice is ~1.9 MB, so this
# reads a few dozen slices per call while keeping memory flat however large the volume is.
READ_BLOCK_BYTES = 64 * 2**20
EXIT_OK, EXIT_BAD, EXIT_NOTHING_CHECKED = 0, 1, 2


def default_validation_cache() -> Path:
    """Where training remembers the files it found valid: ``validated/`` in the cache directory."""
    return default_cache_dir() / "validated"


class DataValidationError(ValueError):
    """A data root failed validation; the message lists the bad files and their problems.

    Args:
        message: the formatted problems.
        report: the full report, for callers that want every problem.
    """

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ValidationReport:
    """The outcome of validating a data root.

    Args:
        root: the data root.
        splits: the split directories checked.
        root_problems: complete lines about the root or a split directory (missing, empty...).
        file_problems: problems per bad file, keyed by ``split/name.h5``; valid files are absent.
        file_warnings: non-fatal findings per file (an unknown acquisition), keyed likewise.
        files_checked: number of ``.h5`` files checked.
    """

    root: str  # a local path or a URI (mri_models.storage)
    splits: tuple[str, ...]
    root_problems: list[str] = field(default_factory=list)
    file_problems: dict[str, list[str]] = field(default_factory=dict)
    file_warnings: dict[str, list[str]] = field(default_factory=dict)
    files_checked: int = 0

    @property
    def bad_files(self) -> int:
        """Number of files with at least one problem."""
        return len(self.file_problems)

    @property
    def ok(self) -> bool:
        """True when neither the root, a split nor any file has a problem (warnings do not count)."""
        return not self.root_problems and not self.file_problems

    def lines(self, max_files: int | None = None, warnings: bool = True) -> list[str]:
        """One line per root problem, then one per bad file (its problems joined by ``; ``).

        Args:
            max_files: list at most this many bad files, then a line saying how many were left out.
            warnings: also list the files with warnings, one ``warning:`` line each.
        """
        out = list(self.root_problems)
        bad = sorted(self.file_problems.items())
        shown = bad if max_files is None else bad[:max_files]
        out += [f"{name}: {'; '.join(problems)}" for name, problems in shown]
        if len(shown) < len(bad):
            out.append(f"... and {len(bad) - len(shown)} more bad files")
        if warnings:
            out += [f"{name}: warning: {'; '.join(w)}" for name, w in sorted(self.file_warnings.items())]
        return out

    def summary(self) -> str:
        """The summary line: files checked, bad files, warnings and root-level problems."""
        text = f"checked {self.files_checked} files under {self.root}: {self.bad_files} bad"
        if self.file_warnings:
            text += f", {len(self.file_warnings)} with warnings"
        if self.root_problems:
            text += f", {len(self.root_problems)} root/split problems"
        return text

    def format(self, max_files: int | None = None) -> str:
        """The problem lines followed by the summary line, as the command line prints them."""
        return "\n".join([*self.lines(max_files), self.summary()])


def is_test_split(split: str) -> bool:
    """Whether a split may follow fastMRI's test layout (under-sampled k-space and a mask, no target).

    A file of such a split that holds a target is a held-out test volume (the synthetic test split, or
    one split off for the final evaluation) and is checked like a validation volume.
    """
    return split.endswith(("test", "challenge"))


def validate_file(path: str | os.PathLike, split: str, check_values: bool = True) -> list[str]:
    """Check one fastMRI single-coil volume; never raises for a bad file.

    Args:
        path: the ``.h5`` file.
        split: its split directory name (``singlecoil_train``...); test splits need a mask, not a target.
        check_values: also scan k-space and the target for NaN/Inf (reads the data block by block).

    Returns:
        The problems found, each naming the key or value at fault and what was expected; empty if valid.
    """
    return _check_file(storage.normalise(path), split, check_values)[0]


def validate_root(
    root: str | os.PathLike,
    splits: Sequence[str] = DEFAULT_SPLITS,
    check_values: bool = True,
    cache_dir: Path | None = None,
) -> ValidationReport:
    """Check every ``.h5`` file of the given splits of a data root.

    Args:
        root: the data root holding one directory per split: a local path or a URI (``s3://...``).
        splits: split directory names to check.
        check_values: also scan the arrays for NaN/Inf (the slow part: it reads every value once). Without
            it only the header, attributes and dataset shapes are read: byte ranges, also from object storage.
        cache_dir: remember valid files here and skip files found valid before (None: check every file).

    Returns:
        The report; ``report.ok`` says whether training may use the root.
    """
    report = ValidationReport(root=storage.normalise(root), splits=tuple(splits))
    try:
        root_problem = _root_problem(report.root)
    except storage.StorageError as err:  # a bad URI, a missing bucket, denied access
        root_problem = str(err)
    if root_problem:
        report.root_problems.append(root_problem)
        return report
    for split in report.splits:
        files, split_problem = _split_files(report.root, split)
        if split_problem:
            report.root_problems.append(split_problem)
        for entry in files:
            problems, warnings = _check_file_once(entry, split, check_values, cache_dir)
            report.files_checked += 1
            name = f"{split}/{entry.name}"
            if problems:
                report.file_problems[name] = problems
            if warnings:
                report.file_warnings[name] = warnings
    return report


def check_root(
    root: str | os.PathLike,
    splits: Sequence[str] = DEFAULT_SPLITS,
    check_values: bool = True,
    max_listed: int = 20,
    cache_dir: Path | None = None,
) -> ValidationReport:
    """Validate a data root and raise if anything is wrong; what training calls before it starts.

    Args:
        root: the data root.
        splits: split directory names to check.
        check_values: also scan the arrays for NaN/Inf.
        max_listed: list at most this many bad files in the error message.
        cache_dir: where valid files are remembered (:func:`validate_root`).

    Returns:
        The report (all files valid; it may still carry warnings).

    Raises:
        DataValidationError: listing the root problems and the first ``max_listed`` bad files.
    """
    report = validate_root(root, splits, check_values, cache_dir)
    if not report.ok and not report.files_checked and not report.file_problems:
        # Nothing could be checked (a missing root, bucket or split): one line says why.
        raise DataValidationError("; ".join(report.root_problems), report)
    if not report.ok:
        lines = report.lines(max_files=max_listed, warnings=False)
        message = f"fastMRI data under {report.root} failed validation ({report.summary()}):\n" + "\n".join(
            f"  {line}" for line in lines
        )
        raise DataValidationError(message, report)
    return report


# ----------------------------------------------------------------------------------------- root and splits


def _root_problem(root: str) -> str | None:
    if not storage.exists(root):
        bucket = storage.bucket(root)
        if bucket and not storage.exists(bucket):
            return f"{root}: bucket {bucket} does not exist (or these credentials cannot see it)"
        return f"{root}: data root does not exist"
    if not storage.is_dir(root):
        return f"{root}: data root is not a directory"
    if not storage.list_files(root) and not storage.subdirectories(root):
        return f"{root}: data root is empty"
    return None


def _split_files(root: str, split: str) -> tuple[list[storage.FileEntry], str | None]:
    """The split's ``.h5`` files (sorted, so reports are stable) and a problem if there are none."""
    split_dir = storage.join(root, split)
    try:
        if not storage.is_dir(split_dir):
            return [], f"{split}: split directory missing (expected {split_dir})"
        # The same selection as slice_dataset.list_volumes: exactly the files training will read are checked.
        files = store.volume_files(split_dir)
    except storage.StorageError as err:
        return [], f"{split}: {err}"
    if not files:
        return [], f"{split}: split directory holds no .h5 files"
    return files, None


# -------------------------------------------------------------------------------------------- one file


@functools.cache
def _checks_version() -> str:
    """A digest of the code that decides validity: a changed check invalidates every remembered result."""
    sources = (Path(__file__).read_bytes(), Path(volume_module.__file__).read_bytes())
    return hashlib.sha1(b"".join(sources)).hexdigest()[:16]


def _cache_file(cache_dir: Path, entry: storage.FileEntry, split: str, check_values: bool) -> Path:
    identity = [entry.uri, entry.size, entry.mtime_ns, is_test_split(split), check_values, _checks_version()]
    return cache_dir / f"{hashlib.sha1(json.dumps(identity).encode()).hexdigest()}.json"


def _check_file_once(
    entry: storage.FileEntry, split: str, check_values: bool, cache_dir: Path | None
) -> tuple[list[str], list[str]]:
    """``_check_file``, skipped for a file this cache found valid (a value scan also answers for none)."""
    if cache_dir is not None:
        for scanned in (True, False) if not check_values else (True,):
            with contextlib.suppress(OSError, ValueError):
                return [], json.loads(_cache_file(cache_dir, entry, split, scanned).read_text())["warnings"]
    problems, warnings = _check_file(entry.uri, split, check_values)
    if cache_dir is not None and not problems:
        path = _cache_file(cache_dir, entry, split, check_values)
        # Atomic: a reader sees a whole record or none.
        storage.write_text(str(path), json.dumps({"uri": entry.uri, "warnings": warnings}))
    return problems, warnings


def _unreadable(err: Exception) -> str | None:
    """The store failing to answer (after its retries), which says nothing of the file itself; None for
    anything else."""
    text = str(err)
    return f"could not be read from the object store ({text})" if "AWS Error" in text else None


def _check_file(uri: str, split: str, check_values: bool) -> tuple[list[str], list[str]]:
    """Problems and warnings of one file; every failure to read becomes a problem, never an exception."""
    problems: list[str] = []
    warnings: list[str] = []
    try:
        if not storage.is_file(uri):
            return ["is not a regular file"], warnings
        # is_hdf5 only looks for the signature, so garbage and empty files get a clear message of their own
        # (local files; a remote one that is no HDF5 fails to open below, with the same kind of message).
        if not storage.is_remote(uri) and not h5py.is_hdf5(uri):
            return [f"is not an HDF5 file (no HDF5 signature in its {storage.stat(uri).size} bytes)"], warnings
        with contextlib.ExitStack() as stack:
            try:
                hf = stack.enter_context(store.open_hdf5(uri))
            except OSError as err:
                return [_unreadable(err) or f"cannot be opened as HDF5, truncated or corrupt ({err})"], warnings
            _check_open_file(hf, split, check_values, problems, warnings)
    except Exception as err:  # damaged files raise OSError, KeyError, RuntimeError... from h5py: report them
        problems.append(
            _unreadable(err) or f"could not be read, truncated or corrupt ({type(err).__name__}: {err})"
        )
    return problems, warnings


def _check_open_file(
    hf: h5py.File, split: str, check_values: bool, problems: list[str], warnings: list[str]
) -> None:
    """Run every check on an open file, appending to ``problems``/``warnings``."""
    test_split = is_test_split(split) and TARGET_KEY not in hf  # fastMRI's challenge layout
    kspace = _dataset(hf, KSPACE_KEY, "required", problems)
    kspace_shape = _check_kspace(kspace, problems) if kspace is not None else None
    metadata = _read_metadata(hf, problems)
    if kspace_shape and metadata:
        _check_kspace_against_header(kspace_shape, metadata, problems)
    _check_attrs(hf.attrs, TEST_REQUIRED_ATTRS if test_split else REQUIRED_ATTRS, problems, warnings)

    target = None
    if not test_split:
        target = _dataset(hf, TARGET_KEY, f"required in {split}", problems)
    if target is not None:
        _check_target(target, kspace_shape, metadata, problems)
    if test_split:
        mask = _dataset(hf, MASK_KEY, f"expected in {split}", problems)
        if mask is not None and kspace_shape:
            _check_mask(mask, kspace_shape[2], problems)

    if check_values:
        if kspace_shape:
            _append(problems, _nonfinite_problem(kspace, KSPACE_KEY))
        if target is not None:
            _append(problems, _nonfinite_problem(target, TARGET_KEY))


def _append(problems: list[str], problem: str | None) -> None:
    if problem:
        problems.append(problem)


def _dataset(hf: h5py.File, key: str, requirement: str, problems: list[str]) -> h5py.Dataset | None:
    """The dataset ``key``, or None after recording why it is unusable."""
    if key not in hf:
        problems.append(f"{key} missing ({requirement})")
        return None
    obj = hf[key]
    if not isinstance(obj, h5py.Dataset):
        problems.append(f"{key} is a {type(obj).__name__}, expected a dataset")
        return None
    return obj


def _dtype_name(dtype: np.dtype) -> str:
    # Compound dtypes other than h5py's (r, i) complex would otherwise print as an unreadable "void64".
    return str(dtype) if dtype.names else dtype.name


def _check_kspace(kspace: h5py.Dataset, problems: list[str]) -> tuple[int, int, int] | None:
    """Dtype, rank and non-empty axes of k-space; its shape when the shape checks can rely on it."""
    if kspace.dtype.kind != "c":
        problems.append(f"{KSPACE_KEY} is {_dtype_name(kspace.dtype)}, expected complex64 (or complex)")
    if kspace.ndim != 3:
        problems.append(
            f"{KSPACE_KEY} has rank {kspace.ndim} (shape {kspace.shape}), expected 3 (slices, H, W)"
        )
        return None
    if kspace.shape[0] == 0:
        problems.append(f"{KSPACE_KEY} has 0 slices (shape {kspace.shape})")
        return None
    if 0 in kspace.shape:
        problems.append(f"{KSPACE_KEY} has an empty axis (shape {kspace.shape})")
        return None
    return kspace.shape


def _read_metadata(hf: h5py.File, problems: list[str]) -> VolumeMetadata | None:
    """The header fields fastMRI reads, recording volume.py's message when one is missing or bad."""
    try:
        metadata = parse_ismrmrd_header(read_header_xml(hf))
    except HeaderError as err:
        problems.append(str(err))
        return None
    except (TypeError, UnicodeError) as err:  # e.g. a numeric dataset stored under the header's name
        problems.append(f"ismrmrd_header could not be read as XML text ({err})")
        return None
    rx, ry, _ = metadata.recon_size
    if rx <= 0 or ry <= 0:
        problems.append(f"header recon size {rx}x{ry} (reconSpace/matrixSize x, y), expected positive sizes")
        return None
    return metadata


def _check_kspace_against_header(
    shape: tuple[int, int, int], metadata: VolumeMetadata, problems: list[str]
) -> None:
    """k-space size against the encoded matrix, the acquired band and the recon size."""
    _, height, width = shape
    enc_x, enc_y, _ = metadata.encoding_size
    if height != enc_x:
        problems.append(
            f"{KSPACE_KEY} height {height} differs from the header's encoding size x {enc_x} "
            "(encodedSpace/matrixSize/x)"
        )
    if width != enc_y:
        problems.append(
            f"{KSPACE_KEY} width {width} differs from the header's encoding size y {enc_y} "
            "(encodedSpace/matrixSize/y)"
        )
    # fastMRI masks k-space outside [padding_left, padding_right) and VarNet indexes columns with them.
    left, right = metadata.padding_left, metadata.padding_right
    for name, value in (("padding_left", left), ("padding_right", right)):
        if not 0 <= value <= width:
            problems.append(
                f"header {name} {value} is outside [0, {width}] (kspace width); "
                "check encodingLimits/kspace_encoding_step_1 center and maximum"
            )
    if left > right:
        problems.append(f"header padding_left {left} exceeds padding_right {right}")
    rx, ry, _ = metadata.recon_size
    if rx > height or ry > width:
        problems.append(
            f"header recon size {rx}x{ry} exceeds {KSPACE_KEY} size {height}x{width}; "
            "the centre crop to the target size is impossible"
        )


def _check_target(
    target: h5py.Dataset,
    kspace_shape: tuple[int, int, int] | None,
    metadata: VolumeMetadata | None,
    problems: list[str],
) -> None:
    """Dtype, rank and shape of the target against the header and k-space."""
    if target.dtype.kind != "f":
        problems.append(f"{TARGET_KEY} is {_dtype_name(target.dtype)}, expected float32 (or float)")
    if target.ndim != 3:
        problems.append(
            f"{TARGET_KEY} has rank {target.ndim} (shape {target.shape}), "
            "expected 3 (slices, recon x, recon y)"
        )
        return
    slices, height, width = target.shape
    if metadata is not None:
        rx, ry, _ = metadata.recon_size
        if (height, width) != (rx, ry):
            problems.append(
                f"{TARGET_KEY} has shape {target.shape}, expected (slices, {rx}, {ry}) from the header's "
                "recon size"
            )
    if kspace_shape is not None:
        if slices != kspace_shape[0]:
            problems.append(f"{TARGET_KEY} has {slices} slices, expected {kspace_shape[0]} like {KSPACE_KEY}")
        if height > kspace_shape[1] or width > kspace_shape[2]:
            problems.append(
                f"{TARGET_KEY} size {height}x{width} exceeds {KSPACE_KEY} size "
                f"{kspace_shape[1]}x{kspace_shape[2]}; the centre crop to the target is impossible"
            )


def _check_mask(mask: h5py.Dataset, width: int, problems: list[str]) -> None:
    if mask.shape != (width,):
        problems.append(f"{MASK_KEY} has shape {mask.shape}, expected ({width},) (kspace width)")


def _check_attrs(
    attrs: h5py.AttributeManager, required: Sequence[str], problems: list[str], warnings: list[str]
) -> None:
    """Required attributes present; ``max``/``norm`` usable numbers; ``acquisition`` a knee contrast."""
    for name in required:
        if name not in attrs:
            problems.append(f"attribute '{name}' missing")
    # max is the data range of PSNR/SSIM, so it must be positive; norm is an L2 norm, so never negative.
    if "max" in attrs and not _number_at_least(attrs["max"], 0.0, strict=True):
        problems.append(f"attribute 'max' is {_short_repr(attrs['max'])}, expected a finite positive number")
    if "norm" in attrs and not _number_at_least(attrs["norm"], 0.0, strict=False):
        problems.append(f"attribute 'norm' is {_short_repr(attrs['norm'])}, expected a finite number >= 0")
    if "acquisition" in attrs:
        acquisition = _as_text(attrs["acquisition"])
        if acquisition not in KNEE_ACQUISITIONS:
            # Not fatal: fastMRI's brain data and other exports use other contrasts on purpose.
            warnings.append(
                f"attribute 'acquisition' is {acquisition!r}, not a knee contrast {KNEE_ACQUISITIONS}"
            )


def _number_at_least(value: Any, lowest: float, strict: bool) -> bool:
    """Whether ``value`` is a finite real scalar >= ``lowest`` (> when ``strict``)."""
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "iuf":
        return False
    number = float(array)
    return math.isfinite(number) and (number > lowest if strict else number >= lowest)


def _as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _short_repr(value: Any, limit: int = 60) -> str:
    # numpy scalars as plain Python values: "nan", not "np.float64(nan)"
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nonfinite_problem(dataset: h5py.Dataset, name: str, block_bytes: int = READ_BLOCK_BYTES) -> str | None:
    """Count NaN/Inf values, reading a bounded block of slices at a time so memory stays flat.

    Args:
        dataset: a (slices, ...) dataset.
        name: its key, for the message.
        block_bytes: read at most this many bytes at once (but always at least one slice).
    """
    if dataset.dtype.kind not in "fc" or dataset.ndim == 0 or dataset.shape[0] == 0:
        return None  # integers cannot hold NaN/Inf; a wrong dtype is reported elsewhere
    slice_bytes = max(1, dataset.dtype.itemsize * math.prod(dataset.shape[1:]))
    step = max(1, block_bytes // slice_bytes)
    nans = infs = 0
    first: int | None = None
    for start in range(0, dataset.shape[0], step):
        block = dataset[start : start + step]
        # A complex array viewed as its float parts: one vectorised isfinite, no temporary copies.
        values = block.view(block.real.dtype) if block.dtype.kind == "c" else block
        if np.isfinite(values).all():
            continue  # the common case costs one pass; counting is only for the bad blocks
        nans += int(np.isnan(values).sum())
        infs += int(np.isinf(values).sum())
        if first is None:
            bad_slices = ~np.isfinite(values.reshape(len(block), -1)).all(axis=1)
            first = start + int(np.argmax(bad_slices))
    if first is None:
        return None
    return f"{name} has {nans} NaN and {infs} Inf values (first in slice {first})"


# ---------------------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mri_models.data.validate",
        description="Check a fastMRI single-coil data root. Exit 0 if valid, 1 if a file or split is bad, "
        "2 if the root is missing or empty.",
    )
    parser.add_argument("root", help="data root holding one directory per split (a path or s3://... URI)")
    parser.add_argument(
        "--splits",
        nargs="+",
        default=list(DEFAULT_SPLITS),
        help="split directories to check (default: %(default)s)",
    )
    parser.add_argument(
        "--no-values", action="store_true", help="skip the NaN/Inf scan (checks metadata only, much faster)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate a root, print one line per bad file and a summary line; return the exit status.

    Args:
        argv: command line arguments (defaults to ``sys.argv[1:]``).
    """
    args = _parse_args(argv)
    report = validate_root(args.root, args.splits, check_values=not args.no_values)
    print(report.format())
    if report.ok:
        return EXIT_OK
    return EXIT_NOTHING_CHECKED if report.files_checked == 0 else EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
