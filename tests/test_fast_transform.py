"""The hybrid k-space transforms of ``mri_models/data/hybrid_transforms.py`` (``unet_sample_fast``,
``readout_ifft``, the batched trainer-side function) against the ``fastmri`` package itself and against each
other.

They are not bit-for-bit (that is ``unet_sample``'s job, tested in ``test_data_parity.py``): the 2-D inverse
FFT is done as two 1-D FFTs, unsampled columns are skipped rather than multiplied by zero, the magnitude and
the mean/std are computed by other (equally accurate) float32 routines. So every comparison allows 1e-5
relative to the largest magnitude of the reference array (``_assert_close``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from fastmri.data import subsample as ref_subsample
from fastmri.data import transforms as ref_transforms

from mri_models.data import subsample
from mri_models.data.hybrid_transforms import (
    HybridSample,
    draw_column_mask,
    hybrid_batch_to_images,
    hybrid_sample,
    masked_hybrid_to_images,
    readout_ifft,
    unet_sample_fast,
)
from mri_models.data.transforms import SliceInputs, volume_mask_seed
from tests.conftest import centre_crop, centred_ifft2

MASK_PAIRS = {
    "random": (subsample.RandomMaskFunc, ref_subsample.RandomMaskFunc),
    "equispaced": (subsample.EquiSpacedMaskFunc, ref_subsample.EquiSpacedMaskFunc),
}
RECON = (320, 320)
# (rows, cols): fastMRI's knee size, odd rows and columns, a prime width, and a k-space narrower than the
# recon size, which takes fastMRI's guard (crop to cols x cols).
SIZES = [(640, 368), (641, 369), (640, 371), (641, 300)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal within 1e-5 relative to the largest magnitude of ``expected``.

    Both sides are float32 computations of the same quantity in different operation orders, so they differ
    by rounding: about 1e-7 of the array's largest value (measured: at most 4e-7), wherever the element
    lies. A purely element-wise relative tolerance would fail on values near zero (the normalised images
    cross zero everywhere), hence the absolute part scaled by the largest magnitude; 1e-5 leaves a
    generous margin over rounding while any real error (a shifted row, a wrong mask column, a biased std)
    is orders of magnitude larger.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@functools.cache  # the same slices serve several parametrisations; nothing mutates them
def _slice(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random complex64 k-space with fastMRI-like zero padding columns, and its fastMRI-style target."""
    rng = np.random.default_rng(seed)
    kspace = (rng.standard_normal((rows, cols)) + 1j * rng.standard_normal((rows, cols))).astype(np.complex64)
    kspace *= 1e-4
    kspace[:, : cols // 40] = 0  # real knee k-space has unacquired columns on both sides
    kspace[:, cols - cols // 50 :] = 0
    crop = RECON if cols >= RECON[1] else (cols, cols)
    target = centre_crop(np.abs(centred_ifft2(kspace)), crop).astype(np.float32)
    return kspace, target


def _assert_samples_close(ours, theirs) -> None:
    for name in ("image", "target", "mean", "std"):
        _assert_close(getattr(ours, name), getattr(theirs, name), name)
    assert (ours.fname, ours.slice_num, ours.max_value) == (theirs.fname, theirs.slice_num, theirs.max_value)


@pytest.mark.parametrize(("rows", "cols"), SIZES)
@pytest.mark.parametrize("mask_type", sorted(MASK_PAIRS))
@pytest.mark.parametrize("use_seed", [True, False], ids=["validation", "training"])
def test_fast_sample_matches_fastmri(rows, cols, mask_type, use_seed):
    ours_cls, ref_cls = MASK_PAIRS[mask_type]
    for func_seed in (0, 9):
        ours_mask = ours_cls([0.08, 0.04], [4, 8], seed=func_seed)
        ref_t = ref_transforms.UnetDataTransform(
            "singlecoil", ref_cls([0.08, 0.04], [4, 8], seed=func_seed), use_seed=use_seed
        )
        fname = f"file{rows}x{cols}_{func_seed}.h5"
        # Several slices in a row: without a seed both mask functions must advance their streams alike.
        for slice_num in range(2):
            kspace, target = _slice(rows, cols, seed=10 * func_seed + slice_num)
            attrs = {"max": float(target.max()), "recon_size": (*RECON, 1)}
            theirs = ref_t(kspace, None, target, attrs, fname, slice_num)
            seed = volume_mask_seed(fname) if use_seed else None
            ours = unet_sample_fast(SliceInputs(kspace, target, attrs, fname, slice_num, ours_mask, seed))
            _assert_samples_close(ours, theirs)


@pytest.mark.parametrize(("rows", "cols"), SIZES)
def test_fast_sample_without_mask_or_target(rows, cols):
    kspace, target = _slice(rows, cols, seed=3)
    attrs = {"recon_size": (*RECON, 1)}  # no "max": max_value 0.0
    ref_t = ref_transforms.UnetDataTransform("singlecoil")
    for tgt in (target, None):
        theirs = ref_t(kspace, None, tgt, attrs, "f.h5", 4)
        ours = unet_sample_fast(SliceInputs(kspace, tgt, attrs, "f.h5", 4))
        _assert_samples_close(ours, theirs)
    assert ours.image.shape == (min(cols, RECON[0]), min(cols, RECON[1]))
    assert torch.equal(ours.target, torch.Tensor([0]))


def test_fast_sample_leaves_the_mask_stream_as_unet_sample_does():
    ours, ref = (
        subsample.RandomMaskFunc([0.08], [4], seed=1),
        ref_subsample.RandomMaskFunc([0.08], [4], seed=1),
    )
    kspace, target = _slice(64, 40, seed=0)
    for seed in (None, (1, 2, 3), None, 17, None):
        unet_sample_fast(SliceInputs(kspace, target, {}, "f.h5", 0, ours, seed))
        ref((1, 64, 40, 2), seed=seed)
    assert torch.equal(ours((1, 64, 40, 2))[0], ref((1, 64, 40, 2))[0])


def test_writing_into_given_arrays_gives_the_same_sample():
    # Read tasks pass rows of their batch arrays as ``out`` so nothing is stacked afterwards: the values
    # must be the allocating call's exactly, in the given memory.
    kspace, target = _slice(640, 368, seed=7)
    mask_func = subsample.RandomMaskFunc([0.08], [4])
    inputs = SliceInputs(kspace, target, {"max": 1.0}, "f.h5", 3, mask_func, (1, 2))
    plain = unet_sample_fast(inputs)
    image_out, target_out = np.full((2, *RECON), np.nan, np.float32)
    written = unet_sample_fast(inputs, out=(image_out, target_out))
    assert np.shares_memory(written.image.numpy(), image_out)
    assert np.shares_memory(written.target.numpy(), target_out)
    for name in ("image", "target", "mean", "std"):
        assert torch.equal(getattr(written, name), getattr(plain, name)), name


@pytest.mark.parametrize("rows", [640, 641])
@pytest.mark.parametrize("cols", [368, 369])
def test_readout_ifft_is_the_row_half_of_ifft2c(rows, cols):
    kspace, _ = _slice(rows, cols, seed=5)
    crop_rows = 320
    top = (rows - crop_rows) // 2
    hybrid = readout_ifft(kspace, crop_rows)
    assert hybrid.shape == (crop_rows, cols) and hybrid.dtype == np.complex64
    # The definition, in complex128 (the phases matter here, not only the magnitudes).
    expected = np.fft.fftshift(
        np.fft.ifft(np.fft.ifftshift(kspace.astype(np.complex128), axes=-2), axis=-2, norm="ortho"), axes=-2
    )[top : top + crop_rows]
    _assert_close(torch.from_numpy(hybrid.astype(np.complex128)), torch.from_numpy(expected))
    # Completed by the centred column IFFT it is ifft2c followed by the crop.
    image = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(hybrid, axes=-1), axis=-1, norm="ortho"), axes=-1)
    full = centred_ifft2(kspace.astype(np.complex128))[top : top + crop_rows]
    _assert_close(torch.from_numpy(image.astype(np.complex128)), torch.from_numpy(full))
    # Only some columns: the hybrid of the column-masked k-space (here a 0/1 mask).
    columns = np.arange(1, cols, 3)
    masked = np.zeros_like(kspace)
    masked[:, columns] = kspace[:, columns]
    _assert_close(
        torch.from_numpy(readout_ifft(kspace, crop_rows, columns)),
        torch.from_numpy(readout_ifft(masked, crop_rows)),
    )
    with pytest.raises(ValueError, match="cannot centre-crop"):
        readout_ifft(kspace, rows + 1)


def test_column_masks_equal_fastmri():
    for ours_cls, ref_cls in MASK_PAIRS.values():
        ours, ref = ours_cls([0.08, 0.04], [4, 8], seed=2), ref_cls([0.08, 0.04], [4, 8], seed=2)
        ref_again = ref_cls([0.08, 0.04], [4, 8], seed=2)
        for seed in (None, (102, 105), None, 5, None):
            expected = ref((1, 640, 368, 2), seed=seed)[0].reshape(-1).numpy()
            np.testing.assert_array_equal(draw_column_mask(ours, 368, seed), expected)
            # fastMRI's own mask functions go through their call convention.
            np.testing.assert_array_equal(draw_column_mask(ref_again, 368, seed), expected)
    np.testing.assert_array_equal(draw_column_mask(None, 5), np.ones(5, dtype=np.float32))


def _hybrid_batch(
    rows: int,
    cols: int,
    count: int,
    columns: str,
    with_target: bool = True,
):
    """Slices of one shape with different masks (random and equispaced, several seeds) as the read task
    would ship them, and ``unet_sample_fast``'s examples of the same slices."""
    mask_funcs = [
        subsample.RandomMaskFunc([0.08], [4], seed=1),
        subsample.EquiSpacedMaskFunc([0.04], [8], seed=2),
        None,  # fully sampled
    ]
    shipped, expected = [], []
    for i in range(count):
        kspace, target = _slice(rows, cols, seed=i)
        target = target if with_target else None
        attrs = {"max": 1.5, "recon_size": (*RECON, 1)}
        mask_func, seed = mask_funcs[i % len(mask_funcs)], (7, i)
        inputs = SliceInputs(kspace, target, attrs, "f.h5", i, mask_func, seed)
        shipped.append(hybrid_sample(inputs, columns=columns))
        expected.append(unet_sample_fast(inputs))
    return shipped, expected


def _assert_batch_matches(out, expected, with_target: bool = True) -> None:
    for i, sample in enumerate(expected):
        _assert_close(out.image[i], sample.image, f"image {i}")
        _assert_close(out.mean[i], sample.mean, f"mean {i}")
        _assert_close(out.std[i], sample.std, f"std {i}")
        if with_target:
            _assert_close(out.target[i], sample.target, f"target {i}")
    if not with_target:
        assert out.target is None


@pytest.mark.parametrize(("rows", "cols"), SIZES)
@pytest.mark.parametrize("columns", ["sampled", "all"])
def test_batched_device_function_matches_per_slice(rows, cols, columns):
    shipped, expected = _hybrid_batch(rows, cols, 4, columns)
    first = shipped[0]
    assert isinstance(first, HybridSample)
    assert first.hybrid.dtype == np.float32 and first.hybrid.shape == (first.crop_size[0], cols, 2)
    assert first.mask.shape == (cols,) and (first.fname, first.slice_num, first.max_value) == ("f.h5", 0, 1.5)
    assert len({tuple(s.mask) for s in shipped}) == len(shipped)  # every slice has its own mask
    hybrid = torch.from_numpy(np.stack([s.hybrid for s in shipped]))
    masks = torch.from_numpy(np.stack([s.mask for s in shipped]))
    targets = torch.from_numpy(np.stack([s.target for s in shipped]))
    # As the real/imag float32 pairs the read task ships, and as complex64.
    for data in (hybrid, torch.view_as_complex(hybrid)):
        out = masked_hybrid_to_images(data, masks, first.crop_size, targets)
        assert out.image.dtype == out.mean.dtype == torch.float32 and out.mean.shape == (4,)
        _assert_batch_matches(out, expected)


def test_batched_device_function_without_targets():
    shipped, expected = _hybrid_batch(640, 368, 3, "sampled", with_target=False)
    out = hybrid_batch_to_images(
        [s.hybrid for s in shipped], [s.mask for s in shipped], [s.crop_size for s in shipped]
    )
    _assert_batch_matches(out, expected, with_target=False)


def test_ragged_batch_of_mixed_widths():
    wide, wide_expected = _hybrid_batch(640, 368, 3, "sampled")
    odd, odd_expected = _hybrid_batch(640, 371, 2, "sampled")
    order = [0, 3, 1, 4, 2]  # interleaved, as rows of different volumes arrive in one Ray Data batch
    shipped = [(wide + odd)[i] for i in order]
    expected = [(wide_expected + odd_expected)[i] for i in order]
    columns = {}  # object arrays of per-row arrays: what Ray Data's numpy batches hold for ragged tensors
    for name in ("hybrid", "mask", "target"):
        columns[name] = np.empty(len(shipped), dtype=object)
        columns[name][:] = [getattr(s, name) for s in shipped]
    out = hybrid_batch_to_images(
        columns["hybrid"], columns["mask"], [s.crop_size for s in shipped], columns["target"]
    )
    _assert_batch_matches(out, expected)
    with pytest.raises(ValueError, match="share one crop size"):
        hybrid_batch_to_images(columns["hybrid"][:2], columns["mask"][:2], [(320, 320), (300, 300)])


@pytest.mark.parametrize(("rows", "cols"), SIZES)
def test_compact_rows_are_the_sampled_columns_and_give_the_same_images(rows, cols):
    # What read tasks ship: only the mask's sampled columns, scattered back by the batch function.
    shipped, expected = _hybrid_batch(rows, cols, 4, "compact")
    full, _ = _hybrid_batch(rows, cols, 4, "sampled")
    for compact, wide in zip(shipped, full, strict=True):
        sampled = np.flatnonzero(compact.mask)
        assert compact.hybrid.shape == (compact.crop_size[0], len(sampled), 2)
        np.testing.assert_array_equal(compact.hybrid, wide.hybrid[:, sampled])
    assert len({s.hybrid.shape for s in shipped}) > 1  # random and equispaced masks: a ragged batch
    ragged = np.empty(len(shipped), dtype=object)  # as Ray Data hands variable-shaped tensors
    ragged[:] = [s.hybrid for s in shipped]
    out = hybrid_batch_to_images(
        ragged, [s.mask for s in shipped], [s.crop_size for s in shipped], [s.target for s in shipped]
    )
    _assert_batch_matches(out, expected)


def test_compact_rows_of_mixed_widths_and_a_wrong_width():
    wide, wide_expected = _hybrid_batch(640, 368, 3, "compact")
    odd, odd_expected = _hybrid_batch(640, 371, 2, "compact")
    order = [0, 3, 1, 4, 2]
    shipped = [(wide + odd)[i] for i in order]
    out = hybrid_batch_to_images(
        [s.hybrid for s in shipped], [s.mask for s in shipped], [s.crop_size for s in shipped],
        [s.target for s in shipped],
    )  # fmt: skip
    _assert_batch_matches(out, [(wide_expected + odd_expected)[i] for i in order])
    hybrids = [wide[0].hybrid[:, 1:], wide[1].hybrid]  # one row lost a column on the way
    with pytest.raises(ValueError, match="neither the k-space's 368 columns nor the masks' sampled ones"):
        hybrid_batch_to_images(hybrids, [s.mask for s in wide[:2]], [s.crop_size for s in wide[:2]])


def test_batched_rejects_mismatched_shapes():
    hybrid = torch.zeros(2, 320, 368, dtype=torch.complex64)
    with pytest.raises(ValueError, match="masks"):
        masked_hybrid_to_images(hybrid, torch.ones(2, 369), (320, 320))
    with pytest.raises(ValueError, match="keep the hybrid's 320 rows"):
        masked_hybrid_to_images(hybrid, torch.ones(2, 368), (300, 300))
    with pytest.raises(ValueError, match="trailing"):
        masked_hybrid_to_images(torch.zeros(2, 320, 368, 3), torch.ones(2, 368), (320, 320))


def test_hybrid_sample_rejects_an_unknown_column_layout():
    kspace, target = _slice(640, 368, seed=0)
    with pytest.raises(ValueError, match="columns must be one of compact, sampled, all, got 'full'"):
        hybrid_sample(SliceInputs(kspace, target, {"max": 1.0}, "f.h5", 0, None, None), columns="full")
