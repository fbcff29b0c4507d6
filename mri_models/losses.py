"""Training losses: fastMRI's L1 reconstruction loss plus registered penalty terms.

The paper writes the Sparse Attention U-Net loss as::

    L = ||v - v_hat||_1 + gamma * (1 / (m |L|)) * sum_l sum_i |alpha_i^l|

We implement ``||v - v_hat||_1`` as fastMRI's UnetModule trains it, ``F.l1_loss`` with mean reduction
(the L1 norm divided by the number of pixels), so gamma = 0 reproduces the Attention U-Net and the
U-Net training exactly. m is the batch size, L the set of up-sampling levels and i runs over every
attention coefficient of the batch at level l.

A penalty term is one :class:`PenaltyTerm` entry (:func:`register_penalty`): a function of the network's
output, the configuration key of its weight, and the output protocol it needs. The paper's penalty is
``attention_l1`` with weight ``gamma``; the model name ``sparse_attention_unet`` binds it to the Attention
U-Net (:mod:`mri_models.models.sparse_attention_unet`). :func:`training_loss` adds every active term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from mri_models.models.registry import AttentionOutput
from mri_models.named_registry import Registry


def reconstruction_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error, as fastMRI's UnetModule trains (the paper's ``||v - v_hat||_1``).

    Args:
        output: Network output, e.g. ``(N, 1, H, W)`` or ``(N, H, W)``.
        target: Target of the same shape.

    Returns:
        Scalar ``F.l1_loss(output, target)`` (mean over every element).
    """
    if output.shape != target.shape:
        # F.l1_loss would only warn and broadcast, silently training on the wrong pairs.
        raise ValueError(f"output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
    return F.l1_loss(output, target)


def attention_sparsity_penalty(attention_maps: Sequence[Tensor]) -> Tensor:
    """The L1 penalty on attention coefficients, ``(1 / (m |L|)) sum_l sum_i |alpha_i^l|``.

    Args:
        attention_maps: One tensor per up-sampling level, each ``(m, 1, H_l, W_l)`` (any trailing shape
            works; the first dimension is the batch).

    Returns:
        Scalar penalty, attached to the graph.

    Raises:
        ValueError: If there are no maps or the levels disagree on the batch size.
    """
    if len(attention_maps) == 0:
        raise ValueError("the attention-sparsity penalty needs at least one attention map")
    batch_sizes = {int(a.shape[0]) for a in attention_maps}
    if len(batch_sizes) != 1:
        raise ValueError(f"attention maps disagree on the batch size: {sorted(batch_sizes)}")
    batch_size = batch_sizes.pop()
    # Sum per level first: the levels have different resolutions, so they cannot be stacked.
    total = torch.stack([a.abs().sum() for a in attention_maps]).sum()
    return total / (batch_size * len(attention_maps))


def _check_weight(key: str, weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {weight}")
    return weight


# --- registered penalty terms --------------------------------------------------------------------------


@dataclass(frozen=True)
class PenaltyTerm:
    """A term added to the reconstruction loss, ``weight * fn(network output)``.

    Attributes:
        name: Its column in every report (the detached value, logged at validation).
        weight_key: The configuration key of its weight (``gamma`` for the paper's term); 0 turns it off.
        fn: Computes the scalar penalty from the network's output (attached to the graph).
        label: Display name.
        symbol: How plots write the weight (``γ``).
        requires: The output protocol the term reads (see :mod:`mri_models.models.registry`).
    """

    name: str
    weight_key: str
    fn: Callable[[Any], Tensor]
    label: str
    symbol: str = ""
    requires: type = AttentionOutput

    def applies_to(self, provides: type) -> bool:
        """Whether a network whose output follows ``provides`` gives this term what it reads."""
        return self.requires in getattr(provides, "__mro__", ())


_PENALTIES: Registry[PenaltyTerm] = Registry("penalty")


def register_penalty(term: PenaltyTerm) -> PenaltyTerm:
    """Add a penalty term; its weight becomes a configuration key (``--set <weight_key>=...``)."""
    owner = penalty_by_weight_key().get(term.weight_key)
    if owner is not None and owner.name != term.name:
        raise ValueError(f"penalty {term.name!r}: weight key {term.weight_key!r} is taken by {owner.name!r}")
    return _PENALTIES.add(term.name, term)


def unregister_penalty(name: str) -> None:
    """Remove a penalty term (tests and interactive sessions)."""
    _PENALTIES.remove(name)


def penalty_terms() -> dict[str, PenaltyTerm]:
    """Every registered penalty term by name, in registration order."""
    return _PENALTIES.as_dict()


def penalty_by_weight_key() -> dict[str, PenaltyTerm]:
    """Every registered penalty term by the configuration key of its weight."""
    return {term.weight_key: term for term in _PENALTIES.as_dict().values()}


def _attention_l1(result: AttentionOutput) -> Tensor:
    return attention_sparsity_penalty(result.attention_maps)


register_penalty(
    PenaltyTerm(
        name="attention_l1",
        weight_key="gamma",
        fn=_attention_l1,
        label="L1 on attention coefficients",
        symbol="γ",
    )
)


class TrainingLoss(NamedTuple):
    """The loss of one batch.

    Attributes:
        total: The scalar to back-propagate.
        reconstruction: Mean L1 reconstruction loss (attached to the graph).
        penalties: Per penalty term name, its detached value (only the terms that were computed).
    """

    total: Tensor
    reconstruction: Tensor
    penalties: dict[str, Tensor]


def training_loss(
    result: Any,
    target: Tensor,
    weights: Mapping[str, float],
    provides: type,
    log_inactive: bool = False,
) -> TrainingLoss:
    """Reconstruction loss plus ``weight * term`` for every penalty with a positive weight.

    A term with weight 0 adds nothing (no ``0 * term``: the gradients are exactly the unpenalised
    network's). With ``log_inactive`` every term the output supports is also computed, without gradient,
    for logging (validation).

    Args:
        result: The network's ``forward(image, return_attention=True)`` output.
        target: Target of the output's shape.
        weights: Penalty name -> weight (missing names weigh 0).
        provides: The output protocol the architecture declares.
        log_inactive: Also compute the terms with weight 0.

    Raises:
        ValueError: A positive weight for a term the output cannot feed, or a bad weight.
    """
    reconstruction = reconstruction_loss(result.output, target)
    total, logged = reconstruction, {}
    for name, term in penalty_terms().items():
        weight = _check_weight(term.weight_key, weights.get(name, 0.0))
        if weight > 0:
            if not term.applies_to(provides):
                raise ValueError(f"{term.weight_key} > 0 needs {term.requires.__name__} from the model")
            value = term.fn(result)
            total = total + weight * value
            logged[name] = value.detach()
        elif log_inactive and term.applies_to(provides):
            with torch.no_grad():
                logged[name] = term.fn(result)
    return TrainingLoss(total, reconstruction, logged)
