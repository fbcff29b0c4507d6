"""Sparse Attention U-Net: the Attention U-Net trained with the L1 penalty on its attention coefficients.

Not a network of its own: the paper's third arm is :class:`~mri_models.models.attention_unet.AttentionUnet`
trained with the ``attention_l1`` penalty term of :mod:`mri_models.losses`, whose weight is ``gamma``.
With ``gamma = 0`` it is exactly the Attention U-Net.
"""

from mri_models.models.registry import register_variant

register_variant(
    "sparse_attention_unet",
    architecture="attention_unet",
    penalty="attention_l1",
    label="Sparse Attention U-Net",
)
