"""The arms of the study: which network, trained with which penalty terms, and how results name them.

A training configuration names a model (:func:`mri_models.models.model_names`) and a weight per penalty
term (:func:`mri_models.losses.penalty_terms`). Its *arm* is what it really trains: the architecture plus
the terms whose weight is positive. So ``sparse_attention_unet`` at ``gamma = 0`` is the Attention U-Net
arm, exactly as the paper defines it, and tables, curves and reconstructions group trials by arm.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from mri_models.losses import penalty_by_weight_key
from mri_models.models.registry import (
    architecture_rank,
    get_architecture,
    get_variant,
    option_owners,
    reserved_penalties,
    variant_for,
)


def active_penalties(model: str, weights: Mapping[str, float]) -> dict[str, float]:
    """The penalty terms a configuration trains with, checked against its model.

    Args:
        model: A registered model name.
        weights: Weight per penalty weight key (``{"gamma": 1e-4}``); missing keys weigh 0.

    Returns:
        Penalty name -> weight, for the positive weights.

    Raises:
        ValueError: A weight key that is not registered, a term reserved to another model name (``gamma``
            belongs to ``sparse_attention_unet``), or a term the network cannot feed.
    """
    architecture = get_architecture(model)
    terms, reserved = penalty_by_weight_key(), reserved_penalties()
    active = {}
    for key, weight in weights.items():
        if key not in terms:
            raise ValueError(f"{key!r} is not the weight of a registered penalty term ({', '.join(terms)})")
        if not weight:
            continue
        term = terms[key]
        owner = reserved.get(term.name)
        if owner is not None and owner.name != model:
            raise ValueError(
                f"{key}={weight:g} only applies to {owner.name} (model is {model!r}; {owner.architecture} "
                f"is the {key}=0 case)"
            )
        if not term.applies_to(architecture.provides):
            raise ValueError(
                f"{key}={weight:g} weights {term.label}, which needs {term.requires.__name__}; model "
                f"{model!r} provides {architecture.provides.__name__}"
            )
        active[term.name] = float(weight)
    return active


def accepts_weight(model: str, key: str) -> bool:
    """Whether a positive value of the penalty weight ``key`` is valid for ``model``."""
    try:
        active_penalties(model, {key: 1.0})
    except ValueError:
        return False
    return True


def without_inapplicable(
    values: Mapping[str, object], model: str, searched: Collection[str]
) -> dict[str, object]:
    """A trial's values without the fixed (not searched) penalty weights and architecture options its model
    does not take.

    A sweep fixes ``gamma`` for all its trials and it applies to sparse_attention_unet only, so one
    regularisation sweep covers the three architectures; a fixed ``psi_norm`` likewise applies to the
    gated networks only. A searched key always applies (and an invalid combination is then reported by the
    configuration's validation).
    """
    weight_keys, owners = penalty_by_weight_key(), option_owners()
    try:
        declared = get_architecture(model).options
    except ValueError:
        declared = {}  # the model's own error is reported by the configuration's validation

    def applies(key: str) -> bool:
        if key in searched:
            return True
        if key in weight_keys:
            return accepts_weight(model, key)
        return key not in owners or key in declared

    return {key: value for key, value in values.items() if applies(key)}


def model_options(model: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The model's architecture options in a trial's values, with the defaults for those not given (none
    for an unregistered model)."""
    try:
        declared = get_architecture(model).options
    except ValueError:
        return {}
    return {name: values.get(name, option.default) for name, option in declared.items()}


def shown_options(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that differ from the model's defaults: what tells a gate variant apart."""
    try:
        declared = get_architecture(model).options
    except ValueError:
        return {}
    return {k: v for k, v in options.items() if k in declared and v != declared[k].default}


def shown_weights(model: str, weights: Mapping[str, float]) -> dict[str, float]:
    """The weights that identify a configuration: the active ones, and a variant's own even at 0."""
    terms = penalty_by_weight_key()
    variant = get_variant(model)
    return {
        key: float(weight)
        for key, weight in weights.items()
        if key in terms and (weight or (variant is not None and terms[key].name == variant.penalty))
    }


@dataclass(frozen=True)
class Arm:
    """What a trial trains, for grouping and display.

    Attributes:
        name: Stable identifier in tables (``unet``, ``attention_unet``, ``sparse_attention_unet (γ=1e-05)``).
        label: Display name (``Sparse Attention U-Net (γ=1e-05)``).
        architecture: The architecture's name.
        has_attention: Whether the network has attention maps (and MPAND).
        rank: Sort key: architecture registration order, unpenalised first, then by weight.
    """

    name: str
    label: str
    architecture: str
    has_attention: bool
    rank: tuple


def arm_of(model: str, weights: Mapping[str, float], options: Mapping[str, Any] | None = None) -> Arm:
    """The arm of a configuration; unknown model names (an experiment from elsewhere) get their own arm.

    Args:
        model: The configuration's model name.
        weights: Weight per penalty weight key; terms that do not apply to the model are ignored.
        options: The configuration's architecture options; those at the model's default are not shown.
    """
    try:
        architecture = get_architecture(model)
    except ValueError:
        return Arm(str(model), str(model), str(model), False, (architecture_rank(str(model)), 0, str(model)))
    terms = penalty_by_weight_key()
    active = [
        (terms[key], float(weight))
        for key, weight in weights.items()
        if key in terms and weight and terms[key].applies_to(architecture.provides)
    ]
    shown = shown_options(model, options or {})
    rank = (
        architecture_rank(architecture.name),
        tuple(f"{k}={v}" for k, v in sorted(shown.items())),
        len(active),
        tuple(weight for _, weight in active),
    )
    variant = variant_for(architecture.name, active[0][0].name) if len(active) == 1 else None
    if variant:
        term, weight = active[0]
        parts = [f"{term.symbol or term.weight_key}={weight:g}"]
        name, label = variant.name, variant.label
    else:
        parts = [f"{term.weight_key}={weight:g}" for term, weight in active]
        name, label = architecture.name, architecture.label
    parts += [f"{key}={value}" for key, value in shown.items()]
    suffix = f" ({', '.join(parts)})" if parts else ""
    return Arm(name + suffix, label + suffix, architecture.name, architecture.has_attention, rank)
