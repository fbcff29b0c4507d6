"""What the attention gates do, measured on validation: MPAND and the coefficients' distribution.

Levels are numbered from the finest: **level 1 is the full-resolution skip connection**, level L the
deepest. The networks return their per-level tuples in decoder order (deepest first); everything here takes
them in that order and returns them finest first.

MPAND (Mean Post Attention Norm Difference), per level l and example b, with ``x`` the skip features and
``alpha`` the coefficients:

- *relative* (the primary form): ``100 * (||alpha_b^l x_b^l||_F / ||x_b^l||_F - 1)``, the percentage by
  which attention shrinks the skip's norm, in (-100, 0) since alpha lies in (0, 1). It does not depend on
  the features' scale, which the architecture sets.
- *absolute* (the paper's Section 4.1): ``||alpha_b^l x_b^l||_F - ||x_b^l||_F``, in feature units.

Each is averaged over examples per level, then over levels.

The coefficient statistics (:class:`AttentionStatsAccumulator`) are, per level and over all levels pooled:
the mean, the 10/50/90% quantiles (from a histogram of :data:`ALPHA_BINS` bins over [0, 1], linearly
interpolated within a bin), the fractions below :data:`LOW` and above :data:`HIGH`, and the penalty P of
the paper's L1 term (the mean per-example sum of coefficients; overall, the mean of the levels' P, as
:func:`mri_models.losses.attention_sparsity_penalty` defines it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

ALPHA_BINS = 1000
LOW, HIGH = 0.1, 0.9
QUANTILES = (0.1, 0.5, 0.9)


def finest_first(per_level: Sequence[Any]) -> list[Any]:
    """Per-level values in decoder order (deepest first, as the networks return them), finest first."""
    return list(reversed(per_level))


def _flat64(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


# --- MPAND ----------------------------------------------------------------------------------------------


class MpandResult(NamedTuple):
    """MPAND of a set of examples; per level finest first; NaN and empty without attention levels.

    Attributes:
        relative: Mean over levels of the relative form, in percent (the primary MPAND).
        relative_per_level: The relative form per level.
        absolute: Mean over levels of the paper's absolute form, in feature units.
        absolute_per_level: The absolute form per level.
    """

    relative: float
    relative_per_level: tuple[float, ...]
    absolute: float
    absolute_per_level: tuple[float, ...]


def _per_level_terms(
    skip_norms_before: Sequence[ArrayLike], skip_norms_after: Sequence[ArrayLike]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per level, finest first: the per-example absolute differences and relative changes (percent;
    examples whose skip features are all zero have no relative change and are left out of it)."""
    if len(skip_norms_before) != len(skip_norms_after):
        raise ValueError(
            f"{len(skip_norms_before)} levels of norms before attention but {len(skip_norms_after)} after"
        )
    terms = []
    for level, (before, after) in enumerate(zip(skip_norms_before, skip_norms_after, strict=True)):
        before64, after64 = _flat64(before), _flat64(after)
        if before64.shape != after64.shape:
            raise ValueError(f"level {level}: {before64.size} norms before attention, {after64.size} after")
        nonzero = before64 > 0
        relative = 100.0 * (after64[nonzero] / before64[nonzero] - 1.0)
        terms.append((after64 - before64, relative))
    return finest_first(terms)


def _result(relative: Sequence[float], absolute: Sequence[float]) -> MpandResult:
    if not absolute:
        return MpandResult(math.nan, (), math.nan, ())
    return MpandResult(float(np.mean(relative)), tuple(relative), float(np.mean(absolute)), tuple(absolute))


def mpand(skip_norms_before: Sequence[ArrayLike], skip_norms_after: Sequence[ArrayLike]) -> MpandResult:
    """MPAND of one batch.

    Args:
        skip_norms_before: Per level in decoder order, ``(N,)`` norms ``||x_b^l||_F``.
        skip_norms_after: Per level in decoder order, ``(N,)`` norms ``||alpha_b^l x_b^l||_F``.

    Returns:
        Both forms, per level (finest first) and averaged over levels.
    """
    terms = _per_level_terms(skip_norms_before, skip_norms_after)
    relative = [float(np.mean(r)) if r.size else math.nan for _, r in terms]
    return _result(relative, [float(np.mean(d)) for d, _ in terms])


class MpandAccumulator:
    """MPAND over many batches and processes: the mean over all examples seen, per level.

    Sums per-example terms and counts per level, so unequal batch sizes weigh correctly and states from
    several processes merge exactly. Every batch must report the same number of levels.
    """

    _FIELDS = ("absolute", "relative", "count", "relative_count")

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] | None = None

    def _ensure_levels(self, num_levels: int) -> dict[str, list[float]]:
        if self._sums is None:
            self._sums = {name: [0.0] * num_levels for name in self._FIELDS}
        elif len(self._sums["count"]) != num_levels:
            raise ValueError(
                f"got {num_levels} attention levels, earlier batches had {len(self._sums['count'])}"
            )
        return self._sums

    def add(self, skip_norms_before: Sequence[ArrayLike], skip_norms_after: Sequence[ArrayLike]) -> None:
        """Record one batch (per level in decoder order, ``(N,)`` norms before and after attention)."""
        terms = _per_level_terms(skip_norms_before, skip_norms_after)
        if not terms:
            return
        sums = self._ensure_levels(len(terms))
        for level, (difference, relative) in enumerate(terms):
            for name, value in zip(
                self._FIELDS, (difference.sum(), relative.sum(), difference.size, relative.size), strict=True
            ):
                sums[name][level] += float(value)

    def state(self) -> dict[str, Any]:
        """A picklable plain-Python snapshot, to gather from other processes and :meth:`merge`."""
        return {"sums": None if self._sums is None else {k: list(v) for k, v in self._sums.items()}}

    def merge(self, other_state: Mapping[str, Any] | MpandAccumulator) -> None:
        """Add another accumulator (or its :meth:`state`)."""
        if isinstance(other_state, MpandAccumulator):
            other_state = other_state.state()
        other = other_state["sums"]
        if other is None:
            return
        sums = self._ensure_levels(len(other["count"]))
        for name in self._FIELDS:
            sums[name] = [a + float(b) for a, b in zip(sums[name], other[name], strict=True)]

    def compute(self) -> MpandResult:
        """MPAND of everything recorded; NaN and no levels when nothing (or only a plain U-Net) was."""
        sums = self._sums
        if not sums or not all(sums["count"]):
            return MpandResult(math.nan, (), math.nan, ())
        relative = [
            total / count if count else math.nan
            for total, count in zip(sums["relative"], sums["relative_count"], strict=True)
        ]
        absolute = [total / count for total, count in zip(sums["absolute"], sums["count"], strict=True)]
        return _result(relative, absolute)


# --- the coefficients' distribution ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoefficientStats:
    """The distribution of attention coefficients at one level (or pooled over levels).

    Attributes:
        mean: Mean coefficient.
        q10: 10% quantile.
        q50: Median.
        q90: 90% quantile.
        below: Fraction of coefficients below :data:`LOW` (switched off).
        above: Fraction above :data:`HIGH` (passed through).
        penalty: The L1 term's P: mean per-example sum of the coefficients (pooled: the mean of the levels').
    """

    mean: float
    q10: float
    q50: float
    q90: float
    below: float
    above: float
    penalty: float

    def as_report(self, suffix: str = "") -> dict[str, float]:
        """Report keys: ``alpha_mean<suffix>``, ``alpha_q10<suffix>``, ..., ``alpha_below_0_1<suffix>``."""
        names = {"below": f"below_{LOW:g}", "above": f"above_{HIGH:g}"}
        values = {names.get(k, k).replace(".", "_"): v for k, v in self.__dict__.items() if k != "penalty"}
        return {f"alpha_{name}{suffix}": float(value) for name, value in values.items()}


def report_keys(num_levels: int) -> list[str]:
    """Every coefficient-statistic key of an epoch report: pooled, then per level (finest first)."""
    empty = CoefficientStats(*([math.nan] * 7))
    keys = list(empty.as_report())
    for level in range(1, num_levels + 1):
        keys += list(empty.as_report(f"_level_{level}"))
    return keys


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of values in [0, 1] from their histogram over equal bins, linear within a bin."""
    total = counts.sum()
    if total <= 0:
        return math.nan
    cumulative = np.cumsum(counts)
    target = q * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    index = min(index, len(counts) - 1)
    below = cumulative[index - 1] if index > 0 else 0.0
    within = (target - below) / counts[index] if counts[index] > 0 else 0.0
    return float((index + within) / len(counts))


@dataclass(frozen=True)
class AttentionStats:
    """Coefficient statistics of a validation pass.

    Attributes:
        pooled: Over every coefficient of every level.
        levels: Per level, finest first.
        histograms: Per level, finest first, the counts over :data:`ALPHA_BINS` equal bins of [0, 1].
    """

    pooled: CoefficientStats
    levels: tuple[CoefficientStats, ...]
    histograms: tuple[np.ndarray, ...]

    def as_report(self, num_levels: int) -> dict[str, float]:
        """:func:`report_keys` with values (NaN for levels the network does not have)."""
        report = dict.fromkeys(report_keys(num_levels), math.nan)
        if self.levels:
            report.update(self.pooled.as_report())
        for level, stats in enumerate(self.levels[:num_levels], start=1):
            report.update(stats.as_report(f"_level_{level}"))
        return report


class AttentionStatsAccumulator:
    """Coefficient statistics over many batches and processes; states merge exactly."""

    _SCALARS = ("sum", "count", "below", "above", "examples")

    def __init__(self) -> None:
        self._levels: list[dict[str, Any]] | None = None

    def _ensure_levels(self, num_levels: int) -> list[dict[str, Any]]:
        if self._levels is None:
            self._levels = [
                {**dict.fromkeys(self._SCALARS, 0.0), "histogram": np.zeros(ALPHA_BINS)}
                for _ in range(num_levels)
            ]
        elif len(self._levels) != num_levels:
            raise ValueError(f"got {num_levels} attention levels, earlier batches had {len(self._levels)}")
        return self._levels

    def add(self, attention_maps: Sequence[torch.Tensor]) -> None:
        """Record one batch: per level in decoder order, coefficients ``(N, 1, H_l, W_l)``."""
        if not attention_maps:
            return
        levels = self._ensure_levels(len(attention_maps))
        for record, alpha in zip(levels, finest_first(attention_maps), strict=True):
            alpha = alpha.detach().float()
            record["sum"] += float(alpha.sum(dtype=torch.float64))
            record["count"] += alpha.numel()
            record["below"] += float((alpha < LOW).sum())
            record["above"] += float((alpha > HIGH).sum())
            record["examples"] += alpha.shape[0]
            record["histogram"] += (
                torch.histc(alpha, bins=ALPHA_BINS, min=0.0, max=1.0).cpu().double().numpy()
            )

    def state(self) -> dict[str, Any]:
        """A picklable snapshot, to gather from other processes and :meth:`merge`."""
        if self._levels is None:
            return {"levels": None}
        return {"levels": [{**r, "histogram": r["histogram"].copy()} for r in self._levels]}

    def merge(self, other_state: Mapping[str, Any] | AttentionStatsAccumulator) -> None:
        """Add another accumulator (or its :meth:`state`)."""
        if isinstance(other_state, AttentionStatsAccumulator):
            other_state = other_state.state()
        if other_state["levels"] is None:
            return
        for record, other in zip(
            self._ensure_levels(len(other_state["levels"])), other_state["levels"], strict=True
        ):
            for name in (*self._SCALARS, "histogram"):
                record[name] = record[name] + other[name]

    @staticmethod
    def _stats(records: Sequence[dict[str, Any]]) -> CoefficientStats:
        histogram = sum(r["histogram"] for r in records)
        count = sum(r["count"] for r in records)
        quantiles = [histogram_quantile(histogram, q) for q in QUANTILES]
        penalty = float(np.mean([r["sum"] / r["examples"] for r in records]))
        below, above = (sum(r[k] for r in records) / count for k in ("below", "above"))
        return CoefficientStats(sum(r["sum"] for r in records) / count, *quantiles, below, above, penalty)

    def compute(self) -> AttentionStats:
        """The statistics of everything recorded (empty levels and NaN without attention)."""
        if not self._levels or not all(r["count"] for r in self._levels):
            return AttentionStats(CoefficientStats(*([math.nan] * 7)), (), ())
        levels = tuple(self._stats([r]) for r in self._levels)
        histograms = tuple(r["histogram"].copy() for r in self._levels)
        return AttentionStats(self._stats(self._levels), levels, histograms)
