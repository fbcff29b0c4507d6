"""Shared fixtures: small volumes written in the exact fastMRI single-coil HDF5 layout.

These fixtures deliberately do not use ``mri_models.data.synthetic``: the reader, transforms and validator
are tested on files built here from first principles, so a bug in the generator cannot hide a bug in them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mri_models.data.volume import build_ismrmrd_header, write_volume


def centred_ifft2(kspace: np.ndarray) -> np.ndarray:
    """fastMRI's centred orthonormal 2-D inverse FFT over the last two axes."""
    shifted = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifftn(shifted, axes=(-2, -1), norm="ortho"), axes=(-2, -1))


def centre_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """fastMRI's centre crop over the last two axes."""
    h, w = image.shape[-2:]
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return image[..., top : top + shape[0], left : left + shape[1]]


def make_fastmri_volume(
    path: Path,
    num_slices: int = 3,
    kspace_shape: tuple[int, int] = (64, 40),
    recon_size: tuple[int, int] = (32, 32),
    seed: int = 0,
    acquisition: str = "CORPD_FBK",
    with_target: bool = True,
) -> Path:
    """Write a valid fastMRI single-coil volume of random k-space with a target derived as fastMRI does.

    The acquired phase-encoding band is narrower than the matrix, like real knee data, so the header's
    padding_left/right are non-trivial.
    """
    rng = np.random.default_rng(seed)
    height, width = kspace_shape
    shape = (num_slices, height, width)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64) * 1e-4
    pe_maximum = width - 5  # columns [padding_left, padding_right) are acquired
    pe_center = pe_maximum // 2
    padding_left = width // 2 - pe_center
    kspace[..., :padding_left] = 0
    kspace[..., padding_left + pe_maximum + 1 :] = 0
    header = build_ismrmrd_header((height, width, 1), (*recon_size, 1), pe_center, pe_maximum)
    target = centre_crop(np.abs(centred_ifft2(kspace)), recon_size).astype(np.float32)
    attrs = {
        "acquisition": acquisition,
        "max": float(target.max()),
        "norm": float(np.linalg.norm(target)),
        "patient_id": f"patient-{seed:04d}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(path, kspace, header, attrs, target if with_target else None)
    return path


@pytest.fixture
def fastmri_volume() -> Callable[..., Path]:
    """``make_fastmri_volume(path, ...)``: write one small valid volume and return its path."""
    return make_fastmri_volume


@pytest.fixture
def fastmri_root(tmp_path: Path) -> Path:
    """A data root with three train and two val volumes of varying widths and both knee contrasts."""
    for i, width in enumerate((40, 41, 44)):
        make_fastmri_volume(
            tmp_path / "singlecoil_train" / f"file_train{i}.h5",
            num_slices=3 + i,
            kspace_shape=(64, width),
            seed=i,
            acquisition=("CORPD_FBK", "CORPDFS_FBK")[i % 2],
        )
    for i, width in enumerate((40, 43)):
        make_fastmri_volume(
            tmp_path / "singlecoil_val" / f"file_val{i}.h5",
            num_slices=4,
            kspace_shape=(64, width),
            seed=10 + i,
        )
    return tmp_path


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs, like CI) shared by the integration tests of a session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small fastMRI-format root for training runs: 4 train and 3 val volumes of 32 x 32 images."""
    root = tmp_path_factory.mktemp("tiny_root")
    for i in range(4):
        make_fastmri_volume(
            root / "singlecoil_train" / f"train{i}.h5", num_slices=4, kspace_shape=(64, 40 + i), seed=i
        )
    for i in range(3):
        make_fastmri_volume(
            root / "singlecoil_val" / f"val{i}.h5", num_slices=3 + i, kspace_shape=(64, 41), seed=20 + i
        )
    return root
