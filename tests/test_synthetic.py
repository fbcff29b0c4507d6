"""The synthetic knee generator against fastMRI's own reader and transforms, and its content.

Format checks go through the ``fastmri`` package itself (SliceDataset, UnetDataTransform, ifft2c), so the
files are proven to be read unchanged by the reference implementation. Content checks are chosen so that a
Shepp-Logan phantom or a stack of identical slices would fail them.
"""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations, pairwise
from pathlib import Path

import fastmri
import h5py
import numpy as np
import pytest
import torch
from fastmri.data import SliceDataset
from fastmri.data import transforms as fastmri_transforms
from fastmri.data.subsample import RandomMaskFunc
from scipy import ndimage, signal

from mri_models.data import synthetic
from mri_models.data.volume import KNEE_ACQUISITIONS, KSPACE_KEY, TARGET_KEY, write_volume

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_slices": 4, "recon_size": (64, 64), "kspace_size": (128, 74)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, synthetic.generate_dataset(root, num_train=3, num_val=2, seed=0, **SMALL)


@pytest.fixture(scope="module")
def default_volumes() -> dict[str, synthetic.SyntheticVolume]:
    """One volume per contrast at the default (cpu profile) size, from the same seed (same geometry)."""
    return {acq: synthetic.synthesize_volume(7, 12, (128, 128), (256, 148), acq) for acq in KNEE_ACQUISITIONS}


def read(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as hf:
        return hf[KSPACE_KEY][()], hf[TARGET_KEY][()], dict(hf.attrs)


def fastmri_target(kspace: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
    """fastMRI's single-coil target derivation, with fastMRI's own functions."""
    image = fastmri.complex_abs(fastmri.ifft2c(fastmri_transforms.to_tensor(kspace)))
    return fastmri_transforms.center_crop(image, recon_size).numpy()


def fastmri_dataset(split_dir: Path) -> SliceDataset:
    transform = fastmri_transforms.UnetDataTransform(
        "singlecoil", mask_func=RandomMaskFunc([0.08], [4]), use_seed=True
    )
    return SliceDataset(split_dir, challenge="singlecoil", transform=transform)


# ------------------------------------------------------------------------------------------- the format


def test_layout_and_fastmri_reads_files_unchanged(dataset):
    root, paths = dataset
    assert [p.relative_to(root).as_posix() for p in paths] == [
        *(f"singlecoil_train/synthetic_train_{i:04d}.h5" for i in range(3)),
        *(f"singlecoil_val/synthetic_val_{i:04d}.h5" for i in range(2)),
    ]
    for split, volumes in (("singlecoil_train", 3), ("singlecoil_val", 2)):
        ds = fastmri_dataset(root / split)
        assert len(ds) == volumes * SMALL["num_slices"]
        sample = ds[len(ds) - 1]
        assert sample.image.shape == sample.target.shape == SMALL["recon_size"]
        assert torch.isfinite(sample.image).all() and torch.isfinite(sample.target).all()
        assert sample.image.abs().max() <= 6 and sample.std > 0
        assert sample.max_value == pytest.approx(read(root / split / sample.fname)[2]["max"])


def test_header_agrees_with_arrays_and_unacquired_columns_are_zero(dataset):
    root, _ = dataset
    kh, kw = SMALL["kspace_size"]
    h, w = SMALL["recon_size"]
    for split in ("singlecoil_train", "singlecoil_val"):
        for fname, _, meta in fastmri_dataset(root / split).raw_samples:
            assert meta["encoding_size"] == (kh, kw, 1)
            assert meta["recon_size"] == (h, w, 1)
            left, right = meta["padding_left"], meta["padding_right"]
            assert 0 < left < right < kw
            kspace, target, _ = read(fname)
            assert kspace.dtype == np.complex64 and kspace.shape == (SMALL["num_slices"], kh, kw)
            assert target.dtype == np.float32 and target.shape == (SMALL["num_slices"], h, w)
            assert not kspace[..., :left].any() and not kspace[..., right:].any()
            assert np.abs(kspace[..., left:right]).min(axis=1).all()  # every acquired column has data


def test_target_is_fastmris_derivation_of_the_stored_kspace(dataset):
    _, paths = dataset
    for path in paths:
        kspace, target, _ = read(path)
        expected = fastmri_target(kspace, SMALL["recon_size"])
        np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_attributes_match_the_target_and_cover_both_contrasts(dataset):
    _, paths = dataset
    acquisitions, patients = set(), set()
    for path in paths:
        _, target, attrs = read(path)
        assert attrs["max"] == pytest.approx(float(target.max()), rel=1e-6)
        assert attrs["norm"] == pytest.approx(float(np.linalg.norm(target)), rel=1e-5)
        assert 5e-5 < attrs["max"] < 2e-3  # the order of magnitude of real fastMRI knee targets
        acquisitions.add(attrs["acquisition"])
        patients.add(attrs["patient_id"])
    assert acquisitions == set(KNEE_ACQUISITIONS)
    assert len(patients) == len(paths)


@pytest.mark.parametrize("width", [368, 369])
def test_real_size_volume(tmp_path, width):
    recon = (320, 320)
    volume = synthetic.synthesize_volume(3, 2, recon, (640, width), "CORPDFS_FBK")
    assert volume.kspace.shape == (2, 640, width) and volume.target.shape == (2, *recon)
    path = tmp_path / "singlecoil_val" / "file_real.h5"
    path.parent.mkdir()
    write_volume(path, volume.kspace, volume.header_xml, volume.attrs, volume.target)
    ds = fastmri_dataset(path.parent)
    meta = ds.raw_samples[0].metadata
    assert meta["encoding_size"] == (640, width, 1) and meta["recon_size"] == (320, 320, 1)
    assert (meta["padding_left"], meta["padding_right"]) == (17, 17 + 334 + (width % 2))
    assert not volume.kspace[..., : meta["padding_left"]].any()
    assert not volume.kspace[..., meta["padding_right"] :].any()
    np.testing.assert_allclose(
        volume.target, fastmri_target(volume.kspace, recon), rtol=1e-5, atol=1e-5 * volume.target.max()
    )
    assert 1e-4 < volume.attrs["max"] < 1e-3
    # The readout is oversampled twice: the anatomy sits in the central half of the rows, the rest is noise.
    image = fastmri.complex_abs(fastmri.ifft2c(fastmri_transforms.to_tensor(volume.kspace))).numpy()
    rows = image.mean(axis=(0, 2))
    outside = np.concatenate([rows[:150], rows[490:]])
    assert rows[160:480].mean() > 4 * outside.mean() and outside.max() < 1.2 * outside.mean()
    assert ds[0].image.shape == recon


# ---------------------------------------------------------------------------------------- determinism


def test_rerun_is_byte_identical_and_the_seed_matters(tmp_path, dataset):
    _, paths = dataset
    again = synthetic.generate_dataset(tmp_path / "again", num_train=3, num_val=2, seed=0, **SMALL)
    other = synthetic.generate_dataset(tmp_path / "other", num_train=3, num_val=2, seed=1, **SMALL)
    for first, second, reseeded in zip(paths, again, other, strict=True):
        k1, t1, a1 = read(first)
        k2, t2, a2 = read(second)
        assert k1.tobytes() == k2.tobytes() and t1.tobytes() == t2.tobytes() and a1 == a2
        k3, t3, _ = read(reseeded)
        assert not np.array_equal(k1, k3) and not np.array_equal(t1, t3)


def test_a_volume_depends_only_on_seed_split_and_index(tmp_path, dataset):
    _, paths = dataset
    (single,) = synthetic.generate_dataset(tmp_path, num_train=1, num_val=0, seed=0, **SMALL)
    assert read(single)[0].tobytes() == read(paths[0])[0].tobytes()
    assert not (tmp_path / "singlecoil_val").exists()


def test_volumes_differ(dataset):
    _, paths = dataset
    targets = [read(p)[1] / read(p)[2]["max"] for p in paths]
    for a, b in combinations(targets, 2):
        assert np.mean((a - b) ** 2) > 0.1 * np.mean(a**2)


def test_generation_is_idempotent_and_repairs_stale_files(tmp_path):
    paths = synthetic.generate_dataset(tmp_path, num_train=2, num_val=1, seed=0, **SMALL)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert synthetic.generate_dataset(tmp_path, num_train=2, num_val=1, seed=0, **SMALL) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    reference = read(paths[1])[0]
    paths[1].write_bytes(b"truncated")  # an interrupted copy, not an HDF5 file
    synthetic.generate_dataset(tmp_path, num_train=2, num_val=1, seed=0, **SMALL)
    assert read(paths[1])[0].tobytes() == reference.tobytes()
    assert paths[0].stat().st_mtime_ns == stamps[0]
    # Other parameters under the same names: rewritten, not reused.
    synthetic.generate_dataset(tmp_path, num_train=2, num_val=1, seed=5, **SMALL)
    assert read(paths[1])[0].tobytes() != reference.tobytes()
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"kspace_size": (128, 60)}, ValueError, "kspace_size"),
        ({"kspace_size": (32, 74)}, ValueError, "kspace_size"),
        ({"num_train": -1}, ValueError, "num_train"),
        ({"num_val": -2}, ValueError, "num_val"),
        ({"num_slices": 0}, ValueError, "num_slices"),
        ({"num_slices": 2.5}, TypeError, "num_slices"),
        ({"recon_size": (8, 64), "kspace_size": (16, 74)}, ValueError, "recon_size"),
        ({"recon_size": (64,)}, ValueError, "recon_size"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_invalid_arguments_are_named(tmp_path, kwargs, error, name):
    args = {"num_train": 1, "num_val": 1, **SMALL, **kwargs}
    with pytest.raises(error, match=name):
        synthetic.generate_dataset(tmp_path, **args)
    assert not list(tmp_path.iterdir())


def test_invalid_acquisition_is_named():
    with pytest.raises(ValueError, match="acquisition"):
        synthetic.synthesize_volume(0, 1, (32, 32), (64, 40), "AXT2")


def test_cli_writes_the_fastmri_layout(tmp_path, capsys):
    cmd = [sys.executable, "-m", "mri_models.data.synthetic", "--root", str(tmp_path), "--train", "2"]
    cmd += ["--val", "1", "--slices", "2", "--recon", "32", "32", "--kspace", "64", "40", "--seed", "3"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=120)
    train = sorted((tmp_path / "singlecoil_train").glob("*.h5"))
    val = sorted((tmp_path / "singlecoil_val").glob("*.h5"))
    assert len(train) == 2 and len(val) == 1
    kspace, target, attrs = read(val[0])
    assert kspace.shape == (2, 64, 40) and target.shape == (2, 32, 32)
    assert attrs["patient_id"] == synthetic.volume_patient_id(3, "val", 0, 2, (32, 32), (64, 40))

    # Errors name the flag (in-process: a second interpreter start-up would double the test's time).
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--root", str(tmp_path), "--recon", "32", "32", "--kspace", "16", "40"])
    assert exit_info.value.code == 2 and "--kspace" in capsys.readouterr().err


def test_render_preview_writes_a_png(tmp_path, dataset):
    root, _ = dataset
    out = synthetic.render_preview(root, tmp_path / "docs" / "preview.png", num_volumes=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ the content


def _object_mask(target: np.ndarray) -> np.ndarray:
    """The leg (holes such as dark bone cortex included), eroded away from its outline."""
    smooth = ndimage.gaussian_filter(target, (0, 2, 2))
    mask = np.stack([ndimage.binary_fill_holes(s > 0.15 * smooth.max()) for s in smooth])
    return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)), iterations=2)


def _tissue_levels(volume: synthetic.SyntheticVolume) -> tuple[np.ndarray, float]:
    """Modes of the (median-denoised) intensity histogram inside the leg and the fraction of dark tissue."""
    target = volume.target / volume.target.max()
    denoised = ndimage.median_filter(target, size=(1, 3, 3))[_object_mask(target)]
    hist, edges = np.histogram(denoised, bins=50, range=(0, 1))
    hist = ndimage.gaussian_filter1d(hist.astype(float), 1.0)
    peaks, _ = signal.find_peaks(hist, prominence=0.01 * hist.max())
    return edges[peaks], float(np.mean(denoised < 0.12))


@pytest.mark.parametrize("seed", [7, 9])
def test_several_tissue_intensity_levels(seed):
    # Proton density: intermediate muscle and bright fat and marrow as separate modes, plus a small but
    # real population of dark tissue (cortical bone, menisci, ligaments) inside the leg.
    pd = synthetic.synthesize_volume(seed, 12, (128, 128), (256, 148), "CORPD_FBK")
    modes, dark = _tissue_levels(pd)
    bright = modes[modes > 0.15]
    assert len(bright) >= 2 and bright.max() - bright.min() >= 0.2 and 0.005 < dark < 0.1
    # Fat suppressed: fat and marrow collapse to one dark level, muscle and cartilage above it.
    modes, _ = _tissue_levels(synthetic.synthesize_volume(seed, 12, (128, 128), (256, 148), "CORPDFS_FBK"))
    assert len(modes) >= 2 and modes.max() - modes.min() >= 0.1


def test_fat_suppression_darkens_fat(default_volumes):
    # Same seed, so the same anatomy: PD's brightest tissue (fat, fatty marrow) turns darker than muscle.
    pd, pdfs = (default_volumes[a].target / default_volumes[a].target.max() for a in KNEE_ACQUISITIONS)
    inside = _object_mask(pd)
    fat = inside & (pd > 0.6)
    muscle = inside & (pd > 0.2) & (pd < 0.4)
    assert fat.sum() > 1000 and muscle.sum() > 1000
    assert pd[fat].mean() > 1.5 * pd[muscle].mean()
    assert pdfs[fat].mean() < 0.8 * pdfs[muscle].mean()


def test_tissues_are_textured_beyond_the_measurement_noise(default_volumes):
    volume = default_volumes["CORPD_FBK"]
    target = volume.target / volume.target.max()
    # Noise level from the readout-oversampled rows, which hold no anatomy.
    full = np.abs(synthetic._ifft2c(volume.kspace)) / volume.target.max()
    noise = full[:, : full.shape[1] // 8].std()
    local_mean = ndimage.uniform_filter(target, (1, 5, 5))
    local_std = np.sqrt(np.clip(ndimage.uniform_filter(target**2, (1, 5, 5)) - local_mean**2, 0, None))
    # Piecewise-constant phantoms with the same noise give a ratio of about 1.5.
    assert np.median(local_std[_object_mask(target)]) > 4 * noise


@pytest.mark.parametrize("acquisition", KNEE_ACQUISITIONS)
def test_neighbouring_slices_are_similar_but_the_anatomy_changes(default_volumes, acquisition):
    target = default_volumes[acquisition].target
    target = target / target.max()
    raw = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairwise(target)]
    assert max(raw) < 0.99  # never a copy of the previous slice
    smooth = ndimage.gaussian_filter(target, (0, 1.5, 1.5))
    near = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairwise(smooth)]
    assert np.median(near) > 0.9 and min(near) > 0.7  # the slab ends change fastest

    # Structure, not only noise, changes: differences grow with the distance between slices.
    def msd(step: int) -> float:
        return float(np.mean((smooth[step:] - smooth[:-step]) ** 2))

    assert msd(5) > 2 * msd(1)
