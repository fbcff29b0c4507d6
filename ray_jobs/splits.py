"""The three roles of data: training trains, validation makes every choice, the test split only reports.

Every selection (best epoch, ASHA, the best configuration, early stopping) reads validation data; the
final evaluation alone reads the test split, so the numbers the tables report come from data no choice
saw. fastMRI's own single-coil test split has no targets, so on real data the test split is, by default,
half of the validation patients (as MLCommons AlgoPerf does with fastMRI's validation set): a volume goes
to one half or the other by its ``patient_id`` alone, never both, whatever the order of the listing. The
synthetic data has a ``singlecoil_test`` split with targets, which ``auto`` uses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mri_models import storage
from mri_models.data import store
from mri_models.data.slice_dataset import VolumeInfo, list_volumes
from mri_models.data.validate import check_root, default_validation_cache
from mri_models.data.volume import TARGET_KEY
from ray_jobs.config import ConfigError, TrainConfig

TEST_SPLIT = "singlecoil_test"
VAL_HALF = "val_half"  # test_split value: half of the validation patients
NO_TEST = "none"


@dataclass(frozen=True)
class VolumeFacts:
    """What a per-volume result row says of its volume besides the metrics."""

    patient_id: str
    acquisition: str
    slices: int


@dataclass(frozen=True)
class TestData:
    """The test role: where its volumes came from and the volumes themselves."""

    source: str  # "singlecoil_test under <root>", "half of singlecoil_val by patient", or "none"
    volumes: tuple[VolumeInfo, ...]
    val_kept: frozenset[str] | None  # the validation files left to validation (None: all of them)


def patient_of(volume: VolumeInfo) -> str:
    return str(volume.metadata.get("patient_id") or volume.fname)


def facts_of(volume: VolumeInfo) -> VolumeFacts:
    return VolumeFacts(patient_of(volume), str(volume.metadata.get("acquisition", "")), volume.num_slices)


def split_by_patient(volumes: list[VolumeInfo]) -> tuple[list[VolumeInfo], list[VolumeInfo]]:
    """Validation and test halves of ``volumes``, by patient.

    Patients are ordered by a hash of their id and the first half (rounded up) stays in validation: the
    assignment depends only on the set of patients, not on file names or listing order.
    """
    patients = sorted({patient_of(v) for v in volumes}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    kept = set(patients[: (len(patients) + 1) // 2])
    return [v for v in volumes if patient_of(v) in kept], [v for v in volumes if patient_of(v) not in kept]


def _without_targets(volumes: list[VolumeInfo]) -> list[str]:
    """The files among ``volumes`` without a target."""
    missing = []
    for volume in volumes:
        with store.open_hdf5(str(volume.fname)) as hf:
            if TARGET_KEY not in hf:
                missing.append(str(volume.fname))
    return missing


def choose_test_data(cfg: TrainConfig, root: str, val_split_dir: str, check_values: bool) -> TestData:
    """The test role for ``cfg`` under data root ``root``; raises ConfigError naming what is wrong.

    A test split is validated (once: the validation cache) before its files are opened for targets; with
    ``auto``, one without targets (fastMRI's own) leaves the test role to half of the validation patients.
    """
    if cfg.test_split == NO_TEST:
        return TestData(NO_TEST, (), None)
    test_root = storage.normalise(cfg.test_root) if cfg.test_root else root
    split = TEST_SPLIT if cfg.test_split == "auto" else cfg.test_split
    if cfg.test_split != VAL_HALF:
        split_dir = storage.join(test_root, split)
        if storage.is_dir(split_dir) and store.volume_files(split_dir):
            check_root(test_root, (split,), check_values=check_values, cache_dir=default_validation_cache())
            volumes = list_volumes(split_dir)
            missing = _without_targets(volumes)
            if not missing:
                return TestData(f"{split} under {test_root}", tuple(volumes), None)
            if cfg.test_split != "auto":
                raise ConfigError(
                    f"{missing[0]}: no {TARGET_KEY} target, but the test split {split!r} must have targets "
                    f"to be evaluated ({len(missing)} such file(s); fastMRI's own test split has none: set "
                    f"test_split: {VAL_HALF})"
                )
        elif cfg.test_split != "auto":
            raise ConfigError(f"test_split {split!r}: no .h5 files in {split_dir}")
    kept, test = split_by_patient(list_volumes(val_split_dir))
    if not test:
        raise ConfigError(
            f"{val_split_dir}: {len(kept)} validation volume(s) of a single patient cannot be split into "
            f"validation and test halves; add a {TEST_SPLIT} split with targets or set test_split: {NO_TEST}"
        )
    return TestData(
        "half of singlecoil_val by patient", tuple(test), frozenset(str(v.fname) for v in kept)
    )
