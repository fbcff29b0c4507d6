"""Reconstructing whole volumes with a trained network, and fastMRI's submission files.

One volume at a time: its k-space under-sampled by a :class:`MaskSetting` (fastMRI's fixed per-volume
mask, seeded by the file name as validation and the final evaluation seed it, or the file's own sampling
as acquired), turned into network inputs with the training configuration's transform, passed through the
network and un-normalised (``output * std + mean``), as fastMRI evaluates. The output file is what
``fastmri.utils.save_reconstructions`` writes and ``fastmri.evaluate`` reads: ``<file name>.h5`` with a
``reconstruction`` dataset, float32 (slices, H, W), plus attributes saying which model and mask made it.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch import nn

from mri_models.data import store
from mri_models.data.cache import FileCache
from mri_models.data.hybrid_transforms import unet_sample_fast
from mri_models.data.subsample import MaskFunc, create_mask_func
from mri_models.data.transforms import SliceChunk, unet_crop_size, unet_sample, volume_mask_seed
from mri_models.data.validate import MASK_KEY
from mri_models.data.volume import KSPACE_KEY, TARGET_KEY, parse_ismrmrd_header, read_header_xml
from mri_models.metrics import VolumeMetricAccumulator

RECONSTRUCTION_KEY = "reconstruction"  # fastMRI's submission format
# fastMRI's pairs of acceleration and centre fraction (its knee challenge and evaluation).
FASTMRI_CENTER_FRACTIONS = {4: 0.08, 8: 0.04}


class NetworkInputs(NamedTuple):
    """Network-ready rows of some slices of one file: float32 arrays, the target None without one."""

    image: np.ndarray  # (n, h, w) normalised zero-filled magnitude
    target: np.ndarray | None  # (n, h, w) normalised target
    mean: np.ndarray  # (n,)
    std: np.ndarray  # (n,)


def network_inputs(chunk: SliceChunk, transform: str) -> NetworkInputs:
    """The network rows of some slices of one file.

    Args:
        chunk: the slices, their file's attributes and their masks (no mask function: the k-space as it
            is, fully sampled or under-sampled as acquired).
        transform: ``exact`` (fastMRI's own operations, bit-equal) or ``fast`` (within float32 rounding).
    """
    target = chunk.target
    crop_size = unet_crop_size(chunk.kspace.shape[-1], None if target is None else target[0], chunk.attrs)
    images = np.empty((len(chunk), *crop_size), dtype=np.float32)
    targets = None if target is None else np.empty_like(images)
    means, stds = np.empty(len(chunk), dtype=np.float32), np.empty(len(chunk), dtype=np.float32)
    scratch = np.empty_like(images[0])
    for k in range(len(chunk)):
        inputs = chunk.slice_inputs(k)
        if transform == "exact":
            sample = unet_sample(inputs)
            images[k] = sample.image.numpy()
            if targets is not None:
                targets[k] = sample.target.numpy()
        else:
            out = (images[k], targets[k] if targets is not None else scratch)
            sample = unet_sample_fast(inputs, out=out)
        means[k], stds[k] = float(sample.mean), float(sample.std)
    return NetworkInputs(images, targets, means, stds)


@dataclass(frozen=True)
class MaskSetting:
    """How a volume's k-space is under-sampled before reconstruction.

    Attributes:
        mask_type: fastMRI's mask function name (``random``, ``equispaced``...), ignored as acquired.
        acceleration: The acceleration of the fixed per-volume mask; None: the k-space as acquired
            (already under-sampled; the file carries its ``mask``, like fastMRI's test files).
        center_fraction: The fully sampled centre's fraction of the columns.
    """

    mask_type: str = "random"
    acceleration: int | None = None
    center_fraction: float | None = None

    @property
    def as_acquired(self) -> bool:
        return self.acceleration is None

    def mask_func(self) -> MaskFunc | None:
        if self.as_acquired:
            return None
        return create_mask_func(self.mask_type, [self.center_fraction], [self.acceleration])

    def label(self) -> str:
        """``4x / 0.08 (random)`` or ``as acquired``: what output files record and logs print."""
        if self.as_acquired:
            return "as acquired"
        return f"{self.acceleration}x / {self.center_fraction:g} ({self.mask_type})"


@dataclass(frozen=True)
class Volume:
    """One input file, read whole: k-space, target (None in test files), attributes with the header's
    fields, and the stored sampling mask of an under-sampled file (None otherwise)."""

    uri: str
    kspace: np.ndarray
    target: np.ndarray | None
    attrs: dict[str, Any]
    mask: np.ndarray | None

    @property
    def fname(self) -> str:
        return posixpath.basename(self.uri)


def read_volume(uri: str, cache: FileCache | None = None) -> Volume:
    """Read one fastMRI single-coil file (a local path or a URI; through the node's ``cache`` of remote
    files when given)."""
    with store.open_hdf5(uri, cache) as hf:
        attrs = dict(hf.attrs)
        attrs.update(parse_ismrmrd_header(read_header_xml(hf)).as_dict())
        return Volume(
            uri,
            hf[KSPACE_KEY][()],
            hf[TARGET_KEY][()] if TARGET_KEY in hf else None,
            attrs,
            hf[MASK_KEY][()] if MASK_KEY in hf else None,
        )


def setting_problem(uri: str, has_mask: bool, setting: MaskSetting) -> str | None:
    """Why ``setting`` does not apply to a file (None when it does), for a one-line error."""
    if setting.as_acquired and not has_mask:
        return (f"{uri}: has no '{MASK_KEY}', so its k-space is not under-sampled as acquired; give "
                "--acceleration (and --center-fraction) to under-sample it with the fixed mask")  # fmt: skip
    if not setting.as_acquired and has_mask:
        return (f"{uri}: carries a '{MASK_KEY}' (its k-space is under-sampled already); "
                "reconstruct it --as-acquired")  # fmt: skip
    return None


def _volume_chunk(volume: Volume, setting: MaskSetting) -> SliceChunk:
    """Every slice of the volume under the setting's mask, fastMRI's fixed one per volume (the file name
    seeds it, as validation and the final evaluation seed it)."""
    indices = list(range(volume.kspace.shape[0]))
    seeds = [volume_mask_seed(volume.fname)] * len(indices)
    mask_func = setting.mask_func()
    return SliceChunk(volume.kspace, volume.target, volume.attrs, volume.fname, indices, mask_func, seeds)


@torch.no_grad()
def reconstruct_volume(
    network: nn.Module,
    volume: Volume,
    setting: MaskSetting,
    transform: str = "fast",
    device: torch.device | str = "cpu",
    batch_size: int = 1,
) -> np.ndarray:
    """The network's un-normalised reconstruction of every slice, float32 (slices, h, w).

    With ``batch_size`` 1 the images are exactly those of the platform's final evaluation for the same
    network, file and setting; larger batches change them by float32 rounding (convolutions sum in another
    order), for throughput on GPUs.

    Args:
        network: The trained network, in evaluation mode, on ``device``.
        volume: The file (:func:`read_volume`).
        setting: Its under-sampling.
        transform: The training configuration's transform (``fast`` or ``exact``).
        device: Where the network is.
        batch_size: Slices per forward pass.
    """
    inputs = network_inputs(_volume_chunk(volume, setting), transform)
    count = len(inputs.image)
    out = np.empty_like(inputs.image)
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        image = torch.as_tensor(inputs.image[start:stop], device=device)[:, None]
        output = network(image)[:, 0].cpu().numpy()
        for k in range(start, stop):
            out[k] = output[k - start] * float(inputs.std[k]) + float(inputs.mean[k])
    return out


def zero_filled_volume(volume: Volume, setting: MaskSetting, transform: str = "fast") -> np.ndarray:
    """The network's input, un-normalised: the zero-filled baseline's reconstruction of the volume."""
    inputs = network_inputs(_volume_chunk(volume, setting), transform)
    slices = range(len(inputs.image))
    return np.stack([inputs.image[k] * float(inputs.std[k]) + float(inputs.mean[k]) for k in slices])


def crop_to_target(volume: Volume) -> np.ndarray | None:
    """The volume's target centre-cropped to the reconstruction's size (None without a target)."""
    if volume.target is None:
        return None
    rows, cols = unet_crop_size(volume.kspace.shape[-1], volume.target[0], volume.attrs)
    top, left = (volume.target.shape[-2] - rows) // 2, (volume.target.shape[-1] - cols) // 2
    return volume.target[:, top : top + rows, left : left + cols]


# ----------------------------------------------------------------------------------------- submission files


def submission_bytes(reconstruction: np.ndarray, attrs: Mapping[str, Any]) -> bytes:
    """An HDF5 file in fastMRI's submission format, as bytes (written atomically by the caller)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as hf:
        hf.create_dataset(RECONSTRUCTION_KEY, data=np.asarray(reconstruction, dtype=np.float32))
        for key, value in attrs.items():
            hf.attrs[key] = value
    return buffer.getvalue()


def submission_attrs(uri: str) -> dict[str, Any] | None:
    """The attributes of an existing output file (None when it is missing or not a complete one)."""
    try:
        with store.open_hdf5(uri) as hf:
            if RECONSTRUCTION_KEY not in hf:
                return None
            attrs = hf.attrs.items()
            return {key: (value.decode() if isinstance(value, bytes) else value) for key, value in attrs}
    except (OSError, FileNotFoundError):
        return None


def volume_metrics(volume: Volume, reconstruction: np.ndarray) -> dict[str, float] | None:
    """Every metric of :func:`mri_models.metrics.metric_table` of one reconstruction against the file's
    own target (None without one), as ``fastmri.evaluate`` computes them: the target as stored, not the
    training transform's clamped one, and the volume's ``max`` as the data range."""
    target = crop_to_target(volume)
    if target is None:
        return None
    accumulator = VolumeMetricAccumulator()
    n = len(target)
    max_value = float(volume.attrs.get("max", target.max()))
    names, numbers = [volume.fname] * n, list(range(n))
    accumulator.add_slices(names, numbers, list(reconstruction), list(target), [max_value] * n)
    return accumulator.per_volume()[volume.fname]
