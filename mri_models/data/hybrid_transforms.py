"""k-space to network input up to float32 rounding, faster than fastMRI's operation-for-operation path.

``unet_sample_fast`` and the "hybrid" functions compute the example of
:func:`mri_models.data.transforms.unet_sample` within 1e-5 of the largest value (not bit for bit) for a
fraction of its CPU time (``benchmarks/README.md``, Data pipeline). The centred orthonormal 2-D inverse
FFT factorises into 1-D inverse FFTs along the readout axis (rows) and the phase-encoding axis (cols). The
column mask scales whole columns and the centre crop drops whole rows, so both commute with the readout
IFFT: it is done on the rows the crop keeps only ("hybrid" k-space, (crop_rows, cols) complex), and only
for the sampled columns when the mask is known. What remains per example (mask, a 1-D IFFT along the
columns, column crop, magnitude, normalisation) is also available batched in torch on any device
(``masked_hybrid_to_images``), for a design that ships hybrid k-space and masks to the trainer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.fft
import torch

from mri_models.data.subsample import MaskFunc, Seed
from mri_models.data.transforms import (
    CLAMP,
    NORMALISATION_EPS,
    SliceInputs,
    UnetSample,
    center_crop,
    crop_bounds,
    unet_crop_size,
)


def _unshifted_positions(n: int, start: int, length: int) -> np.ndarray:
    """Where entries ``start .. start + length`` of ``fftshift(y)`` sit in ``y`` (length ``n``)."""
    # np.fft.fftshift rolls by n // 2: fftshift(y)[j] = y[(j - n // 2) mod n].
    return (np.arange(start, start + length) - n // 2) % n


def _shifted_runs(n: int, start: int, length: int) -> list[tuple[slice, slice]]:
    """``_unshifted_positions`` as at most two contiguous (source, destination) runs: slices, not gathers."""
    first = (start - n // 2) % n
    if first + length <= n:
        return [(slice(first, first + length), slice(0, length))]
    split = n - first
    return [(slice(first, n), slice(0, split)), (slice(0, length - split), slice(split, length))]


@functools.lru_cache(maxsize=64)
def _shift_phase(n: int) -> np.ndarray:
    """``exp(-2 pi i k (n // 2) / n)`` for k < n (complex64): the ifftshift of a length-n IFFT's input.

    ``ifft(ifftshift(x))[k] = phase[k] * ifft(x)[k]`` and ``fftshift(ifft(x)) = ifft(x * phase)`` (exactly,
    up to rounding). For even ``n`` the phase is exactly +-1.
    """
    exponent = (np.arange(n, dtype=np.int64) * (n // 2)) % n
    if n % 2 == 0:
        phase = np.where(exponent == 0, 1.0, -1.0)  # exact: no cos/sin rounding
    else:
        phase = np.exp(-2j * np.pi * exponent / n)
    phase = phase.astype(np.complex64)
    phase.flags.writeable = False  # shared by every caller through the cache
    return phase


@functools.lru_cache(maxsize=64)
def _shift_phase_tensor(n: int) -> torch.Tensor:
    """``_shift_phase`` as a CPU tensor (a copy: torch tensors cannot share read-only arrays)."""
    return torch.from_numpy(_shift_phase(n).copy())


def _readout_rows(kspace: np.ndarray, crop_rows: int, columns: np.ndarray | None) -> np.ndarray:
    """The centred readout IFFT of the given columns (all when None), on the cropped rows only."""
    rows, cols = kspace.shape[-2:]
    top = crop_bounds((rows, cols), (crop_rows, cols))[0].start
    data = np.asarray(kspace, dtype=np.complex64)
    if columns is not None:
        data = np.take(data, columns, axis=-1)
    # No ifftshift copy of the input: the unshifted IFFT times a per-row phase is the same transform, and
    # the output fftshift + row crop is one gather of the rows kept.
    spectrum = scipy.fft.ifft(data, axis=-2, norm="ortho", workers=1, overwrite_x=data is not kspace)
    kept = _unshifted_positions(rows, top, crop_rows)
    return np.take(spectrum, kept, axis=-2) * _shift_phase(rows)[kept, None]


def readout_ifft(kspace: np.ndarray, crop_rows: int, columns: np.ndarray | None = None) -> np.ndarray:
    """The mask-independent half of fastMRI's ``ifft2c``: hybrid k-space of the rows the centre crop keeps.

    Equals ``fftshift(ifft(ifftshift(kspace, axis=-2), axis=-2, norm="ortho"), axis=-2)`` cropped to rows
    ``crop_bounds`` keeps, in complex64. ``ifft2c`` followed by the crop is then this, followed by the
    same centred orthonormal 1-D IFFT along the columns and the column crop.

    Args:
        kspace: (..., rows, cols) complex k-space (cast to complex64).
        crop_rows: rows of the centre crop (the image height).
        columns: only transform these column indices, leaving the others zero: for a 0/1 column mask whose
            ones are ``columns``, the result equals the hybrid of the masked k-space, for about a quarter of
            the FFT work at 4x acceleration. None transforms every column.

    Returns:
        (..., crop_rows, cols) complex64 hybrid k-space.

    Raises:
        ValueError: ``crop_rows`` is not in ``1 .. rows``.
    """
    if columns is None:
        return _readout_rows(kspace, crop_rows, None)
    columns = np.asarray(columns, dtype=np.int64)
    hybrid = np.zeros((*kspace.shape[:-2], crop_rows, kspace.shape[-1]), dtype=np.complex64)
    hybrid[..., columns] = _readout_rows(kspace, crop_rows, columns)
    return hybrid


def draw_column_mask(mask_func: MaskFunc | None, num_cols: int, seed: Seed = None) -> np.ndarray:
    """The (num_cols,) float32 column mask ``apply_mask`` would draw (all ones without a mask function).

    Args:
        mask_func: under-sampling mask function, or None for fully sampled k-space.
        num_cols: number of k-space columns.
        seed: per-call seed, as given to ``apply_mask`` (equispaced patterns draw their offset, as there).
    """
    if mask_func is None:
        return np.ones(num_cols, dtype=np.float32)
    if isinstance(mask_func, MaskFunc):
        return mask_func.column_mask(num_cols, None, seed)[0]
    # Any other callable with fastMRI's convention (fastMRI's own mask functions, for instance).
    mask, _ = mask_func((1, num_cols, 2), None, seed)
    return np.asarray(mask, dtype=np.float32).reshape(num_cols)


def _masked_hybrid(kspace: np.ndarray, mask: np.ndarray, crop_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The readout IFFT of the sampled columns only, and those column indices.

    Unsampled columns are skipped, not multiplied by zero: the result differs from fastMRI's
    ``data * mask + 0.0`` only for non-finite k-space there, which the data validation rejects.
    """
    columns = np.flatnonzero(mask)
    rows_part = _readout_rows(kspace, crop_rows, columns)
    weights = mask[columns]
    if not np.all(weights == 1):  # a non-binary mask scales its columns (exact no-op for 0/1 masks)
        rows_part *= weights
    return rows_part, columns


def unet_sample_fast(inputs: SliceInputs, *, out: tuple[np.ndarray, np.ndarray] | None = None) -> UnetSample:
    """``unet_sample`` through hybrid k-space: the same example within float32 rounding, for less CPU.

    The mask is exactly ``unet_sample``'s (same mask function call and seed, so the same draws and the same
    stream afterwards). Only the sampled columns go through the readout IFFT, on the cropped rows only; the
    column IFFT runs on an ifftshift-ordered array so that no shift copies are needed. Inputs, targets,
    means and stds agree with fastMRI's ``UnetDataTransform`` within 1e-5 of their largest magnitude
    (``tests/test_fast_transform.py``); k-space is computed in complex64 and outputs are float32.

    Args:
        inputs: the slice, its file's attributes and its mask (none: the k-space as it is).
        out: float32 arrays of the crop size that the image and target are written into (rows of a read
            task's batch, so nothing is stacked afterwards); the sample's tensors then share their memory.
            None allocates new ones.
    """
    kspace = inputs.kspace
    if kspace.ndim != 2:
        raise ValueError(f"expected one (rows, cols) k-space slice, got shape {kspace.shape}")
    crop_size = unet_crop_size(kspace.shape[-1], inputs.target, inputs.attrs)
    mask = draw_column_mask(inputs.mask_func, kspace.shape[-1], inputs.mask_seed)
    image, target_out = (np.empty(crop_size, dtype=np.float32), None) if out is None else out
    _zero_filled_magnitude(kspace, mask, crop_size, out=image)
    mean, std = _normalise_in_place(image)
    return UnetSample(
        torch.from_numpy(image),
        _normalised_target(inputs.target, crop_size, mean, std, out=target_out),
        torch.from_numpy(np.asarray(mean)),
        torch.from_numpy(np.asarray(std)),
        inputs.fname,
        inputs.slice_num,
        inputs.max_value,
    )


def _zero_filled_magnitude(
    kspace: np.ndarray, mask: np.ndarray, crop_size: tuple[int, int], *, out: np.ndarray
) -> None:
    """The magnitude of the masked slice's centred 2-D inverse FFT, centre-cropped, written into ``out``."""
    rows, cols = kspace.shape
    col_crop = crop_bounds((rows, cols), crop_size)[1]
    rows_part, columns = _masked_hybrid(kspace, mask, crop_size[0])
    # Scatter the sampled columns straight to their ifftshift positions (column m goes to (m - cols // 2)
    # mod cols), so the column IFFT needs no shift copy; the fftshift + crop after it is two slices.
    shifted = np.zeros((crop_size[0], cols), dtype=np.complex64)
    shifted[:, (columns - cols // 2) % cols] = rows_part
    spectrum = scipy.fft.ifft(shifted, axis=-1, norm="ortho", workers=1, overwrite_x=True)
    for source, dest in _shifted_runs(cols, col_crop.start, crop_size[1]):
        np.abs(spectrum[:, source], out=out[:, dest])


def _normalise_in_place(image: np.ndarray) -> tuple[np.float32, np.float32]:
    """Instance normalisation of a float32 image in place, clamped; returns its mean and unbiased std."""
    mean = image.mean(dtype=np.float32)
    std = image.std(ddof=1, dtype=np.float32)  # unbiased, as torch.std
    np.subtract(image, mean, out=image)
    np.divide(image, std + np.float32(NORMALISATION_EPS), out=image)
    np.clip(image, -CLAMP, CLAMP, out=image)
    return mean, std


def _normalised_target(
    target: np.ndarray | None,
    crop_size: tuple[int, int],
    mean: np.float32,
    std: np.float32,
    *,
    out: np.ndarray | None,
) -> torch.Tensor:
    """The target centre-cropped and normalised with its image's mean and std (into ``out`` when given),
    clamped; ``tensor([0])`` without a target, as fastMRI."""
    if target is None:
        return torch.Tensor([0])
    cropped = np.asarray(target)[crop_bounds(target.shape[-2:], crop_size)]
    normalised = np.divide(cropped - mean, std + np.float32(NORMALISATION_EPS), out=out)
    return torch.from_numpy(np.clip(normalised, -CLAMP, CLAMP, out=normalised))


class HybridSample(NamedTuple):
    """What a read task ships when the mask, column IFFT and normalisation run on the trainer.

    Args:
        hybrid: (crop_rows, cols, 2) float32 real and imaginary parts of the hybrid k-space (Arrow and so
            Ray Data have no complex type; ``torch.view_as_complex`` turns it back without a copy), or
            (crop_rows, K, 2) of only the mask's K non-zero columns (``compact``).
        mask: (cols,) float32 column mask, exactly fastMRI's for the slice's seed.
        target: the raw (h, w) target, or None (test data).
        crop_size: (rows, cols) of the network image (``unet_crop_size``; ``crop_rows`` is its first entry).
        max_value: the volume's ``max`` attribute (0.0 when absent).
        fname: file name of the volume (no directory).
        slice_num: slice index in the volume.
    """

    hybrid: np.ndarray
    mask: np.ndarray
    target: np.ndarray | None
    crop_size: tuple[int, int]
    max_value: float
    fname: str
    slice_num: int


# The column layouts ``hybrid_sample`` can ship.
HYBRID_COLUMNS = ("compact", "sampled", "all")


def hybrid_sample(inputs: SliceInputs, *, columns: str = "compact") -> HybridSample:
    """The read-task half of the hybrid design: mask draw and readout IFFT (``unet_sample``'s inputs).

    ``masked_hybrid_to_images`` on the trainer turns a batch of these into ``unet_sample_fast``'s examples.

    Args:
        inputs: the slice, its file's attributes and its mask (none: fully sampled, an all-ones mask).
        columns: which columns the hybrid holds (``HYBRID_COLUMNS``). ``compact`` (what read tasks ship):
            only the mask's K non-zero columns in order, ``(crop_rows, K, 2)``, a third of the full width's
            bytes at 4x acceleration; ``hybrid_batch_to_images`` scatters them back on the trainer's device.
            ``sampled``: the full width with zeros in the unsampled columns (which the trainer's mask
            multiplication gives anyway). ``all``: the complete mask-independent hybrid (to cache it across
            epochs), about 3x the readout work of the other two at 4x acceleration.

    Raises:
        ValueError: the k-space is not one 2-D slice, or ``columns`` is not one of ``HYBRID_COLUMNS``.
    """
    if columns not in HYBRID_COLUMNS:
        raise ValueError(f"columns must be one of {', '.join(HYBRID_COLUMNS)}, got {columns!r}")
    kspace = inputs.kspace
    if kspace.ndim != 2:
        raise ValueError(f"expected one (rows, cols) k-space slice, got shape {kspace.shape}")
    cols = kspace.shape[-1]
    crop_size = unet_crop_size(cols, inputs.target, inputs.attrs)
    mask = draw_column_mask(inputs.mask_func, cols, inputs.mask_seed)
    if columns == "compact":
        hybrid = _readout_rows(kspace, crop_size[0], np.flatnonzero(mask))
    else:
        hybrid = readout_ifft(kspace, crop_size[0], np.flatnonzero(mask) if columns == "sampled" else None)
    parts = hybrid.view(np.float32).reshape(*hybrid.shape, 2)  # (re, im) interleaved: no copy
    target, fname, slice_num = inputs.target, inputs.fname, inputs.slice_num
    return HybridSample(parts, mask, target, crop_size, inputs.max_value, fname, slice_num)


class HybridImages(NamedTuple):
    """A batch of network examples computed from hybrid k-space.

    Args:
        image: (N, h, w) normalised zero-filled magnitude images.
        target: (N, h, w) targets normalised with their image's mean and std, or None without targets.
        mean: (N,) means of the un-normalised images.
        std: (N,) unbiased stds of the un-normalised images.
    """

    image: torch.Tensor
    target: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor


def masked_hybrid_to_images(
    hybrid: torch.Tensor,
    masks: torch.Tensor,
    crop_size: Sequence[int],
    targets: torch.Tensor | None = None,
) -> HybridImages:
    """The trainer half of the hybrid design, batched, in torch on the device of ``hybrid``.

    Equals ``unet_sample_fast`` per slice within 1e-5 of the largest magnitude. Every slice of the batch
    must have the same shape (``hybrid_batch_to_images`` groups mixed widths).

    Args:
        hybrid: (N, crop_rows, cols) complex64 hybrid k-space (``readout_ifft``), or its (N, crop_rows,
            cols, 2) float32 real and imaginary parts (``HybridSample.hybrid`` stacked).
        masks: (N, cols) float32 column masks (moved to ``hybrid``'s device).
        crop_size: (h, w) of the images; ``h`` must equal ``crop_rows``.
        targets: (N, th, tw) raw targets (centre-cropped to ``crop_size`` here), or None.

    Returns:
        Images, normalised targets (None without targets), means and stds, on ``hybrid``'s device.

    Raises:
        ValueError: mismatched shapes, or a crop larger than the hybrid.
    """
    if not hybrid.is_complex():
        if hybrid.shape[-1] != 2:
            raise ValueError(f"expected complex hybrid k-space or a trailing (re, im) axis: {hybrid.shape}")
        hybrid = torch.view_as_complex(hybrid.float().contiguous())
    if hybrid.ndim != 3 or masks.shape != (hybrid.shape[0], hybrid.shape[-1]):
        raise ValueError(
            f"expected hybrid (N, rows, cols) and masks (N, cols), got {tuple(hybrid.shape)} and "
            f"{tuple(masks.shape)}"
        )
    crop_rows, cols = hybrid.shape[-2:]
    if crop_size[0] != crop_rows:
        raise ValueError(f"crop_size {tuple(crop_size)} must keep the hybrid's {crop_rows} rows")
    col_crop = crop_bounds((crop_rows, cols), crop_size)[1]
    # Mask and the column ifftshift in one multiplication: fftshift(ifft(ifftshift(x))) = ifft(x * phase)
    # up to a unit factor per output column, which the magnitude drops; the fftshift is then a plain crop.
    phase = _shift_phase_tensor(cols).to(hybrid.device)
    weights = masks.to(device=hybrid.device, dtype=torch.float32) * phase
    spectrum = torch.fft.ifft(hybrid * weights[:, None, :], dim=-1, norm="ortho")[..., col_crop]
    real, imag = spectrum.real, spectrum.imag
    # fastMRI's magnitude formula: torch.abs of complex is slower on CPU (benchmarks/README.md, Measured
    # without a script).
    image = torch.addcmul(real * real, imag, imag).sqrt_()
    mean = image.mean(dim=(-2, -1), keepdim=True)
    centred = image - mean
    # The unbiased std in two passes: torch.std's one-pass kernel is slower on CPU (benchmarks/README.md,
    # Measured without a script), for the same value within float32 rounding.
    std = ((centred * centred).sum(dim=(-2, -1), keepdim=True) / (image[0].numel() - 1)).sqrt_()
    denominator = std + NORMALISATION_EPS
    image = (centred / denominator).clamp_(-CLAMP, CLAMP)
    target = None
    if targets is not None:
        target = center_crop(targets.to(hybrid.device), crop_size)
        target = ((target - mean) / denominator).clamp_(-CLAMP, CLAMP)
    return HybridImages(image, target, mean.reshape(-1), std.reshape(-1))


def hybrid_batch_to_images(
    hybrids: Sequence[np.ndarray | torch.Tensor] | np.ndarray,
    masks: Sequence[np.ndarray | torch.Tensor] | np.ndarray,
    crop_sizes: Sequence[Sequence[int]] | np.ndarray,
    targets: Sequence[np.ndarray | torch.Tensor] | np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> HybridImages:
    """``masked_hybrid_to_images`` over a batch of ``HybridSample`` columns whose widths may differ.

    fastMRI knee volumes differ in k-space width (368, 372, ...), so a batch of hybrids can be ragged (Ray
    Data then hands an object array of per-row arrays). Rows are grouped by k-space width, each group
    is transformed in one batched call, and the results are put back in the batch's order. Compact rows
    (only the mask's sampled columns) are scattered back to their columns on ``device`` first.

    Args:
        hybrids: per-slice (crop_rows, cols, 2) float32 or (crop_rows, cols) complex hybrids, or a stacked
            array of them; or compact (crop_rows, K, 2) float32 rows of the mask's K non-zero columns.
        masks: per-slice (cols,) column masks.
        crop_sizes: per-slice (h, w) crop sizes; all must be equal (the images are stacked).
        targets: per-slice raw targets, or None.
        device: where to compute (default: the CPU).

    Returns:
        The batch's images, normalised targets (or None), means and stds, on ``device``.

    Raises:
        ValueError: the crop sizes differ within the batch, the lengths do not match, or a hybrid is
            neither full width nor its mask's sampled columns.
    """
    crop_size = _batch_crop_size(hybrids, masks, crop_sizes, targets)
    device = torch.device(device or "cpu")
    parts = []
    for where in _rows_by_width(masks):
        out = masked_hybrid_to_images(
            _full_width(hybrids, masks, where, device),
            _stacked(masks, where, device),
            crop_size,
            None if targets is None else _stacked(targets, where, device),
        )
        parts.append((where, out))
    return parts[0][1] if len(parts) == 1 else _in_batch_order(parts, device)


def _batch_crop_size(
    hybrids: Sequence[Any], masks: Sequence[Any], crop_sizes: Sequence[Any], targets: Sequence[Any] | None
) -> tuple[int, ...]:
    """The batch's one crop size, once every column is checked to have one entry per slice."""
    count = len(hybrids)
    if not (len(masks) == len(crop_sizes) == count and (targets is None or len(targets) == count)):
        raise ValueError("hybrids, masks, crop_sizes and targets must have one entry per slice")
    sizes = {tuple(int(v) for v in size) for size in crop_sizes}
    if len(sizes) != 1:
        raise ValueError(f"the slices of a batch must share one crop size, got {sorted(sizes)}")
    (crop_size,) = sizes
    return crop_size


def _rows_by_width(masks: Sequence[Any]) -> list[list[int]]:
    """The batch's row indices grouped by k-space width (their mask's length), in order of first rows."""
    groups: dict[int, list[int]] = {}
    for i in range(len(masks)):
        groups.setdefault(int(np.shape(masks[i])[-1]), []).append(i)
    return list(groups.values())


def _stacked(items: Sequence[Any], where: list[int], device: torch.device) -> torch.Tensor:
    """Rows ``where`` of one batch column as one tensor on ``device``."""
    if all(isinstance(items[i], torch.Tensor) for i in where):
        return torch.stack([items[i] for i in where]).to(device)
    # np.stack copies into one new, writable array (Ray hands out read-only ones), which torch shares.
    return torch.from_numpy(np.stack([np.asarray(items[i]) for i in where])).to(device)


def _full_width(
    hybrids: Sequence[Any], masks: Sequence[Any], where: list[int], device: torch.device
) -> torch.Tensor:
    """Rows ``where`` (of one k-space width) as full-width hybrids: compact rows, only their mask's sampled
    columns, are scattered back to those columns (zeros elsewhere) on ``device``."""
    cols = int(np.shape(masks[where[0]])[-1])
    widths = [np.shape(hybrids[i])[-2] if np.ndim(hybrids[i]) == 3 else cols for i in where]
    if all(width == cols for width in widths):
        return _stacked(hybrids, where, device)
    sampled = np.stack([np.asarray(masks[i]) != 0 for i in where])  # (n, cols)
    if widths != sampled.sum(axis=1).tolist():
        raise ValueError(
            f"hybrid widths {widths} are neither the k-space's {cols} columns nor the masks' sampled ones"
        )
    # Every row's sampled columns as (K, crop_rows, 2), concatenated in row order: the order in which a
    # boolean index over (n, cols) visits them. One copy, which Ray's read-only arrays need anyway.
    values = np.concatenate([np.asarray(hybrids[i]).transpose(1, 0, 2) for i in where])
    full = torch.zeros((len(where), values.shape[1], cols, 2), dtype=torch.float32, device=device)
    full.permute(0, 2, 1, 3)[torch.from_numpy(sampled).to(device)] = torch.from_numpy(values).to(device)
    return full


def _in_batch_order(parts: list[tuple[list[int], HybridImages]], device: torch.device) -> HybridImages:
    """The images of every width group, put back in the batch's row order."""
    order = torch.as_tensor(np.argsort(np.concatenate([where for where, _ in parts])), device=device)
    return HybridImages(
        *(
            None if field[0] is None else torch.cat(field)[order]
            for field in zip(*(out for _, out in parts), strict=True)
        )
    )
