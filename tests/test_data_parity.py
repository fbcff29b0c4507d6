"""Our masks, slice dataset and U-Net transform against the ``fastmri`` package itself, bit for bit."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from fastmri.data import mri_data as ref_data
from fastmri.data import subsample as ref_subsample
from fastmri.data import transforms as ref_transforms

from mri_models.data import SliceDataset, UnetDataTransform, list_volumes, subsample
from tests.conftest import make_fastmri_volume

MASK_PAIRS = [
    (subsample.RandomMaskFunc, ref_subsample.RandomMaskFunc),
    (subsample.EquiSpacedMaskFunc, ref_subsample.EquiSpacedMaskFunc),
    (subsample.EquispacedMaskFractionFunc, ref_subsample.EquispacedMaskFractionFunc),
]


@pytest.mark.parametrize(("ours", "ref"), MASK_PAIRS, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("num_cols", [368, 369, 372, 41])
@pytest.mark.parametrize(("fractions", "accels"), [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8])])
def test_masks_equal_fastmri(ours, ref, num_cols, fractions, accels):
    mine, theirs = ours(fractions, accels, seed=7), ref(fractions, accels, seed=7)
    shape = (1, 640, num_cols, 2)
    # A stream of unseeded calls (the training case) interleaved with per-call seeds (validation):
    # the per-call seed must not disturb the stream, in both implementations alike.
    for call_seed in [None, None, 3, (102, 105, 108, 101), None, 12345, None]:
        mask, num_low = mine(shape, seed=call_seed)
        ref_mask, ref_num_low = theirs(shape, seed=call_seed)
        assert mask.dtype == ref_mask.dtype == torch.float32
        assert mask.shape == ref_mask.shape == (1, 1, num_cols, 1)
        assert torch.equal(mask, ref_mask)
        assert num_low == ref_num_low


def test_mask_rejects_mismatched_lengths_and_small_shapes():
    with pytest.raises(ValueError, match="same length"):
        subsample.RandomMaskFunc([0.08, 0.04], [4])
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        subsample.RandomMaskFunc([0.08], [4])((640, 368))
    with pytest.raises(ValueError, match="unknown mask_type 'radial'"):
        subsample.create_mask_func("radial", [0.08], [4])


def _same_metadata(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == value, key


@pytest.mark.parametrize(
    "rates",
    [{}, {"sample_rate": 0.5}, {"volume_sample_rate": 0.6}],
    ids=["all", "slices", "volumes"],
)
def test_slice_dataset_lists_what_fastmri_lists(fastmri_root, tmp_path, rates):
    split = fastmri_root / "singlecoil_train"
    random.seed(11)
    theirs = ref_data.SliceDataset(split, challenge="singlecoil", **rates).raw_samples
    random.seed(11)
    ours = SliceDataset(split, challenge="singlecoil", cache_dir=tmp_path / "cache", **rates).raw_samples
    assert [(s.fname, s.slice_ind) for s in ours] == [(s.fname, s.slice_ind) for s in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        _same_metadata(mine.metadata, ref.metadata)


def test_slice_dataset_raw_items_equal_fastmri(fastmri_root, tmp_path):
    split = fastmri_root / "singlecoil_val"
    ours = SliceDataset(split, cache_dir=tmp_path / "cache")
    theirs = ref_data.SliceDataset(split, challenge="singlecoil")
    assert len(ours) == len(theirs) == 8
    for i in range(len(theirs)):
        k, m, t, attrs, fname, slice_num = ours[i]
        rk, rm, rt, rattrs, rfname, rslice = theirs[i]
        assert np.array_equal(k, rk) and k.dtype == rk.dtype == np.complex64
        assert m is None and rm is None
        assert np.array_equal(t, rt)
        assert (fname, slice_num) == (rfname, rslice)
        _same_metadata(attrs, rattrs)


def _assert_samples_equal(ours, theirs):
    for name in ("image", "target", "mean", "std"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs from fastmri"
    assert (ours.fname, ours.slice_num, ours.max_value) == (theirs.fname, theirs.slice_num, theirs.max_value)


def _transform_pair(mask_class, use_seed, seed=5):
    ours_cls, ref_cls = next(pair for pair in MASK_PAIRS if pair[0] is mask_class)
    return (
        UnetDataTransform("singlecoil", ours_cls([0.08, 0.04], [4, 8], seed=seed), use_seed=use_seed),
        ref_transforms.UnetDataTransform(
            "singlecoil", ref_cls([0.08, 0.04], [4, 8], seed=seed), use_seed=use_seed
        ),
    )


@pytest.mark.parametrize("mask_class", [subsample.RandomMaskFunc, subsample.EquispacedMaskFractionFunc])
@pytest.mark.parametrize("use_seed", [True, False], ids=["validation", "training"])
def test_unet_transform_bit_for_bit_small(fastmri_root, tmp_path, mask_class, use_seed):
    ours_t, ref_t = _transform_pair(mask_class, use_seed)
    for split in ("singlecoil_train", "singlecoil_val"):
        ours = SliceDataset(fastmri_root / split, transform=ours_t, cache_dir=tmp_path / "cache")
        theirs = ref_data.SliceDataset(fastmri_root / split, challenge="singlecoil", transform=ref_t)
        for i in range(len(theirs)):
            _assert_samples_equal(ours[i], theirs[i])


@pytest.mark.parametrize("width", [368, 369, 372])
def test_unet_transform_bit_for_bit_real_size(tmp_path, width):
    split = tmp_path / "singlecoil_val"
    for seed in (1, 2):
        make_fastmri_volume(
            split / f"file{width}_{seed}.h5",
            num_slices=2,
            kspace_shape=(640, width),
            recon_size=(320, 320),
            seed=seed,
        )
    for use_seed in (True, False):
        ours_t, ref_t = _transform_pair(subsample.RandomMaskFunc, use_seed, seed=width)
        ours = SliceDataset(split, transform=ours_t, cache_dir="")
        theirs = ref_data.SliceDataset(split, challenge="singlecoil", transform=ref_t)
        for i in range(len(theirs)):
            _assert_samples_equal(ours[i], theirs[i])


def test_transform_without_mask_or_target(fastmri_root, fastmri_volume, tmp_path):
    path = fastmri_volume(tmp_path / "test_split" / "file_test.h5", with_target=False)
    ours = SliceDataset(path.parent, transform=UnetDataTransform(), cache_dir="")[1]
    theirs = ref_data.SliceDataset(
        path.parent, "singlecoil", transform=ref_transforms.UnetDataTransform("singlecoil")
    )[1]
    _assert_samples_equal(ours, theirs)
    assert ours.image.shape == (32, 32)  # cropped to the header's recon size


def test_listing_cache_is_reused_and_revalidated(fastmri_root, tmp_path):
    split, cache = fastmri_root / "singlecoil_train", tmp_path / "cache"
    before = {p.name: p.read_bytes() for p in split.iterdir()}
    first = list_volumes(split, cache)
    assert len(list(cache.iterdir())) == 1
    assert {p.name: p.read_bytes() for p in split.iterdir()} == before  # nothing written into the data

    # Overwrite a file's header region with garbage but keep its size and mtime: a cached listing must not
    # reopen it (reopening would fail), proving the cache is used.
    victim = split / "file_train0.h5"
    stat = victim.stat()
    with open(victim, "r+b") as f:
        f.write(b"\0" * 512)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list_volumes(split, cache) == first

    # Replacing a file (new size/mtime) is noticed and only that file is re-read.
    make_fastmri_volume(victim, num_slices=7, kspace_shape=(64, 40))
    relisted = {v.fname.name: v.num_slices for v in list_volumes(split, cache)}
    assert relisted == {"file_train0.h5": 7, "file_train1.h5": 4, "file_train2.h5": 5}


def test_corrupt_cache_is_rebuilt(fastmri_root, tmp_path):
    split, cache = fastmri_root / "singlecoil_val", tmp_path / "cache"
    expected = list_volumes(split, cache)
    (cache_file,) = cache.iterdir()
    cache_file.write_text("{not json")
    assert list_volumes(split, cache) == expected


def test_bad_rates_and_missing_root(fastmri_root, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        SliceDataset(fastmri_root / "singlecoil_val", sample_rate=0.5, volume_sample_rate=0.5, cache_dir="")
    with pytest.raises(ValueError, match="sample_rate must be in"):
        SliceDataset(fastmri_root / "singlecoil_val", sample_rate=1.5, cache_dir="")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SliceDataset(tmp_path / "nowhere", cache_dir="")
