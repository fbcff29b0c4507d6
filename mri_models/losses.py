"""Training losses: fastMRI's L1 reconstruction loss and the attention-sparsity penalty.

The paper writes the Sparse Attention U-Net loss as::

    L = ||v - v_hat||_1 + gamma * (1 / (m |L|)) * sum_l sum_i |alpha_i^l|

We implement ``||v - v_hat||_1`` as fastMRI's UnetModule trains it, ``F.l1_loss`` with mean reduction
(the L1 norm divided by the number of pixels), so gamma = 0 reproduces the Attention U-Net and the
U-Net training exactly. m is the batch size, L the set of up-sampling levels and i runs over every
attention coefficient of the batch at level l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F


class LossParts(NamedTuple):
    """The loss and its parts.

    Attributes:
        total: The scalar to back-propagate.
        reconstruction: Mean L1 reconstruction loss (attached to the graph).
        attention_l1: The sparsity penalty, detached, for logging; NaN when there are no attention maps.
            Kept as a tensor so logging it does not force a device sync every step.
    """

    total: Tensor
    reconstruction: Tensor
    attention_l1: Tensor


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


def sparse_attention_loss(
    output: Tensor,
    target: Tensor,
    attention_maps: Sequence[Tensor] = (),
    gamma: float = 0.0,
) -> LossParts:
    """The Sparse Attention U-Net loss ``reconstruction + gamma * penalty``.

    With ``gamma == 0`` the total *is* the reconstruction loss (no ``0 * penalty`` term is added, so the
    result and its gradients are exactly the Attention U-Net's, and the penalty costs no backward work).
    The penalty is still reported, detached, whenever maps are given.

    Args:
        output: Network output.
        target: Target of the same shape.
        attention_maps: The attention maps of :class:`~mri_models.models.UnetOutput` (empty for U-Net).
        gamma: Sparsity weight, ``>= 0``.

    Returns:
        :class:`LossParts` with the total, the reconstruction loss and the detached penalty.

    Raises:
        ValueError: If ``gamma`` is negative or not finite, or ``gamma > 0`` without attention maps.
    """
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    if gamma > 0 and len(attention_maps) == 0:
        raise ValueError("gamma > 0 needs attention maps; is the model an attention U-Net?")
    reconstruction = reconstruction_loss(output, target)
    if len(attention_maps) == 0:
        return LossParts(reconstruction, reconstruction, torch.full_like(reconstruction.detach(), math.nan))
    if gamma == 0:
        with torch.no_grad():
            penalty = attention_sparsity_penalty(attention_maps)
        return LossParts(reconstruction, reconstruction, penalty)
    penalty = attention_sparsity_penalty(attention_maps)
    return LossParts(reconstruction + gamma * penalty, reconstruction, penalty.detach())
