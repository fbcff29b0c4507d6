"""Attention U-Net: fastMRI's U-Net with an attention gate on every skip connection.

At up-sampling level l, with ``x`` the encoder skip features (C channels) and ``g`` the decoder features
after the transpose convolution and padding (same size, C channels)::

    alpha = sigmoid(IN(psi(relu(IN(W_g g) + IN(W_x x)))))

with ``W_g``, ``W_x`` 1x1 convolutions to ``max(1, C // 2)`` channels, ``psi`` a 1x1 convolution to one
channel and IN = InstanceNorm2d (paper appendix, Figure 11). The skip input becomes ``alpha * x``
(alpha broadcast over channels), concatenated as in U-Net. The Sparse Attention U-Net is this network
trained with an L1 penalty on alpha (:mod:`mri_models.models.sparse_attention_unet`).

What follows ``psi`` is the architecture's hyper-parameter ``psi_norm`` (:data:`PSI_NORMS`):

- ``instance`` (the default): the paper's InstanceNorm2d without affine parameters. It gives every image's
  logits mean 0 and variance 1 whatever the weights, which bounds the coefficients' mean from below: over
  *any* logits, mean ``sigmoid(IN(z))`` is at least :data:`INSTANCE_NORM_FLOOR` (``docs/attention.md``), so
  an L1 penalty on alpha can only reshape the coefficients, never make them sparse.
- ``instance_affine``: the same norm with a learned scale and shift, which can move the logits anywhere.
- ``none``: Oktay et al.'s gate, ``psi`` with a bias and no norm.

The gate keeps the layers as modules (``w_g``, ``w_x``, ``psi``: a bias-free 1x1 convolution and an
InstanceNorm2d each, so printing the model shows Figure 11 and checkpoints keep their keys) but its
forward evaluates them functionally: the 1x1 convolutions as matrix products and the instance norms as
one batch-norm kernel call each. The mathematics is unchanged and the gate is cheaper on CPU, where
per-call set-up dominates these thin shapes (``benchmarks/README.md``, Measured without a script).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mri_models.models.registry import AttentionOutput, register_model
from mri_models.models.unet import Unet


def _conv1x1(weight: Tensor, features: Tensor) -> Tensor:
    """A bias-free 1x1 convolution as a matrix product over the flattened pixels.

    A 1x1 convolution is ``weight (O, C) @ features (C, H*W)`` per example. The gates' convolutions are
    thin (C/2 or one output channel) and a small share of the network's FLOPs, and for such shapes
    oneDNN's convolution, and above all its backward, spends far more time on set-up and layout than on
    arithmetic; a BLAS ``mm`` does the same work without that set-up (``benchmarks/README.md``, Measured
    without a script).

    Args:
        weight: Convolution weight of shape ``(O, C, 1, 1)``.
        features: Tensor of shape ``(N, C, P)``: the ``(N, C, H, W)`` features flattened over pixels.

    Returns:
        ``conv2d`` of the features with ``weight``, shape ``(N, O, P)``.
    """
    matrix = weight.view(weight.shape[0], features.shape[1])
    if features.shape[0] == 1:
        # fastMRI trains with batch size 1: a plain 2-D mm, no broadcast weight or batched matmul (whose
        # backward would expand the weight and copy). A view, not ``features[0]``: the backward of a
        # ``select`` materialises a zero-filled (1, C, P) tensor and copies the gradient into it, two
        # extra passes over the plane per product, 6 fills + 6 copies per level (their cost:
        # benchmarks/README.md, Measured without a script).
        return torch.mm(matrix, features.view(features.shape[1], -1)).unsqueeze(0)
    return torch.matmul(matrix, features)


def _instance_norm(flat: Tensor, eps: float) -> Tensor:
    """InstanceNorm2d without affine parameters on ``(N, C, P)`` features flattened over the pixels P.

    ``F.instance_norm`` does exactly this (it views the input as one batch of N*C channels and calls
    batch norm in training mode), plus argument checks and repeats of absent running statistics; calling
    the batch norm kernel on the view directly skips that per-call work.

    Args:
        flat: Tensor of shape ``(N, C, P)``.
        eps: The InstanceNorm2d ``eps``.

    Returns:
        Each ``(n, c)`` row minus its mean, divided by ``sqrt(biased variance + eps)``, shape ``(N, C, P)``.
    """
    batch, chans, pixels = flat.shape
    rows = flat.reshape(1, batch * chans, pixels)
    return F.batch_norm(rows, None, None, training=True, eps=eps).view(batch, chans, pixels)


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


PsiNorm = Literal["instance", "instance_affine", "none"]
PSI_NORMS: tuple[str, ...] = get_args(PsiNorm)

# The least mean of sigmoid(u) over distributions of u with mean 0 and variance 1, which is what the
# paper's gate feeds its sigmoid: 0.469790, reached by 6.44% of the pixels at u = +3.81 and the rest at
# -0.262 (docs/attention.md derives it; tests/test_models.py checks it). The norm's eps makes the variance
# slightly smaller than 1, which only raises the floor.
INSTANCE_NORM_FLOOR = 0.46979


def _psi(in_chans: int, psi_norm: str) -> nn.Sequential:
    """``psi``: the 1x1 convolution to one channel and what follows it (see the module docstring)."""
    if psi_norm == "none":
        return nn.Sequential(nn.Conv2d(in_chans, 1, kernel_size=1, bias=True))
    if psi_norm not in PSI_NORMS:
        raise ValueError(f"psi_norm must be one of {', '.join(PSI_NORMS)}, got {psi_norm!r}")
    return nn.Sequential(
        nn.Conv2d(in_chans, 1, kernel_size=1, bias=False),
        nn.InstanceNorm2d(1, affine=psi_norm == "instance_affine"),
    )


class AttentionGate(nn.Module):
    """Additive attention gate producing one coefficient in (0, 1) per pixel of a skip connection."""

    def __init__(self, chans: int, psi_norm: PsiNorm = "instance") -> None:
        """Build the gate.

        Args:
            chans: Channels C of both the skip features ``x`` and the gating features ``g``; the
                intermediate width is ``max(1, C // 2)``.
            psi_norm: What follows ``psi`` before the sigmoid, one of :data:`PSI_NORMS`.
        """
        super().__init__()
        self.chans = chans
        self.inter_chans = max(1, chans // 2)
        self.psi_norm = psi_norm
        self.w_g = _conv1x1_in(chans, self.inter_chans)
        self.w_x = _conv1x1_in(chans, self.inter_chans)
        self.psi = _psi(self.inter_chans, psi_norm)

    def coefficients(self, psi_output: Tensor) -> Tensor:
        """The coefficients from ``psi``'s convolution output: its norm (or bias), then the sigmoid.

        Args:
            psi_output: The 1x1 convolution's output, ``(N, 1, P)`` over the flattened pixels (bias-free).

        Returns:
            alpha, ``(N, 1, P)``, in (0, 1).
        """
        if self.psi_norm == "none":
            return torch.sigmoid(psi_output + self.psi[0].bias.view(1, 1, 1))
        norm = self.psi[1]
        logits = _instance_norm(psi_output, norm.eps)
        if norm.affine:
            logits = logits * norm.weight.view(1, 1, 1) + norm.bias.view(1, 1, 1)
        return torch.sigmoid(logits)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """Compute the attention coefficients.

        Equal to ``sigmoid(psi(relu(w_g(g) + w_x(x))))`` with the modules called in turn, within float32
        rounding, but computed with the same parameters through :func:`_conv1x1` and
        :func:`_instance_norm`: the gates are small, memory-bound work, where per-call set-up dominates.
        Forward hooks on the submodules therefore do not fire.

        Args:
            x: Encoder skip features of shape ``(N, C, H, W)``.
            g: Decoder gating features of shape ``(N, C, H, W)``.

        Returns:
            alpha of shape ``(N, 1, H, W)`` with values in (0, 1).
        """
        batch, chans, height, width = x.shape
        # Views for contiguous inputs (what the U-Net passes); reshape copies only otherwise.
        x_flat, g_flat = x.reshape(batch, chans, -1), g.reshape(batch, chans, -1)
        (conv_g, norm_g), (conv_x, norm_x) = self.w_g, self.w_x
        hidden = _instance_norm(_conv1x1(conv_g.weight, g_flat), norm_g.eps) + _instance_norm(
            _conv1x1(conv_x.weight, x_flat), norm_x.eps
        )
        # In place on the fresh sum (not a view, not saved by the add's backward): one buffer less.
        hidden = torch.relu_(hidden)
        alpha = self.coefficients(_conv1x1(self.psi[0].weight, hidden))
        return alpha.view(batch, 1, height, width)


@register_model("attention_unet", label="Attention U-Net", provides=AttentionOutput)
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
        psi_norm: PsiNorm = "instance",
    ) -> None:
        """Build the network.

        Args:
            in_chans: Number of channels of the input image.
            out_chans: Number of channels of the output image.
            chans: Number of output channels of the first convolution; doubles at every pooling.
            num_pool_layers: Number of down-sampling (and up-sampling) levels, one gate per level.
            drop_prob: Dropout2d probability inside every ConvBlock (the gates have no dropout).
            psi_norm: What follows every gate's ``psi`` (:data:`PSI_NORMS`): the paper's ``instance``,
                ``instance_affine`` or Oktay et al.'s ``none``. A configuration key of its own (``--set
                psi_norm=none``), as every hyper-parameter an architecture declares beyond the U-Net's.
        """
        super().__init__(in_chans, out_chans, chans, num_pool_layers, drop_prob)
        self.attention_gates = nn.ModuleList(AttentionGate(c, psi_norm) for c in self.skip_channels)

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
