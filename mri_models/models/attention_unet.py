"""Attention U-Net: fastMRI's U-Net with an attention gate on every skip connection.

At up-sampling level l, with ``x`` the encoder skip features (C channels) and ``g`` the decoder features
after the transpose convolution and padding (same size, C channels)::

    alpha = sigmoid(IN(psi(relu(IN(W_g g) + IN(W_x x)))))

with ``W_g``, ``W_x`` 1x1 convolutions to ``max(1, C // 2)`` channels, ``psi`` a 1x1 convolution to one
channel and IN = InstanceNorm2d (paper appendix, Figure 11). The skip input becomes ``alpha * x``
(alpha broadcast over channels), concatenated as in U-Net. The Sparse Attention U-Net is this network
trained with an L1 penalty on alpha (see :mod:`mri_models.losses`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mri_models.models.unet import Unet


def _conv1x1_in(in_chans: int, out_chans: int) -> nn.Sequential:
    """A 1x1 convolution followed by InstanceNorm2d.

    The convolution has no bias on purpose: InstanceNorm subtracts the per-channel spatial mean, which
    removes any constant bias exactly, so a bias would be a dead parameter (and would make our parameter
    count differ from the network that is actually trained).
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        nn.InstanceNorm2d(out_chans),
    )


class AttentionGate(nn.Module):
    """Additive attention gate producing one coefficient in (0, 1) per pixel of a skip connection."""

    def __init__(self, chans: int) -> None:
        """Build the gate.

        Args:
            chans: Channels C of both the skip features ``x`` and the gating features ``g``; the
                intermediate width is ``max(1, C // 2)``.
        """
        super().__init__()
        self.chans = chans
        self.inter_chans = max(1, chans // 2)
        self.w_g = _conv1x1_in(chans, self.inter_chans)
        self.w_x = _conv1x1_in(chans, self.inter_chans)
        # Not inplace: the sum is a fresh tensor anyway, and an inplace ReLU buys nothing here.
        self.relu = nn.ReLU()
        self.psi = _conv1x1_in(self.inter_chans, 1)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """Compute the attention coefficients.

        Args:
            x: Encoder skip features of shape ``(N, C, H, W)``.
            g: Decoder gating features of shape ``(N, C, H, W)``.

        Returns:
            alpha of shape ``(N, 1, H, W)`` with values in (0, 1).
        """
        return torch.sigmoid(self.psi(self.relu(self.w_g(g) + self.w_x(x))))


class AttentionUnet(Unet):
    """fastMRI's U-Net with an :class:`AttentionGate` on every skip connection.

    All U-Net parameters keep fastMRI's names; the gates live in the extra ``attention_gates``
    ModuleList, in decoder order like ``up_conv`` (deepest level first). A U-Net state dict therefore
    loads with ``strict=False`` and reports only ``attention_gates.*`` as missing.
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        chans: int = 32,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
    ) -> None:
        """Build the network.

        Args:
            in_chans: Number of channels of the input image.
            out_chans: Number of channels of the output image.
            chans: Number of output channels of the first convolution; doubles at every pooling.
            num_pool_layers: Number of down-sampling (and up-sampling) levels, one gate per level.
            drop_prob: Dropout2d probability inside every ConvBlock (the gates have no dropout).
        """
        super().__init__(in_chans, out_chans, chans, num_pool_layers, drop_prob)
        self.attention_gates = nn.ModuleList(AttentionGate(c) for c in self.skip_channels)

    def gate_skip(self, level: int, skip: Tensor, gating: Tensor) -> tuple[Tensor, Tensor]:
        """Weight the skip features by the attention coefficients of this level.

        Args:
            level: Up-sampling level in decoder order (0 = deepest).
            skip: Encoder features ``x`` of shape ``(N, C, H_l, W_l)``.
            gating: Decoder features ``g`` after the transpose convolution and padding, same shape.

        Returns:
            ``alpha * x`` and ``alpha`` of shape ``(N, 1, H_l, W_l)``.
        """
        alpha = self.attention_gates[level](skip, gating)
        return alpha * skip, alpha
