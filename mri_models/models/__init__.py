"""Reconstruction networks, each registering itself in its own module, and the registry that builds them.

``build_model(name, **hparams)`` builds any registered name; ``model_names()`` lists them. See
:mod:`mri_models.models.registry` for how an architecture declares itself.
"""

from __future__ import annotations

# Importing the modules registers their architectures, in display order.
from mri_models.models import attention_unet, sparse_attention_unet, unet  # noqa: F401
from mri_models.models.attention_unet import AttentionGate, AttentionUnet
from mri_models.models.registry import (
    Architecture,
    AttentionOutput,
    ImageOutput,
    Variant,
    build_model,
    get_architecture,
    get_variant,
    model_names,
    register_model,
    register_variant,
    unregister,
    uses_attention,
)
from mri_models.models.unet import ConvBlock, TransposeConvBlock, Unet, UnetOutput

__all__ = [
    "Architecture",
    "AttentionGate",
    "AttentionOutput",
    "AttentionUnet",
    "ConvBlock",
    "ImageOutput",
    "TransposeConvBlock",
    "Unet",
    "UnetOutput",
    "Variant",
    "build_model",
    "get_architecture",
    "get_variant",
    "model_names",
    "register_model",
    "register_variant",
    "unregister",
    "uses_attention",
]
