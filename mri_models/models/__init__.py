"""Reconstruction networks and the registry that builds them by name.

``sparse_attention_unet`` builds the same network as ``attention_unet``: the two differ only in the loss
(the sparsity weight gamma of :func:`mri_models.losses.sparse_attention_loss`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mri_models.models.attention_unet import AttentionGate, AttentionUnet
from mri_models.models.unet import ConvBlock, TransposeConvBlock, Unet, UnetOutput

__all__ = [
    "MODEL_NAMES",
    "AttentionGate",
    "AttentionUnet",
    "ConvBlock",
    "TransposeConvBlock",
    "Unet",
    "UnetOutput",
    "build_model",
    "uses_attention",
]

MODEL_NAMES: tuple[str, ...] = ("unet", "attention_unet", "sparse_attention_unet")

_MODEL_CLASSES: dict[str, type[Unet]] = {
    "unet": Unet,
    "attention_unet": AttentionUnet,
    "sparse_attention_unet": AttentionUnet,
}

# The constructor arguments every architecture accepts, with the study's defaults.
DEFAULT_HPARAMS: dict[str, Any] = {
    "in_chans": 1,
    "out_chans": 1,
    "chans": 32,
    "num_pool_layers": 4,
    "drop_prob": 0.0,
}


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def uses_attention(name: str) -> bool:
    """Whether the named architecture has attention gates (and so attention maps and MPAND).

    Args:
        name: One of :data:`MODEL_NAMES`.

    Raises:
        ValueError: If ``name`` is not a registered model.
    """
    _check_name(name)
    return issubclass(_MODEL_CLASSES[name], AttentionUnet)


def build_model(name: str, **hparams: Any) -> nn.Module:
    """Build a network by name.

    Args:
        name: One of :data:`MODEL_NAMES`.
        **hparams: Any of ``in_chans``, ``out_chans``, ``chans``, ``num_pool_layers``, ``drop_prob``;
            missing ones take the defaults in :data:`DEFAULT_HPARAMS`.

    Returns:
        The freshly initialised network.

    Raises:
        ValueError: If ``name`` is unknown or a value is out of range.
        TypeError: If a hyper-parameter name is not accepted (caught here, before any construction,
            so a typo in a sweep config fails loudly instead of silently using a default).
    """
    _check_name(name)
    unknown = sorted(set(hparams) - set(DEFAULT_HPARAMS))
    if unknown:
        raise TypeError(
            f"unknown hyper-parameter(s) for model {name!r}: {', '.join(unknown)}; "
            f"accepted: {', '.join(DEFAULT_HPARAMS)}"
        )
    return _MODEL_CLASSES[name](**{**DEFAULT_HPARAMS, **hparams})
