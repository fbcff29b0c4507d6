"""The architecture registry: every network declares itself once, in its own module.

An architecture is registered with :func:`register_model` (a decorator on its class or factory, as timm's
``@register_model``) under the name users type, with a display label and the protocol of what its
``forward(image, return_attention=True)`` returns: :class:`ImageOutput` (a reconstruction) or
:class:`AttentionOutput` (a reconstruction, attention maps and skip-connection norms, which the attention
penalties and MPAND need). What a network provides is that declaration, never a base class.

A *variant* (:func:`register_variant`) is a name for an architecture trained with a penalty term of
:mod:`mri_models.losses`: the paper's ``sparse_attention_unet`` is ``attention_unet`` trained with the
``attention_l1`` penalty. A penalty bound to a variant is active only under that name, which keeps the
paper's arms apart (the Attention U-Net is the network *without* the penalty).

An architecture's own hyper-parameters are the constructor's keyword arguments beyond the ones every
network shares (:data:`SHARED_HPARAMS`): ``psi_norm`` of the Attention U-Net, or a plugin's. Each becomes a
configuration key, a ``--set`` key and a sweep search key (:attr:`Architecture.options`), validated against
its type annotation, with no change to the configuration class.

Every other place (configuration checks, command-line choices, run names, plot order and labels, analysis
grouping) reads this registry; adding an architecture is one new module that registers itself.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import Tensor, nn

from mri_models.named_registry import Registry

__all__ = [
    "SHARED_HPARAMS",
    "Architecture",
    "ArchitectureOption",
    "AttentionOutput",
    "ImageOutput",
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


class ImageOutput(Protocol):
    """What every network's ``forward(image, return_attention=True)`` returns: at least the image."""

    output: Tensor


class AttentionOutput(ImageOutput, Protocol):
    """The output of a gated network; every tuple is per up-sampling level, deepest first.

    Attributes:
        output: Reconstruction ``(N, out_chans, H, W)``.
        attention_maps: Attention coefficients ``(N, 1, H_l, W_l)``, attached to the graph (penalties).
        skip_norms_before: ``(N,)`` Frobenius norms of the skip features before attention (MPAND).
        skip_norms_after: ``(N,)`` the same norms after attention.
    """

    attention_maps: Sequence[Tensor]
    skip_norms_before: Sequence[Tensor]
    skip_norms_after: Sequence[Tensor]


# Constructor arguments every architecture takes; the configuration has a field for each (the image channels
# are fixed by the data). Any other keyword argument is the architecture's own option.
SHARED_HPARAMS = ("in_chans", "out_chans", "chans", "num_pool_layers", "drop_prob")


@dataclass(frozen=True)
class ArchitectureOption:
    """A hyper-parameter an architecture declares beyond :data:`SHARED_HPARAMS`.

    Attributes:
        name: The keyword argument, which is also its configuration key.
        default: Its default value.
        annotation: Its type annotation (values are validated against it), ``Any`` when it has none.
    """

    name: str
    default: Any
    annotation: Any = Any


@dataclass(frozen=True)
class Architecture:
    """A registered network.

    Attributes:
        name: The name users type (``--model``, sweep YAML, results).
        label: Display name in tables and plots.
        constructor: Builds the network from keyword hyper-parameters (the uniform signature
            ``in_chans, out_chans, chans, num_pool_layers, drop_prob`` with the study's defaults).
        provides: The protocol of ``forward(image, return_attention=True)``'s result.
    """

    name: str
    label: str
    constructor: Callable[..., nn.Module]
    provides: type = ImageOutput

    @property
    def hparams(self) -> dict[str, Any]:
        """The constructor's hyper-parameters and their defaults, read from its signature."""
        parameters = inspect.signature(self.constructor).parameters.values()
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

    @property
    def options(self) -> dict[str, ArchitectureOption]:
        """The architecture's own hyper-parameters: keyword arguments with defaults beyond
        :data:`SHARED_HPARAMS`, with their type annotations."""
        target = self.constructor.__init__ if inspect.isclass(self.constructor) else self.constructor
        hints = typing.get_type_hints(target)
        return {
            name: ArchitectureOption(name, default, hints.get(name, Any))
            for name, default in self.hparams.items()
            if name not in SHARED_HPARAMS
        }

    @property
    def has_attention(self) -> bool:
        """Whether the network declares attention maps and skip norms in its output."""
        return AttentionOutput in getattr(self.provides, "__mro__", ())


@dataclass(frozen=True)
class Variant:
    """A name for an architecture trained with one penalty term (which is then reserved to this name).

    Attributes:
        name: The name users type.
        label: Display name.
        architecture: The registered architecture it trains.
        penalty: The name of the :mod:`mri_models.losses` penalty term it adds.
    """

    name: str
    label: str
    architecture: str
    penalty: str


_ARCHITECTURES: Registry[Architecture] = Registry("model name")
_VARIANTS: Registry[Variant] = Registry("model name")

T = TypeVar("T", bound=Callable[..., nn.Module])


def _check_free(name: str, other: Registry) -> None:
    """Architectures and variants share one namespace: the names users type."""
    if name in other:
        raise ValueError(f"model name {name!r} is already registered ({other.get(name)})")


def register_model(name: str, *, label: str, provides: type = ImageOutput) -> Callable[[T], T]:
    """Class (or factory) decorator that registers an architecture under ``name``.

    Args:
        name: The name users type.
        label: Display name in tables and plots.
        provides: :class:`ImageOutput`, :class:`AttentionOutput` or a protocol extending one of them.
    """

    def decorate(constructor: T) -> T:
        _check_free(name, _VARIANTS)
        _ARCHITECTURES.add(name, Architecture(name, label, constructor, provides))
        return constructor

    return decorate


def register_variant(name: str, *, architecture: str, penalty: str, label: str) -> Variant:
    """Register ``name`` as ``architecture`` trained with the penalty term ``penalty``."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"variant {name!r}: unknown architecture {architecture!r}")
    _check_free(name, _ARCHITECTURES)
    return _VARIANTS.add(name, Variant(name, label, architecture, penalty))


def unregister(name: str) -> None:
    """Remove an architecture or variant (tests and interactive sessions)."""
    _ARCHITECTURES.remove(name)
    _VARIANTS.remove(name)


def model_names() -> tuple[str, ...]:
    """Every name a configuration may use: architectures, then variants, in registration order."""
    return (*_ARCHITECTURES, *_VARIANTS)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model name {name!r}; valid names: {', '.join(model_names())}")


def get_variant(name: str) -> Variant | None:
    """The variant called ``name``, or None when ``name`` is a plain architecture."""
    if name not in _VARIANTS and name not in _ARCHITECTURES:
        raise _unknown(name)
    return _VARIANTS.get(name)


def get_architecture(name: str) -> Architecture:
    """The architecture behind a model name (a variant's architecture for a variant).

    Raises:
        ValueError: If ``name`` is not registered; the message lists the valid names.
    """
    variant = get_variant(name)
    return _ARCHITECTURES.as_dict()[variant.architecture if variant else name]


def variant_for(architecture: str, penalty: str) -> Variant | None:
    """The variant that binds ``penalty`` to ``architecture``, if one is registered."""
    return next(
        (v for v in _VARIANTS.as_dict().values() if v.architecture == architecture and v.penalty == penalty),
        None,
    )


def reserved_penalties() -> dict[str, Variant]:
    """Penalty name -> the variant it is reserved to."""
    return {variant.penalty: variant for variant in _VARIANTS.as_dict().values()}


def architecture_rank(name: str) -> int:
    """Display order of an architecture (registration order; unknown names last)."""
    names = list(_ARCHITECTURES)
    return names.index(name) if name in names else len(names)


def option_owners() -> dict[str, list[str]]:
    """Every architecture option's name -> the architectures that declare it, in registration order."""
    owners: dict[str, list[str]] = {}
    for architecture in _ARCHITECTURES.as_dict().values():
        for option in architecture.options:
            owners.setdefault(option, []).append(architecture.name)
    return owners


def uses_attention(name: str) -> bool:
    """Whether the named model's network returns attention maps (and so has MPAND).

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return get_architecture(name).has_attention


def build_model(name: str, **hparams: Any) -> nn.Module:
    """Build a network by model name.

    Args:
        name: A name of :func:`model_names`.
        **hparams: Constructor arguments; missing ones take the architecture's defaults.

    Returns:
        The freshly initialised network.

    Raises:
        ValueError: If ``name`` is unknown or a value is out of range.
        TypeError: If a hyper-parameter name is not accepted (checked before any construction, so a typo
            in a sweep config fails loudly instead of silently using a default).
    """
    architecture = get_architecture(name)
    accepted = architecture.hparams
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown hyper-parameter(s) for model {name!r}: {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    return architecture.constructor(**hparams)
