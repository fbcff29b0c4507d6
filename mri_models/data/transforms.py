"""k-space to network input, exactly as fastMRI's ``UnetDataTransform`` computes it.

Every step uses the same floating-point operations in the same order as ``fastmri.data.transforms`` so
that, for the same file, slice and mask seed, inputs and targets are bit-for-bit identical: complex
k-space as a real tensor with a trailing (real, imag) axis, ``data * mask + 0.0``, a centred orthonormal
inverse FFT, a centre crop to the target size, the magnitude as ``sqrt(re^2 + im^2)``, instance
normalisation with eps 1e-11 and a clamp to [-6, 6].

The same example up to float32 rounding, several times faster: :mod:`mri_models.data.hybrid_transforms`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from mri_models.data.subsample import MaskFunc, Seed

NORMALISATION_EPS = 1e-11
CLAMP = 6.0


@dataclass(frozen=True, eq=False)
class SliceInputs:
    """What the transforms of one slice take: its k-space and target, its file's attributes, its mask.

    Attributes:
        kspace: (rows, cols) complex k-space of one slice.
        target: (h, w) target of the slice, or None (test data).
        attrs: file attributes merged with header metadata (``max``; ``recon_size`` when no target).
        fname: file name (no directory).
        slice_num: slice index.
        mask_func: under-sampling mask function; None keeps the k-space as it is (fully sampled, or
            under-sampled as acquired).
        mask_seed: seed of this slice's mask (None draws from the mask function's own stream).
    """

    kspace: np.ndarray
    target: np.ndarray | None
    attrs: Mapping[str, Any]
    fname: str
    slice_num: int
    mask_func: MaskFunc | None = None
    mask_seed: Seed = None

    @property
    def max_value(self) -> float:
        """The volume's ``max`` attribute (0.0 when absent), the data range of the metrics."""
        return self.attrs.get("max", 0.0)


@dataclass(frozen=True, eq=False)
class SliceChunk:
    """Some slices of one file read together, each with its mask seed: what a read task, or the
    reconstruction of a volume, turns into network rows.

    Attributes:
        kspace: (n, rows, cols) complex k-space of the slices.
        target: (n, h, w) targets of the slices, or None (test data).
        attrs: file attributes merged with header metadata.
        fname: file name (no directory).
        slice_nums: the n slice indices in the volume.
        mask_func: under-sampling mask function; None keeps the k-space as it is.
        mask_seeds: the n slices' mask seeds.
    """

    kspace: np.ndarray
    target: np.ndarray | None
    attrs: Mapping[str, Any]
    fname: str
    slice_nums: Sequence[int]
    mask_func: MaskFunc | None
    mask_seeds: Sequence[Seed]

    def __len__(self) -> int:
        return len(self.slice_nums)

    def slice_inputs(self, k: int) -> SliceInputs:
        """The chunk's k-th slice (slice number ``slice_nums[k]`` of the volume)."""
        target = None if self.target is None else self.target[k]
        slice_num, seed = self.slice_nums[k], self.mask_seeds[k]
        return SliceInputs(self.kspace[k], target, self.attrs, self.fname, slice_num, self.mask_func, seed)


class UnetSample(NamedTuple):
    """One network example.

    Args:
        image: normalised zero-filled magnitude image (H, W).
        target: target normalised with the image's mean and std (H, W), or ``tensor([0])`` without target.
        mean: mean of the un-normalised image (scalar tensor).
        std: unbiased std of the un-normalised image (scalar tensor).
        fname: file name of the volume (no directory).
        slice_num: slice index in the volume.
        max_value: the volume's ``max`` attribute (0.0 when absent), the data range of the metrics.
    """

    image: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fname: str
    slice_num: int
    max_value: float


def to_tensor(data: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor; complex values get a trailing (real, imag) axis."""
    if np.iscomplexobj(data):
        data = np.stack((data.real, data.imag), axis=-1)
    return torch.from_numpy(data)


def ifft2c(data: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT of (..., rows, cols, 2) k-space."""
    if data.shape[-1] != 2:
        raise ValueError(f"expected a trailing complex axis of size 2, got shape {tuple(data.shape)}")
    data = torch.fft.ifftshift(data, dim=(-3, -2))
    data = torch.view_as_real(torch.fft.ifftn(torch.view_as_complex(data), dim=(-2, -1), norm="ortho"))
    return torch.fft.fftshift(data, dim=(-3, -2))


def complex_abs(data: torch.Tensor) -> torch.Tensor:
    """Magnitude of (..., 2) data as fastMRI computes it (``torch.abs`` rounds differently)."""
    if data.shape[-1] != 2:
        raise ValueError(f"expected a trailing complex axis of size 2, got shape {tuple(data.shape)}")
    return (data**2).sum(dim=-1).sqrt()


def crop_bounds(size: tuple[int, int], shape: Sequence[int]) -> tuple[slice, slice]:
    if not (0 < shape[0] <= size[0] and 0 < shape[1] <= size[1]):
        raise ValueError(f"cannot centre-crop an image of size {size} to {tuple(shape)}")
    top, left = (size[0] - shape[0]) // 2, (size[1] - shape[1]) // 2
    return slice(top, top + shape[0]), slice(left, left + shape[1])


def center_crop(data: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre crop of the last two axes of a real image."""
    rows, cols = crop_bounds((data.shape[-2], data.shape[-1]), shape)
    return data[..., rows, cols]


def complex_center_crop(data: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre crop of the two axes before the trailing complex axis."""
    rows, cols = crop_bounds((data.shape[-3], data.shape[-2]), shape)
    return data[..., rows, cols, :]


def normalize(
    data: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float, eps: float = 0.0
) -> torch.Tensor:
    """``(data - mean) / (std + eps)``."""
    return (data - mean) / (std + eps)


def normalize_instance(
    data: torch.Tensor, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise with the tensor's own mean and unbiased std; returns (normalised, mean, std)."""
    mean = data.mean()
    std = data.std()
    return normalize(data, mean, std, eps), mean, std


def apply_mask(
    data: torch.Tensor, mask_func: MaskFunc, offset: int | None = None, seed: Seed = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Under-sample (..., rows, cols, 2) k-space; returns (masked k-space, mask, num_low_frequencies)."""
    shape = (1,) * len(data.shape[:-3]) + tuple(data.shape[-3:])
    mask, num_low_frequencies = mask_func(shape, offset, seed)
    # "+ 0.0" turns the -0.0 of masked negative values into +0.0, as fastMRI does.
    return data * mask + 0.0, mask, num_low_frequencies


def volume_mask_seed(fname: str) -> tuple[int, ...]:
    """fastMRI's fixed validation seed: the code points of the file name, one mask per volume."""
    return tuple(map(ord, fname))


def unet_crop_size(num_cols: int, target: np.ndarray | None, attrs: Mapping[str, Any]) -> tuple[int, int]:
    """The (rows, cols) ``unet_sample`` crops to: the target's, else ``recon_size``, with fastMRI's guard.

    Args:
        num_cols: number of k-space (and so image) columns.
        target: (h, w) target of the slice, or None.
        attrs: file attributes merged with header metadata (``recon_size`` is used without target).
    """
    if target is not None:
        crop_size = (int(target.shape[-2]), int(target.shape[-1]))
    else:
        crop_size = (int(attrs["recon_size"][0]), int(attrs["recon_size"][1]))
    # fastMRI's guard for a few brain volumes (FLAIR 203) narrower than the recon size.
    if num_cols < crop_size[1]:
        crop_size = (num_cols, num_cols)
    return crop_size


def unet_sample(inputs: SliceInputs) -> UnetSample:
    """Turn one single-coil k-space slice into a network example with fastMRI's own operations.

    Args:
        inputs: the slice, its file's attributes and its mask (none: the k-space as it is).
    """
    kspace_torch = to_tensor(inputs.kspace)
    if inputs.mask_func is not None:
        kspace_torch = apply_mask(kspace_torch, inputs.mask_func, seed=inputs.mask_seed)[0]
    image = ifft2c(kspace_torch)
    crop_size = unet_crop_size(image.shape[-2], inputs.target, inputs.attrs)
    image = complex_abs(complex_center_crop(image, crop_size))
    image, mean, std = normalize_instance(image, eps=NORMALISATION_EPS)
    image = image.clamp(-CLAMP, CLAMP)
    if inputs.target is not None:
        target_torch = center_crop(to_tensor(inputs.target), crop_size)
        target_torch = normalize(target_torch, mean, std, eps=NORMALISATION_EPS).clamp(-CLAMP, CLAMP)
    else:
        target_torch = torch.Tensor([0])
    return UnetSample(image, target_torch, mean, std, inputs.fname, inputs.slice_num, inputs.max_value)


class UnetDataTransform:
    """fastMRI's U-Net transform: called as ``transform(kspace, mask, target, attrs, fname, slice_num)``.

    Args:
        which_challenge: ``singlecoil`` (the only challenge this project trains; ``multicoil`` is
            rejected because its root-sum-of-squares path is not implemented).
        mask_func: under-sampling mask function, or None for fully sampled input.
        use_seed: fixed mask per volume from the file name (validation) instead of a fresh random mask.
    """

    def __init__(
        self, which_challenge: str = "singlecoil", mask_func: MaskFunc | None = None, use_seed: bool = True
    ):
        if which_challenge != "singlecoil":
            raise ValueError(f"challenge {which_challenge!r} is not supported; expected 'singlecoil'")
        self.which_challenge = which_challenge
        self.mask_func = mask_func
        self.use_seed = use_seed

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: Mapping[str, Any],
        fname: str,
        slice_num: int,
    ) -> UnetSample:
        seed = volume_mask_seed(fname) if self.use_seed else None
        return unet_sample(SliceInputs(kspace, target, attrs, fname, slice_num, self.mask_func, seed))
