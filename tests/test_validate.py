"""Tests of the data validator: one bad file per case, built by modifying a valid fixture volume with h5py.

Each case asserts that the named problem appears for the bad file only, so the valid files next to it are
shown to pass in the same run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mri_models.data.validate import (
    DataValidationError,
    _nonfinite_problem,
    check_root,
    main,
    validate_file,
    validate_root,
)
from mri_models.data.volume import HEADER_KEY, KSPACE_KEY, REQUIRED_ATTRS, TARGET_KEY, build_ismrmrd_header

REPO = Path(__file__).resolve().parents[1]
TRAIN0 = "singlecoil_train/file_train0.h5"  # 3 slices, k-space 64 x 40, recon 32 x 32
FILES_IN_ROOT = 5


def _edit(root: Path, name: str, edit: Callable[[h5py.File], None]) -> None:
    with h5py.File(root / name, "r+") as hf:
        edit(hf)


def _replace(root: Path, name: str, key: str, make: Callable[[np.ndarray], np.ndarray | None]) -> None:
    """Replace dataset ``key`` by ``make(old values)`` (delete it when that returns None)."""

    def edit(hf: h5py.File) -> None:
        old = hf[key][()]
        del hf[key]
        new = make(old)
        if new is not None:
            hf.create_dataset(key, data=new)

    _edit(root, name, edit)


def _set_header(root: Path, name: str, xml: str) -> None:
    _replace(root, name, HEADER_KEY, lambda _old: xml)


def _header(
    enc: tuple[int, int] = (64, 40), recon: tuple[int, int] = (32, 32), center: int = 17, maximum: int = 35
):
    """TRAIN0's header (padding_left 3, padding_right 39) with the given fields changed."""
    return build_ismrmrd_header((*enc, 1), (*recon, 1), center, maximum)


def _assert_only_bad(root: Path, name: str, fragment: str, split_files: int = FILES_IN_ROOT) -> None:
    """``name`` is the one bad file, with a problem containing ``fragment``; everything else is valid."""
    report = validate_root(root)
    assert report.root_problems == []
    assert report.files_checked == split_files
    assert list(report.file_problems) == [name], report.format()
    assert any(fragment in problem for problem in report.file_problems[name]), report.file_problems[name]
    assert any(line.startswith(f"{name}: ") and fragment in line for line in report.lines())
    assert not report.ok


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mri_models.data.validate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ------------------------------------------------------------------------------------------- good data


def test_valid_root_has_no_problems(fastmri_root: Path) -> None:
    report = validate_root(fastmri_root)
    assert report.ok, report.format()
    assert (report.files_checked, report.bad_files, report.file_warnings) == (FILES_IN_ROOT, 0, {})
    assert report.format() == f"checked {FILES_IN_ROOT} files under {fastmri_root}: 0 bad"
    assert check_root(fastmri_root).ok


def test_test_split_needs_a_mask_not_a_target(tmp_path: Path, fastmri_volume: Callable[..., Path]) -> None:
    good = fastmri_volume(tmp_path / "singlecoil_test" / "good.h5", with_target=False)
    no_mask = fastmri_volume(tmp_path / "singlecoil_test" / "no_mask.h5", with_target=False)
    short_mask = fastmri_volume(tmp_path / "singlecoil_test" / "short_mask.h5", with_target=False)
    for path, width in ((good, 40), (short_mask, 39)):
        with h5py.File(path, "r+") as hf:
            hf.create_dataset("mask", data=np.ones(width, dtype=bool))
    for path in (good, no_mask, short_mask):
        with h5py.File(path, "r+") as hf:  # real test files have no target, hence no max/norm
            del hf.attrs["max"], hf.attrs["norm"]
    assert validate_file(good, "singlecoil_test") == []
    assert validate_file(no_mask, "singlecoil_test") == ["mask missing (expected in singlecoil_test)"]
    assert validate_file(short_mask, "singlecoil_test") == [
        "mask has shape (39,), expected (40,) (kspace width)"
    ]
    # The same target-less file in a training split lacks its target and its max/norm.
    problems = validate_file(good, "singlecoil_train")
    assert f"{TARGET_KEY} missing (required in singlecoil_train)" in problems
    assert "attribute 'max' missing" in problems


# ------------------------------------------------------------------------------------- root and splits


def test_missing_root(tmp_path: Path) -> None:
    report = validate_root(tmp_path / "nowhere")
    assert report.root_problems == [f"{tmp_path / 'nowhere'}: data root does not exist"]
    assert not report.ok and report.files_checked == 0


def test_empty_root(tmp_path: Path) -> None:
    assert validate_root(tmp_path).root_problems == [f"{tmp_path}: data root is empty"]


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "root.h5").write_bytes(b"")
    assert validate_root(tmp_path / "root.h5").root_problems == [
        f"{tmp_path / 'root.h5'}: data root is not a directory"
    ]


def test_missing_split_directory(fastmri_root: Path) -> None:
    for path in (fastmri_root / "singlecoil_val").iterdir():
        path.unlink()
    (fastmri_root / "singlecoil_val").rmdir()
    report = validate_root(fastmri_root)
    assert report.root_problems == [
        f"singlecoil_val: split directory missing (expected {fastmri_root / 'singlecoil_val'})"
    ]
    assert report.file_problems == {} and report.files_checked == 3 and not report.ok
    # Checking only the splits that exist is fine.
    assert validate_root(fastmri_root, splits=["singlecoil_train"]).ok


def test_split_without_h5_files(fastmri_root: Path) -> None:
    for path in (fastmri_root / "singlecoil_val").iterdir():
        path.rename(path.with_suffix(".hdf5"))
    (fastmri_root / "singlecoil_val" / "README.txt").write_text("not data")
    report = validate_root(fastmri_root)
    assert report.root_problems == ["singlecoil_val: split directory holds no .h5 files"]
    assert report.file_problems == {}


# ------------------------------------------------------------------------------------- unreadable files


def test_garbage_file_is_not_hdf5(fastmri_root: Path) -> None:
    (fastmri_root / "singlecoil_train" / "garbage.h5").write_bytes(b"\x00\x01not an hdf5 file" * 50)
    _assert_only_bad(fastmri_root, "singlecoil_train/garbage.h5", "is not an HDF5 file", FILES_IN_ROOT + 1)


def test_empty_file_is_not_hdf5(fastmri_root: Path) -> None:
    (fastmri_root / "singlecoil_val" / "empty.h5").write_bytes(b"")
    _assert_only_bad(
        fastmri_root, "singlecoil_val/empty.h5", "no HDF5 signature in its 0 bytes", FILES_IN_ROOT + 1
    )


def test_truncated_file(fastmri_root: Path) -> None:
    path = fastmri_root / TRAIN0
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_only_bad(fastmri_root, TRAIN0, "cannot be opened as HDF5, truncated or corrupt")


def test_directory_named_h5_is_skipped_like_the_reader_does(fastmri_root: Path) -> None:
    (fastmri_root / "singlecoil_train" / "dir.h5").mkdir()
    assert validate_root(fastmri_root).ok
    assert validate_file(fastmri_root / "singlecoil_train" / "dir.h5", "singlecoil_train") == [
        "is not a regular file"
    ]


# ---------------------------------------------------------------------------------------------- k-space


def test_kspace_missing(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda _old: None)
    _assert_only_bad(fastmri_root, TRAIN0, "kspace missing (required)")


def test_kspace_not_complex(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda old: old.real)
    _assert_only_bad(fastmri_root, TRAIN0, "kspace is float32, expected complex64 (or complex)")


def test_kspace_wrong_rank(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda old: old[0])
    _assert_only_bad(fastmri_root, TRAIN0, "kspace has rank 2 (shape (64, 40)), expected 3 (slices, H, W)")


def test_zero_slices(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda old: old[:0])
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: old[:0])
    _assert_only_bad(fastmri_root, TRAIN0, "kspace has 0 slices (shape (0, 64, 40))")


def test_kspace_height_differs_from_header(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header(enc=(62, 40)))
    _assert_only_bad(fastmri_root, TRAIN0, "kspace height 64 differs from the header's encoding size x 62")


def test_kspace_width_differs_from_header(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header(enc=(64, 42)))
    _assert_only_bad(fastmri_root, TRAIN0, "kspace width 40 differs from the header's encoding size y 42")


def test_padding_left_outside_kspace(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header(center=25))  # padding_left = 40 // 2 - 25
    _assert_only_bad(fastmri_root, TRAIN0, "header padding_left -5 is outside [0, 40] (kspace width)")


def test_padding_right_outside_kspace(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header(maximum=45))  # padding_right = 3 + 45 + 1
    _assert_only_bad(fastmri_root, TRAIN0, "header padding_right 49 is outside [0, 40] (kspace width)")


def test_recon_size_larger_than_kspace(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header(recon=(80, 32)))
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: np.zeros((3, 80, 32), np.float32) + old.max())
    _assert_only_bad(fastmri_root, TRAIN0, "header recon size 80x32 exceeds kspace size 64x40")
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc size 80x32 exceeds kspace size 64x40")


def test_nan_in_kspace(fastmri_root: Path) -> None:
    def poison(hf: h5py.File) -> None:
        hf[KSPACE_KEY][1, 5, 7] = complex(np.nan, 0.0)

    _edit(fastmri_root, TRAIN0, poison)
    _assert_only_bad(fastmri_root, TRAIN0, "kspace has 1 NaN and 0 Inf values (first in slice 1)")
    # The value scan is optional: metadata-only validation does not read the arrays.
    assert validate_file(fastmri_root / TRAIN0, "singlecoil_train", check_values=False) == []


def test_nonfinite_scan_reads_in_blocks(fastmri_root: Path) -> None:
    def poison(hf: h5py.File) -> None:
        hf[KSPACE_KEY][2, 0, 0] = complex(np.inf, np.nan)
        hf[KSPACE_KEY][4, 1, 1] = complex(np.nan, 0.0)

    path = fastmri_root / "singlecoil_train" / "file_train2.h5"  # 5 slices
    _edit(fastmri_root, "singlecoil_train/file_train2.h5", poison)
    with h5py.File(path, "r") as hf:
        for block_bytes in (1, 2 * 64 * 44 * 8, 10**9):  # one slice, two slices, everything at once
            assert _nonfinite_problem(hf[KSPACE_KEY], KSPACE_KEY, block_bytes) == (
                "kspace has 2 NaN and 1 Inf values (first in slice 2)"
            )


# ----------------------------------------------------------------------------------------------- target


def test_target_missing_in_train(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda _old: None)
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc missing (required in singlecoil_train)")


def test_target_missing_in_val(fastmri_root: Path) -> None:
    _replace(fastmri_root, "singlecoil_val/file_val1.h5", TARGET_KEY, lambda _old: None)
    _assert_only_bad(
        fastmri_root, "singlecoil_val/file_val1.h5", "reconstruction_esc missing (required in singlecoil_val)"
    )


def test_target_not_float(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: old.astype(np.complex64))
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc is complex64, expected float32 (or float)")


def test_target_wrong_rank(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: old.reshape(3, -1))
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc has rank 2 (shape (3, 1024)), expected 3")


def test_target_shape_differs_from_header_recon_size(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: old[:, :30])
    _assert_only_bad(
        fastmri_root,
        TRAIN0,
        "reconstruction_esc has shape (3, 30, 32), expected (slices, 32, 32) from the header",
    )


def test_target_slice_count_differs_from_kspace(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, TARGET_KEY, lambda old: old[:2])
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc has 2 slices, expected 3 like kspace")


def test_inf_in_target(fastmri_root: Path) -> None:
    def poison(hf: h5py.File) -> None:
        hf[TARGET_KEY][2, 0, 0] = np.inf

    _edit(fastmri_root, TRAIN0, poison)
    _assert_only_bad(fastmri_root, TRAIN0, "reconstruction_esc has 0 NaN and 1 Inf values (first in slice 2)")


# ----------------------------------------------------------------------------------------------- header


def test_header_missing(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, HEADER_KEY, lambda _old: None)
    _assert_only_bad(fastmri_root, TRAIN0, "no 'ismrmrd_header' dataset")


def test_header_unparsable(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, "<ismrmrdHeader><encoding>")
    _assert_only_bad(fastmri_root, TRAIN0, "ismrmrd_header is not valid XML")


def test_header_missing_field(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header().replace("<center>17</center>", ""))
    _assert_only_bad(
        fastmri_root,
        TRAIN0,
        "ismrmrd_header lacks the field encoding/encodingLimits/kspace_encoding_step_1/center",
    )


def test_header_field_not_an_integer(fastmri_root: Path) -> None:
    _set_header(fastmri_root, TRAIN0, _header().replace("<x>32</x>", "<x>big</x>"))
    _assert_only_bad(
        fastmri_root, TRAIN0, "field encoding/reconSpace/matrixSize/x is 'big', expected an integer"
    )


# ------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize("name", REQUIRED_ATTRS)
def test_required_attribute_missing(fastmri_root: Path, name: str) -> None:
    _edit(fastmri_root, TRAIN0, lambda hf: hf.attrs.__delitem__(name))
    _assert_only_bad(fastmri_root, TRAIN0, f"attribute '{name}' missing")


def test_max_not_finite(fastmri_root: Path) -> None:
    _edit(fastmri_root, TRAIN0, lambda hf: hf.attrs.__setitem__("max", np.nan))
    _assert_only_bad(fastmri_root, TRAIN0, "attribute 'max' is nan, expected a finite positive number")


def test_unknown_acquisition_is_a_warning_only(fastmri_root: Path) -> None:
    _edit(fastmri_root, TRAIN0, lambda hf: hf.attrs.__setitem__("acquisition", "AXT2"))
    report = validate_root(fastmri_root)
    assert report.ok
    assert list(report.file_warnings) == [TRAIN0]
    assert f"{TRAIN0}: warning: attribute 'acquisition' is 'AXT2', not a knee contrast" in report.format()


# -------------------------------------------------------------------------------- check_root and the CLI


def test_check_root_raises_listing_bad_files(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda old: old.real)
    _edit(fastmri_root, "singlecoil_val/file_val0.h5", lambda hf: hf.attrs.__delitem__("max"))
    with pytest.raises(DataValidationError) as info:
        check_root(fastmri_root)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"{TRAIN0}: kspace is float32, expected complex64 (or complex)" in message
    assert "singlecoil_val/file_val0.h5: attribute 'max' missing" in message
    assert info.value.report.bad_files == 2
    with pytest.raises(DataValidationError, match=r"\.\.\. and 1 more bad files"):
        check_root(fastmri_root, max_listed=1)


def test_check_root_raises_for_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="data root does not exist"):
        check_root(tmp_path / "nowhere")


def test_cli_good_root_exits_zero(fastmri_root: Path) -> None:
    result = _run_cli(str(fastmri_root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"checked {FILES_IN_ROOT} files under {fastmri_root}: 0 bad"


def test_cli_bad_root_names_the_file_and_leaves_files_untouched(fastmri_root: Path) -> None:
    _replace(fastmri_root, TRAIN0, KSPACE_KEY, lambda old: old.real)
    (fastmri_root / "singlecoil_val" / "garbage.h5").write_bytes(b"garbage" * 10)
    before = _hashes(fastmri_root)
    result = _run_cli(str(fastmri_root), "--splits", "singlecoil_train", "singlecoil_val")
    validate_root(fastmri_root)
    assert _hashes(fastmri_root) == before  # byte-identical, and no file added under the root
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{TRAIN0}: kspace is float32, expected complex64 (or complex)" in lines
    assert any(line.startswith("singlecoil_val/garbage.h5: is not an HDF5 file") for line in lines)
    assert lines[-1] == f"checked {FILES_IN_ROOT + 1} files under {fastmri_root}: 2 bad"


def test_cli_missing_root_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through main(): the subprocess runs above already cover the module entry point.
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "data root does not exist" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2  # empty root


def test_a_file_found_valid_is_not_scanned_again_until_it_changes(fastmri_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "validated"
    assert validate_root(fastmri_root, cache_dir=cache).ok
    assert len(list(cache.glob("*.json"))) == FILES_IN_ROOT
    # Plant a NaN without changing what identifies the file's version (size and modification time): a
    # remembered file is not scanned again, so the NaN goes unseen...
    path = fastmri_root / TRAIN0
    before = path.stat()
    _edit(fastmri_root, TRAIN0, lambda hf: hf[KSPACE_KEY].__setitem__((0, 0, 0), np.nan))
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert validate_root(fastmri_root, cache_dir=cache).ok
    assert not validate_root(fastmri_root).ok  # ...which a check without the cache finds
    # ...until the file changes: a new modification time is a new version, checked again and not remembered.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    report = validate_root(fastmri_root, cache_dir=cache)
    assert list(report.file_problems) == [TRAIN0] and "NaN" in report.file_problems[TRAIN0][0]
    assert len(list(cache.glob("*.json"))) == FILES_IN_ROOT
    # A metadata-only check is answered by a remembered value scan; the reverse is not.
    assert validate_root(fastmri_root, check_values=False, cache_dir=cache).files_checked == FILES_IN_ROOT
    assert len(list(cache.glob("*.json"))) == FILES_IN_ROOT + 1  # the bad file, checked without values
