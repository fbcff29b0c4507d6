"""fastMRI single-coil data: the HDF5 format, the slice dataset, masks, transforms, validation, synthesis."""

from mri_models.data.slice_dataset import RawSample, SliceDataset, list_volumes
from mri_models.data.subsample import (
    EquispacedMaskFractionFunc,
    EquiSpacedMaskFunc,
    MaskFunc,
    RandomMaskFunc,
    create_mask_func,
)
from mri_models.data.transforms import SliceInputs, UnetDataTransform, UnetSample, unet_sample
from mri_models.data.volume import VolumeMetadata, parse_ismrmrd_header

__all__ = [
    "EquiSpacedMaskFunc",
    "EquispacedMaskFractionFunc",
    "MaskFunc",
    "RandomMaskFunc",
    "RawSample",
    "SliceDataset",
    "SliceInputs",
    "UnetDataTransform",
    "UnetSample",
    "VolumeMetadata",
    "create_mask_func",
    "list_volumes",
    "parse_ismrmrd_header",
    "unet_sample",
]
