"""A model package: one trained network with everything needed to use it and to know where it came from.

A package is a directory (a local path or a URI, written through :mod:`mri_models.storage`)::

    <package>/model.pt        the bare network's state dict (``torch.load(weights_only=True)`` reads it; the
                              U-Net's loads into ``fastmri.models.Unet`` with strict keys)
    <package>/package.json    the manifest (:class:`PackageManifest`): the architecture and its
                              hyper-parameters, the resolved training configuration, the selected epoch and
                              the rule that selected it, validation and test metrics with the zero-filled
                              input's, a fingerprint of the training data, the weights' SHA-256, the
                              project version

``package.json`` is written last, so a package whose writing was interrupted has none and is refused.
:func:`load_package` checks the manifest, the weights' checksum and the state dict's keys and shapes, and
fails in one line (:class:`PackageError`) on a damaged or incompatible package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

from mri_models import storage
from mri_models.models import build_model
from mri_models.plugins import load_plugins

FORMAT = "sparse-attention-sweeps/model-package"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
MANIFEST_FILE = "package.json"
DISTRIBUTION = "sparse-attention-sweeps"


class PackageError(ValueError):
    """A package that cannot be used: the message names the package, the file and what is wrong."""


def project_version() -> str:
    """The installed project's version (``unknown`` when run from a source tree that is not installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class PackageManifest:
    """What ``package.json`` holds.

    Attributes:
        model: Registered model name (``unet``, ``attention_unet``, ``sparse_attention_unet`` or a plugin's).
        hparams: Every constructor argument of the network.
        arm: The study arm it was trained as (``sparse_attention_unet (γ=0.0001)``).
        plugins: Modules to import before building the network (a plugin architecture).
        train_config: The resolved training configuration of the run.
        selection: Where the weights come from: ``experiment``, ``trial_id``, ``epoch``, ``checkpoint``,
            ``rule`` (how the epoch was chosen) and ``chosen_by`` (how the trial was chosen).
        validation: Validation metrics of the selected epoch and the zero-filled input's (``zero_filled``).
        test: The final evaluation on the test split (``test_evaluation.json``), or None without one.
        data: The data root, the files per role and ``train_fingerprint``.
        weights_sha256: SHA-256 of ``model.pt``.
        parameters: Number of the network's parameters.
        project_version: Version of this project that wrote the package.
    """

    model: str
    hparams: dict[str, Any]
    arm: str
    train_config: dict[str, Any]
    selection: dict[str, Any]
    validation: dict[str, Any]
    data: dict[str, Any]
    weights_sha256: str
    parameters: int
    plugins: list[str] = field(default_factory=list)
    test: dict[str, Any] | None = None
    project_version: str = field(default_factory=project_version)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class ModelPackage:
    """A loaded package: its manifest and the network, in evaluation mode on the CPU."""

    uri: str
    manifest: PackageManifest
    network: nn.Module


def state_dict_bytes(network: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in network.state_dict().items()}, buffer)
    return buffer.getvalue()


def write_package(uri: str, weights: bytes, manifest: PackageManifest) -> None:
    """Write ``model.pt`` and then ``package.json`` (its presence means the package is complete)."""
    if hashlib.sha256(weights).hexdigest() != manifest.weights_sha256:
        raise ValueError("the manifest's weights_sha256 is not the checksum of the weights given")
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_text(storage.join(uri, MANIFEST_FILE), manifest.to_json())


def write_network(uri: str, network: nn.Module, **fields: Any) -> PackageManifest:
    """Package ``network``: its weights, and a manifest of ``fields`` (every :class:`PackageManifest` field
    but the checksum and the parameter count, which are computed here); returns the manifest."""
    weights = state_dict_bytes(network)
    manifest = PackageManifest(
        **fields,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        parameters=sum(p.numel() for p in network.parameters()),
    )
    write_package(uri, weights, manifest)
    return manifest


def read_manifest(uri: str) -> PackageManifest:
    """The package's manifest, checked for its format and version.

    Raises:
        PackageError: no manifest, not JSON, another format, a newer format version, or missing fields.
    """
    where = storage.join(uri, MANIFEST_FILE)
    text = storage.read_text(where)
    if text is None:
        raise PackageError(f"{uri}: not a model package (no {MANIFEST_FILE}; `mri-export` writes packages)")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise PackageError(f"{where}: damaged ({err.msg} at line {err.lineno})") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        raise PackageError(f"{where}: not a manifest of format {FORMAT!r}")
    if values.get("format_version") != FORMAT_VERSION:
        raise PackageError(
            f"{where}: format version {values.get('format_version')!r}; this version of the project reads "
            f"version {FORMAT_VERSION}"
        )
    names = {f.name for f in dataclasses.fields(PackageManifest)}
    required = {f.name for f in dataclasses.fields(PackageManifest) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}  # fmt: skip
    missing = sorted(required - set(values))
    if missing:
        raise PackageError(f"{where}: missing {', '.join(missing)}")
    return PackageManifest(**{key: value for key, value in values.items() if key in names})


def load_package(uri: str) -> ModelPackage:
    """Load a package: its manifest, then the network with the checked weights.

    Raises:
        PackageError: in one line, naming the package and what is wrong with it (no manifest, a damaged
            or altered ``model.pt``, a model this installation does not know, weights of another shape).
    """
    manifest = read_manifest(uri)
    where = storage.join(uri, WEIGHTS_FILE)
    weights = storage.read_bytes(where)
    if weights is None:
        raise PackageError(f"{where}: missing")
    if hashlib.sha256(weights).hexdigest() != manifest.weights_sha256:
        raise PackageError(f"{where}: damaged or altered (its SHA-256 is not the one in {MANIFEST_FILE})")
    try:
        load_plugins(manifest.plugins)
        network = build_model(manifest.model, **manifest.hparams)
    except (ValueError, TypeError) as err:
        raise PackageError(f"{uri}: cannot build the network it holds: {err}") from None
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, KeyError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PackageError(f"{where}: does not load into {manifest.model}: {reason}") from None
    return ModelPackage(uri, manifest, network.eval())
