"""Cartesian under-sampling masks with fastMRI's call convention and random-number semantics.

A mask function is called as ``mask_func(shape, offset=None, seed=None)`` and returns
``(mask, num_low_frequencies)``: a float32 tensor shaped like ``shape`` with ones everywhere except the
column axis (``shape[-2]``, k-space given as (..., rows, cols, 2)). For the same constructor seed, call
sequence and per-call seed, every mask equals ``fastmri.data.subsample``'s exactly, because the same
NumPy ``RandomState`` draws happen in the same order: one draw to pick the (centre fraction,
acceleration) pair, then the draws of the outer columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

Seed = int | tuple[int, ...] | None


class MaskFunc:
    """Base class: a fully sampled centre block plus an acceleration pattern outside it.

    Args:
        center_fractions: fractions of low-frequency columns kept; one is chosen per call.
        accelerations: under-sampling factors, paired with ``center_fractions``.
        allow_any_combination: pick centre fraction and acceleration independently.
        seed: seed of the function's own RandomState (used when a call passes no seed).
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[int],
        allow_any_combination: bool = False,
        seed: int | None = None,
    ):
        if len(center_fractions) != len(accelerations) and not allow_any_combination:
            raise ValueError(
                f"center_fractions {list(center_fractions)} and accelerations {list(accelerations)} must "
                "have the same length unless allow_any_combination is set"
            )
        if not center_fractions or not accelerations:
            raise ValueError("center_fractions and accelerations must not be empty")
        self.center_fractions = list(center_fractions)
        self.accelerations = list(accelerations)
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState(seed)

    @contextmanager
    def _seeded(self, seed: Seed) -> Iterator[None]:
        """Draw from a RandomState seeded with ``seed`` for one call only, leaving the own stream untouched.

        A scratch RandomState stands in for ``self.rng`` during the call: ``RandomState.seed`` resets the
        whole state, so its draws equal those of re-seeding ``self.rng`` (fastMRI's ``temp_seed``), and the
        function's own stream is never touched, which saves the ``get_state``/``set_state`` copies of the
        624-word state, most of a seeded mask's cost (``benchmarks/README.md``, Measured without a script).
        """
        if seed is None:
            yield
            return
        scratch = getattr(self, "_scratch_rng", None)
        if scratch is None:
            scratch = self._scratch_rng = np.random.RandomState()
        scratch.seed(seed)
        own, self.rng = self.rng, scratch
        try:
            yield
        finally:
            self.rng = own

    def __call__(
        self, shape: Sequence[int], offset: int | None = None, seed: Seed = None
    ) -> tuple[torch.Tensor, int]:
        """Sample a mask for k-space of ``shape`` (at least 3-D: ..., rows, cols, complex).

        Args:
            shape: k-space shape; the mask varies along ``shape[-2]`` only.
            offset: first column of equispaced patterns (random when None).
            seed: per-call seed; the same seed always gives the same mask.

        Returns:
            The float32 mask tensor and the number of low-frequency columns.
        """
        if len(shape) < 3:
            raise ValueError(f"k-space shape {tuple(shape)} must have at least 3 dimensions")
        num_cols = int(shape[-2])
        columns, num_low = self.column_mask(num_cols, offset, seed)
        mask_shape = [1] * len(shape)
        mask_shape[-2] = num_cols
        return torch.from_numpy(columns.reshape(mask_shape)), num_low

    def column_mask(
        self, num_cols: int, offset: int | None = None, seed: Seed = None
    ) -> tuple[np.ndarray, int]:
        """The same mask as ``__call__`` (same draws, same stream), as a (num_cols,) float32 vector.

        Args:
            num_cols: number of k-space columns (phase-encoding lines).
            offset: first column of equispaced patterns (random when None).
            seed: per-call seed; the same seed always gives the same mask.

        Returns:
            The (num_cols,) float32 column mask and the number of low-frequency columns.
        """
        with self._seeded(seed):
            center_fraction, acceleration = self._choose_acceleration()
            num_low = round(num_cols * center_fraction)
            outer = self.outer_columns(num_cols, acceleration, offset, num_low)
        return np.maximum(centre_columns(num_cols, num_low), np.asarray(outer, dtype=np.float32)), num_low

    def _choose_acceleration(self) -> tuple[float, int]:
        if self.allow_any_combination:
            return self.rng.choice(self.center_fractions), self.rng.choice(self.accelerations)
        choice = self.rng.randint(len(self.center_fractions))
        return self.center_fractions[choice], self.accelerations[choice]

    def outer_columns(self, num_cols: int, acceleration: int, offset: int | None, num_low: int) -> np.ndarray:
        """The columns sampled outside the centre block (1 = sampled)."""
        raise NotImplementedError


def centre_columns(num_cols: int, num_low: int) -> np.ndarray:
    """A float32 column mask with ``num_low`` ones starting at ``(num_cols - num_low + 1) // 2``."""
    mask = np.zeros(num_cols, dtype=np.float32)
    start = (num_cols - num_low + 1) // 2
    mask[start : start + num_low] = 1
    return mask


class RandomMaskFunc(MaskFunc):
    """Outer columns kept independently with the probability that makes the expected rate ``1/acc``."""

    def outer_columns(self, num_cols: int, acceleration: int, offset: int | None, num_low: int) -> np.ndarray:
        keep_probability = (num_cols / acceleration - num_low) / (num_cols - num_low)
        return self.rng.uniform(size=num_cols) < keep_probability


class EquiSpacedMaskFunc(MaskFunc):
    """Every ``acceleration``-th column from ``offset``; the true rate is above ``1/acc`` with the centre."""

    def outer_columns(self, num_cols: int, acceleration: int, offset: int | None, num_low: int) -> np.ndarray:
        if offset is None:
            offset = self.rng.randint(0, high=round(acceleration))  # noqa: RUF057 (float accelerations)
        mask = np.zeros(num_cols, dtype=np.float32)
        mask[offset::acceleration] = 1
        return mask


class EquispacedMaskFractionFunc(MaskFunc):
    """Equispaced outer columns with the spacing adjusted so the overall rate is ``1/acc``.

    This is the pattern of the public fastMRI test data; like fastMRI's, the rounded positions are not
    always exactly equispaced.
    """

    def outer_columns(self, num_cols: int, acceleration: int, offset: int | None, num_low: int) -> np.ndarray:
        spacing = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
        if offset is None:
            offset = self.rng.randint(0, high=round(spacing))
        mask = np.zeros(num_cols)
        positions = np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)
        mask[positions] = 1.0
        return mask


MASK_TYPES: dict[str, type[MaskFunc]] = {
    "random": RandomMaskFunc,
    "equispaced": EquiSpacedMaskFunc,
    "equispaced_fraction": EquispacedMaskFractionFunc,
}


def create_mask_func(
    mask_type: str, center_fractions: Sequence[float], accelerations: Sequence[int], seed: int | None = None
) -> MaskFunc:
    """Build a mask function by name (``random``, ``equispaced``, ``equispaced_fraction``)."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; expected one of {sorted(MASK_TYPES)}")
    return MASK_TYPES[mask_type](center_fractions, accelerations, seed=seed)
