"""Map-style dataset of fastMRI slices, yielding exactly what ``fastmri.data.SliceDataset`` yields.

Listing a real split means opening ~1,000 HDF5 files to read their headers. The listing is cached per root
as JSON and revalidated with one ``stat`` per file (size and modification time), so a rerun reopens only
files that are new or changed, and a stale cache can never describe a file that has since been replaced.
A root may be a local path or a URI in object storage (:mod:`mri_models.storage`): listing then reads
only each file's header and attributes, with ranged reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from mri_models import storage
from mri_models.data import store
from mri_models.data.volume import KSPACE_KEY, TARGET_KEY, read_volume_info

CACHE_ENV = "MRI_MODELS_CACHE_DIR"
_CACHE_VERSION = 1


class RawSample(NamedTuple):
    """One slice of the index: the file, the slice and the volume's metadata (header fields + attributes)."""

    fname: Path | str  # a local path, or a URI under a remote root
    slice_ind: int
    metadata: dict[str, Any]


class VolumeInfo(NamedTuple):
    """One volume of the index."""

    fname: Path | str  # a local path, or a URI under a remote root
    num_slices: int
    metadata: dict[str, Any]


def default_cache_dir() -> Path:
    """``$MRI_MODELS_CACHE_DIR``, else ``~/.cache/mri_models``: never inside the (possibly read-only) data."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mri_models"))


def _plain(value: Any) -> Any:
    """HDF5 attribute values as JSON-friendly Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _read_volume(path: str) -> tuple[int, dict[str, Any]]:
    header, num_slices, attrs = read_volume_info(path)
    # Header fields first, then file attributes: the order of fastMRI's metadata dict.
    return num_slices, {**header.as_dict(), **{key: _plain(value) for key, value in attrs.items()}}


def list_volumes(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[VolumeInfo]:
    """Every ``*.h5`` volume under ``root`` (sorted by name) with its slice count and metadata.

    Args:
        root: a split directory such as ``<data>/singlecoil_train``, local or a URI (``s3://...``).
        cache_dir: where the listing cache lives; None uses :func:`default_cache_dir`, an empty string
            disables caching.

    Raises:
        FileNotFoundError: the directory does not exist or cannot be listed (naming it).
    """
    root = storage.normalise(root)
    files = store.volume_files(root)
    cache_file = None
    cached: dict[str, Any] = {}
    if cache_dir != "":
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir or default_cache_dir()) / f"slice_index_{digest}.json"
        try:
            content = json.loads(cache_file.read_text())
            if content.get("version") == _CACHE_VERSION and content.get("root") == str(root):
                cached = content["files"]
        except (OSError, ValueError, KeyError):
            cached = {}  # a missing or corrupt cache is rebuilt, never trusted
    entries: dict[str, Any] = {}
    volumes = []
    for file in files:
        stat_key = [file.size, file.mtime_ns]
        entry = cached.get(file.name)
        if entry is None or entry["stat"] != stat_key:
            num_slices, metadata = _read_volume(file.uri)
            entry = {"stat": stat_key, "num_slices": num_slices, "metadata": metadata}
        entries[file.name] = entry
        metadata = dict(entry["metadata"])
        for key in ("encoding_size", "recon_size"):
            metadata[key] = tuple(metadata[key])
        fname = file.uri if storage.is_remote(root) else Path(file.uri)
        volumes.append(VolumeInfo(fname, entry["num_slices"], metadata))
    if cache_file is not None and entries != cached:
        listing = {"version": _CACHE_VERSION, "root": str(root), "files": entries}
        storage.write_text(str(cache_file), json.dumps(listing))
    return volumes


def _stem(fname: str | os.PathLike) -> str:
    """``file1000001`` of a local path or a URI."""
    return os.path.splitext(os.path.basename(str(fname)))[0]


def subsample_slices(
    samples: list[RawSample],
    sample_rate: float | None = None,
    volume_sample_rate: float | None = None,
    rng: random.Random | None = None,
) -> list[RawSample]:
    """Subsample slices by slice or by volume, as fastMRI does.

    Args:
        samples: the slices, in index order.
        sample_rate: keep this fraction of all slices (shuffled first).
        volume_sample_rate: keep every slice of this fraction of the volumes.
        rng: the random stream to shuffle with; None uses Python's global ``random`` like fastMRI, so
            seeding ``random`` identically selects identical subsets in both.
    """
    if sample_rate is not None and volume_sample_rate is not None:
        raise ValueError("set sample_rate (by slice) or volume_sample_rate (by volume), not both")
    for name, rate in (("sample_rate", sample_rate), ("volume_sample_rate", volume_sample_rate)):
        if rate is not None and not 0.0 < rate <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {rate}")
    shuffle = (rng or random).shuffle
    samples = list(samples)
    if sample_rate is not None and sample_rate < 1.0:
        shuffle(samples)
        samples = samples[: round(len(samples) * sample_rate)]
    elif volume_sample_rate is not None and volume_sample_rate < 1.0:
        names = sorted({_stem(s.fname) for s in samples})
        shuffle(names)
        keep = set(names[: round(len(names) * volume_sample_rate)])
        samples = [s for s in samples if _stem(s.fname) in keep]
    return samples


class SliceDataset(torch.utils.data.Dataset):
    """Slices of every volume in a split directory, in fastMRI's order.

    Args:
        root: split directory (``<data>/singlecoil_train`` ...).
        challenge: ``singlecoil`` (target ``reconstruction_esc``).
        transform: called as ``transform(kspace, mask, target, attrs, fname, slice_num)``; None yields that
            tuple itself.
        sample_rate: fraction of slices to keep.
        volume_sample_rate: fraction of volumes to keep.
        seed: seed of the subsampling shuffle; None uses Python's global ``random`` (fastMRI's behaviour).
        raw_sample_filter: keep only the slices for which this returns True.
        cache_dir: listing cache directory (see :func:`list_volumes`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        challenge: str = "singlecoil",
        transform: Callable[..., Any] | None = None,
        sample_rate: float | None = None,
        volume_sample_rate: float | None = None,
        seed: int | None = None,
        raw_sample_filter: Callable[[RawSample], bool] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if challenge != "singlecoil":
            raise ValueError(f"challenge {challenge!r} is not supported; expected 'singlecoil'")
        self.transform = transform
        self.recons_key = TARGET_KEY
        samples = [
            RawSample(volume.fname, slice_ind, volume.metadata)
            for volume in list_volumes(root, cache_dir)
            for slice_ind in range(volume.num_slices)
        ]
        if raw_sample_filter is not None:  # fastMRI filters before subsampling
            samples = [sample for sample in samples if raw_sample_filter(sample)]
        rng = random.Random(seed) if seed is not None else None
        self.raw_samples = subsample_slices(samples, sample_rate, volume_sample_rate, rng)

    def __len__(self) -> int:
        return len(self.raw_samples)

    def __getitem__(self, i: int) -> Any:
        fname, slice_ind, metadata = self.raw_samples[i]
        with store.open_hdf5(fname) as hf:
            kspace = hf[KSPACE_KEY][slice_ind]
            mask = np.asarray(hf["mask"]) if "mask" in hf else None
            target = hf[self.recons_key][slice_ind] if self.recons_key in hf else None
            attrs = dict(hf.attrs)
            attrs.update(metadata)
        name = os.path.basename(str(fname))
        if self.transform is None:
            return kspace, mask, target, attrs, name, slice_ind
        return self.transform(kspace, mask, target, attrs, name, slice_ind)
