"""fastMRI's U-Net, re-implemented with the same architecture and state-dict keys.

The module layout (``down_sample_layers``, ``conv``, ``up_conv``, ``up_transpose_conv`` and the
``layers`` Sequentials inside the blocks) mirrors ``fastmri.models.Unet`` one to one, so fastMRI
checkpoints load strictly and give bit-identical outputs, and our checkpoints load into fastMRI.

The decoder calls :meth:`Unet.gate_skip` on every skip connection; the plain U-Net passes the skip
through unchanged, and :class:`~mri_models.models.attention_unet.AttentionUnet` overrides it with an
attention gate. Keeping one forward for both guarantees the shared parts really are the same network.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mri_models.models.registry import ImageOutput, register_model


class UnetOutput(NamedTuple):
    """What ``forward(image, return_attention=True)`` returns.

    All tuples are in decoder order: the deepest up-sampling level first, full resolution last. The
    plain U-Net has no attention, so its tuples are empty.

    Attributes:
        output: Reconstruction of shape ``(N, out_chans, H, W)``.
        attention_maps: Per level, attention coefficients of shape ``(N, 1, H_l, W_l)``, still attached
            to the autograd graph so a sparsity penalty on them trains the network.
        skip_norms_before: Per level, shape ``(N,)``: Frobenius norm of each example's skip features
            ``x`` over channels and pixels (detached: a metric, not a loss term).
        skip_norms_after: Per level, shape ``(N,)``: the same norm of ``alpha * x`` (detached).
    """

    output: Tensor
    attention_maps: tuple[Tensor, ...]
    skip_norms_before: tuple[Tensor, ...]
    skip_norms_after: tuple[Tensor, ...]


class ConvBlock(nn.Module):
    """Two (3x3 conv without bias, InstanceNorm, LeakyReLU(0.2), Dropout2d) stages, as in fastMRI."""

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float) -> None:
        """Build the block.

        Args:
            in_chans: Number of channels in the input.
            out_chans: Number of channels in the output.
            drop_prob: Dropout2d probability.
        """
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.drop_prob = drop_prob
        # Attribute name and Sequential indices are part of the checkpoint format: keep them.
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def forward(self, image: Tensor) -> Tensor:
        """Apply the block.

        Args:
            image: Tensor of shape ``(N, in_chans, H, W)``.

        Returns:
            Tensor of shape ``(N, out_chans, H, W)``.
        """
        return self.layers(image)


class TransposeConvBlock(nn.Module):
    """2x up-sampling: ConvTranspose2d(k=2, s=2, no bias), InstanceNorm, LeakyReLU(0.2), as in fastMRI."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        """Build the block.

        Args:
            in_chans: Number of channels in the input.
            out_chans: Number of channels in the output.
        """
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, image: Tensor) -> Tensor:
        """Apply the block.

        Args:
            image: Tensor of shape ``(N, in_chans, H, W)``.

        Returns:
            Tensor of shape ``(N, out_chans, 2H, 2W)``.
        """
        return self.layers(image)


def pad_to_skip(upsampled: Tensor, skip: Tensor) -> Tensor:
    """Reflect-pad ``upsampled`` by one pixel on the right/bottom where it is smaller than ``skip``.

    This is fastMRI's rule for odd sizes: average pooling floors, so after the transpose convolution
    the decoder map is at most one pixel short in each direction.

    Args:
        upsampled: Decoder features after the transpose convolution, ``(N, C, h, w)``.
        skip: Encoder features of the same level, ``(N, C, H, W)`` with ``H - h`` and ``W - w`` in {0, 1}.

    Returns:
        ``upsampled`` padded to ``(N, C, H, W)``.
    """
    # Python ints instead of fastMRI's torch.tensor(padding).sum(): same result, no graph break.
    pad_right = int(upsampled.shape[-1] != skip.shape[-1])
    pad_bottom = int(upsampled.shape[-2] != skip.shape[-2])
    if pad_right or pad_bottom:
        upsampled = F.pad(upsampled, [0, pad_right, 0, pad_bottom], "reflect")
    return upsampled


@register_model("unet", label="U-Net", provides=ImageOutput)
class Unet(nn.Module):
    """fastMRI's U-Net (Ronneberger et al., 2015, with instance norm and transpose-conv up-sampling)."""

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
            num_pool_layers: Number of down-sampling (and up-sampling) levels.
            drop_prob: Dropout2d probability inside every ConvBlock.

        Raises:
            ValueError: If a size is not positive or ``drop_prob`` is outside [0, 1].
        """
        super().__init__()
        for arg, value in (("in_chans", in_chans), ("out_chans", out_chans), ("chans", chans)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if num_pool_layers < 1:
            raise ValueError(f"num_pool_layers must be >= 1, got {num_pool_layers}")
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.chans = chans
        self.num_pool_layers = num_pool_layers
        self.drop_prob = drop_prob

        self.down_sample_layers = nn.ModuleList([ConvBlock(in_chans, chans, drop_prob)])
        ch = chans
        for _ in range(num_pool_layers - 1):
            self.down_sample_layers.append(ConvBlock(ch, ch * 2, drop_prob))
            ch *= 2
        self.conv = ConvBlock(ch, ch * 2, drop_prob)

        self.up_conv = nn.ModuleList()
        self.up_transpose_conv = nn.ModuleList()
        for _ in range(num_pool_layers - 1):
            self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
            self.up_conv.append(ConvBlock(ch * 2, ch, drop_prob))
            ch //= 2
        self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
        self.up_conv.append(
            nn.Sequential(
                ConvBlock(ch * 2, ch, drop_prob),
                nn.Conv2d(ch, out_chans, kernel_size=1, stride=1),
            )
        )

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the skip connections in decoder order (deepest level first)."""
        return tuple(self.chans * 2**level for level in reversed(range(self.num_pool_layers)))

    def gate_skip(self, level: int, skip: Tensor, gating: Tensor) -> tuple[Tensor, Tensor | None]:
        """Transform a skip connection before concatenation; the plain U-Net passes it through.

        Args:
            level: Up-sampling level in decoder order (0 = deepest).
            skip: Encoder features ``x`` of shape ``(N, C, H_l, W_l)``.
            gating: Decoder features ``g`` after the transpose convolution and padding, same shape.

        Returns:
            The skip input to concatenate and the attention map ``(N, 1, H_l, W_l)``, or None.
        """
        del level, gating
        return skip, None

    @overload
    def forward(self, image: Tensor, return_attention: Literal[False] = False) -> Tensor: ...

    @overload
    def forward(self, image: Tensor, return_attention: Literal[True]) -> UnetOutput: ...

    def forward(self, image: Tensor, return_attention: bool = False) -> Tensor | UnetOutput:
        """Run the network.

        Args:
            image: Tensor of shape ``(N, in_chans, H, W)``; odd ``H``/``W`` are handled by reflect padding.
            return_attention: Also return the attention maps and skip-connection norms.

        Returns:
            The output tensor ``(N, out_chans, H, W)``, or a :class:`UnetOutput` when
            ``return_attention`` is true. Nothing is stored on the module, so DDP and
            ``torch.compile`` see a pure function.
        """
        stack = []
        output = image
        for layer in self.down_sample_layers:
            output = layer(output)
            stack.append(output)
            output = F.avg_pool2d(output, kernel_size=2, stride=2, padding=0)
        output = self.conv(output)

        maps: list[Tensor] = []
        norms_before: list[Tensor] = []
        norms_after: list[Tensor] = []
        for level, (transpose_conv, conv) in enumerate(
            zip(self.up_transpose_conv, self.up_conv, strict=True)
        ):
            skip = stack.pop()
            output = pad_to_skip(transpose_conv(output), skip)
            gated, alpha = self.gate_skip(level, skip, output)
            if return_attention and alpha is not None:
                maps.append(alpha)
                # Norms are logged for MPAND only; detaching keeps them out of any loss by accident.
                norms_before.append(torch.linalg.vector_norm(skip.detach().flatten(1), dim=1))
                norms_after.append(torch.linalg.vector_norm(gated.detach().flatten(1), dim=1))
            output = conv(torch.cat([output, gated], dim=1))

        if not return_attention:
            return output
        return UnetOutput(output, tuple(maps), tuple(norms_before), tuple(norms_after))
