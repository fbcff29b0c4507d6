"""The fastMRI single-coil HDF5 volume format: the ISMRMRD header, reading metadata, writing volumes.

A fastMRI single-coil file holds ``kspace`` (slices, H, W) complex64, the target ``reconstruction_esc``
(slices, 320, 320) float32 (absent in the test split), an ``ismrmrd_header`` XML string and the attributes
``acquisition``, ``max``, ``norm`` and ``patient_id``. fastMRI reads five header fields; this module reads
the same ones the same way, so ``padding_left``/``padding_right`` agree with ``fastmri.data.SliceDataset``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mri_models.data import store

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
KSPACE_KEY = "kspace"
TARGET_KEY = "reconstruction_esc"  # the single-coil target
HEADER_KEY = "ismrmrd_header"
REQUIRED_ATTRS = ("acquisition", "max", "norm", "patient_id")
KNEE_ACQUISITIONS = ("CORPD_FBK", "CORPDFS_FBK")

# Paths below <encoding> of the fields fastMRI reads.
_ENCODED_SIZE = ("encodedSpace", "matrixSize")
_RECON_SIZE = ("reconSpace", "matrixSize")
_PE_LIMITS = ("encodingLimits", "kspace_encoding_step_1")


class HeaderError(ValueError):
    """The ISMRMRD header is missing, unparsable or lacks a field fastMRI reads."""


@dataclass(frozen=True)
class VolumeMetadata:
    """The header fields fastMRI derives for a volume.

    Args:
        encoding_size: encoded matrix size (x, y, z); x is the (oversampled) readout.
        recon_size: reconstruction matrix size (x, y, z), (320, 320, 1) for knee.
        padding_left: first acquired phase-encoding column of k-space.
        padding_right: one past the last acquired phase-encoding column.
    """

    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    padding_left: int
    padding_right: int

    def as_dict(self) -> dict[str, Any]:
        """The metadata dict fastMRI merges into a sample's ``attrs``."""
        return {
            "padding_left": self.padding_left,
            "padding_right": self.padding_right,
            "encoding_size": self.encoding_size,
            "recon_size": self.recon_size,
        }


def _find_int(root: ET.Element, path: tuple[str, ...], field: str) -> int:
    # fastMRI's et_query searches descendants at every step (".//a//b//c"); do the same so that any
    # header fastMRI accepts gives the same values here.
    parts = ("encoding", *path, field)
    element = root.find(".//" + "//".join(f"{{{ISMRMRD_NAMESPACE}}}{part}" for part in parts))
    name = "/".join(parts)
    if element is None or element.text is None:
        raise HeaderError(f"ismrmrd_header lacks the field {name}")
    try:
        return int(element.text)
    except ValueError:
        raise HeaderError(f"ismrmrd_header field {name} is {element.text!r}, expected an integer") from None


def parse_ismrmrd_header(xml: bytes | str) -> VolumeMetadata:
    """Parse the header fields fastMRI uses, with fastMRI's lookup rules.

    Raises:
        HeaderError: naming the missing or malformed field.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise HeaderError(f"ismrmrd_header is not valid XML ({err})") from None
    if root.find(f".//{{{ISMRMRD_NAMESPACE}}}encoding") is None:
        raise HeaderError(f"ismrmrd_header has no <encoding> element in namespace {ISMRMRD_NAMESPACE}")
    enc = tuple(_find_int(root, _ENCODED_SIZE, axis) for axis in "xyz")
    rec = tuple(_find_int(root, _RECON_SIZE, axis) for axis in "xyz")
    center = _find_int(root, _PE_LIMITS, "center")
    maximum = _find_int(root, _PE_LIMITS, "maximum")
    padding_left = enc[1] // 2 - center
    return VolumeMetadata(
        encoding_size=enc,  # type: ignore[arg-type]
        recon_size=rec,  # type: ignore[arg-type]
        padding_left=padding_left,
        padding_right=padding_left + maximum + 1,
    )


def build_ismrmrd_header(
    encoding_size: tuple[int, int, int],
    recon_size: tuple[int, int, int],
    pe_center: int,
    pe_maximum: int,
    field_of_view_mm: tuple[float, float, float] = (280.0, 140.0, 4.5),
) -> str:
    """A minimal ISMRMRD header with every field fastMRI (and a scanner export) carries for Cartesian knee.

    Args:
        encoding_size: encoded matrix (x readout incl. oversampling, y phase encoding, z).
        recon_size: reconstruction matrix (x, y, z).
        pe_center: ``kspace_encoding_step_1/center``.
        pe_maximum: ``kspace_encoding_step_1/maximum`` (the last acquired line, 0-based).
        field_of_view_mm: encoded field of view; the recon FOV halves x (readout oversampling).
    """
    ex, ey, ez = encoding_size
    rx, ry, rz = recon_size
    fx, fy, fz = field_of_view_mm
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}">'
        "<experimentalConditions><H1resonanceFrequency_Hz>123251815</H1resonanceFrequency_Hz>"
        "</experimentalConditions>"
        "<encoding>"
        f"<encodedSpace><matrixSize><x>{ex}</x><y>{ey}</y><z>{ez}</z></matrixSize>"
        f"<fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>{fz}</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{rx}</x><y>{ry}</y><z>{rz}</z></matrixSize>"
        f"<fieldOfView_mm><x>{fx / 2}</x><y>{fy}</y><z>{fz}</z></fieldOfView_mm></reconSpace>"
        "<encodingLimits>"
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{pe_maximum}</maximum>"
        f"<center>{pe_center}</center></kspace_encoding_step_1>"
        "<kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center>"
        "</kspace_encoding_step_2>"
        "</encodingLimits>"
        "<trajectory>cartesian</trajectory>"
        "</encoding>"
        "</ismrmrdHeader>"
    )


def read_header_xml(hf: h5py.File) -> bytes:
    """The raw ``ismrmrd_header`` bytes of an open file (HeaderError if absent)."""
    if HEADER_KEY not in hf:
        raise HeaderError(f"no '{HEADER_KEY}' dataset")
    raw = hf[HEADER_KEY][()]
    return raw.encode() if isinstance(raw, str) else bytes(raw)


def read_volume_info(path: str | os.PathLike) -> tuple[VolumeMetadata, int, dict[str, Any]]:
    """Header metadata, number of slices and file attributes of one volume, without reading k-space.

    ``path`` may be a URI in object storage (:mod:`mri_models.data.store`): only those bytes are read.
    """
    with store.open_hdf5(path) as hf:
        metadata = parse_ismrmrd_header(read_header_xml(hf))
        return metadata, int(hf[KSPACE_KEY].shape[0]), dict(hf.attrs)


def write_volume(
    path: str | os.PathLike,
    kspace: np.ndarray,
    header_xml: str,
    attrs: dict[str, Any],
    target: np.ndarray | None = None,
) -> None:
    """Write one volume in the fastMRI single-coil layout, atomically.

    The file is written outside the split directory and renamed into place, so an interrupted write never
    leaves a truncated file under the final name nor a stray file in the split.

    Args:
        path: destination ``.h5`` file.
        kspace: (slices, H, W) complex k-space, stored as complex64.
        header_xml: the ISMRMRD header.
        attrs: file attributes (``acquisition``, ``max``, ``norm``, ``patient_id``...).
        target: optional (slices, h, w) target stored as ``reconstruction_esc`` float32.
    """
    path = Path(path)
    # The temporary file lives beside the split directory, not in it: fastMRI's SliceDataset opens every
    # file in a split directory, so a leftover from an interrupted write there would break it.
    tmp = path.parent.parent / f".{path.parent.name}.{path.name}.tmp"
    with h5py.File(tmp, "w") as hf:
        hf.create_dataset(KSPACE_KEY, data=np.asarray(kspace, dtype=np.complex64))
        if target is not None:
            hf.create_dataset(TARGET_KEY, data=np.asarray(target, dtype=np.float32))
        hf.create_dataset(HEADER_KEY, data=header_xml)
        for key, value in attrs.items():
            hf.attrs[key] = value
    os.replace(tmp, path)
