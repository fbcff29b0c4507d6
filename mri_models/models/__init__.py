"""Reconstruction networks, each registering itself in its own module, and the registry that builds them.

``build_model(name, **hparams)`` builds any registered name; ``model_names()`` lists them. See
:mod:`mri_models.models.registry` for how an architecture declares itself. Every module of this package is
imported here, so a new architecture is one new module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from mri_models.models.attention_unet import INSTANCE_NORM_FLOOR, PSI_NORMS, AttentionGate, AttentionUnet
from mri_models.models.registry import (
    SHARED_HPARAMS,
    Architecture,
    ArchitectureOption,
    AttentionOutput,
    ImageOutput,
    Variant,
    build_model,
    get_architecture,
    get_variant,
    model_names,
    option_owners,
    register_model,
    register_variant,
    unregister,
    uses_attention,
)
from mri_models.models.unet import ConvBlock, TransposeConvBlock, Unet, UnetOutput

# Registration order is display order: unet (imported by attention_unet), attention_unet, then the rest.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "INSTANCE_NORM_FLOOR",
    "PSI_NORMS",
    "SHARED_HPARAMS",
    "Architecture",
    "ArchitectureOption",
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
    "option_owners",
    "register_model",
    "register_variant",
    "unregister",
    "uses_attention",
]
