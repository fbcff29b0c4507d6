"""Evaluation metrics: NMSE, PSNR and SSIM exactly as fastMRI defines them, and the metric table.

Two ways to compute the image metrics:

- whole volumes (:func:`nmse`, :func:`psnr`, :func:`ssim`), the definitions of ``fastmri.evaluate``;
- per slice (:func:`slice_metrics`) gathered in a :class:`VolumeMetricAccumulator`, for distributed
  validation where the slices of one volume are spread over workers. Per volume it combines them as
  fastMRI's MriModule does, which equals the whole-volume definitions; the volume values are then averaged
  over volumes.

The table of :class:`Metric` entries (:func:`metric_table`, like fastMRI's ``METRIC_FUNCS``) is what the
trainer reports every epoch and what the analysis tabulates and plots: adding a metric is one
:func:`register_metric` entry.

What the attention gates do (MPAND, the coefficients' distribution) is measured in
:mod:`mri_models.attention_metrics`.

Everything here works on NumPy arrays or CPU/GPU tensors and returns plain Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mri_models.named_registry import Registry

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(array: ArrayLike) -> np.ndarray:
    """A NumPy view of ``array`` in its own dtype (tensors are detached and moved to the CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_volumes(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.ndim != 3:
        raise ValueError(f"expected a volume of shape (slices, H, W), got shape {gt.shape}")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} != prediction shape {pred.shape}")


# --- whole volumes, as fastmri.evaluate ---------------------------------------------------------------


def nmse(gt: ArrayLike, pred: ArrayLike) -> float:
    """Normalised mean squared error ``||gt - pred||^2 / ||gt||^2`` over the whole volume.

    Computed in float64; fastMRI computes in the input precision, so the two differ by its rounding.

    Args:
        gt: Ground-truth volume ``(slices, H, W)``.
        pred: Reconstruction of the same shape.
    """
    gt64, pred64 = _to_numpy(gt).astype(np.float64), _to_numpy(pred).astype(np.float64)
    _check_volumes(gt64, pred64)
    return float(np.sum((gt64 - pred64) ** 2) / np.sum(gt64**2))


def psnr(gt: ArrayLike, pred: ArrayLike, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio of the volume (scikit-image's, as fastMRI).

    Args:
        gt: Ground-truth volume ``(slices, H, W)``.
        pred: Reconstruction of the same shape.
        maxval: Data range; defaults to ``gt.max()``, the volume's maximum.
    """
    gt_np, pred_np = _to_numpy(gt), _to_numpy(pred)
    _check_volumes(gt_np, pred_np)
    maxval = gt_np.max() if maxval is None else maxval
    return float(peak_signal_noise_ratio(gt_np, pred_np, data_range=maxval))


def ssim(gt: ArrayLike, pred: ArrayLike, maxval: float | None = None) -> float:
    """Structural similarity averaged over slices (scikit-image's 7x7 window, K1 0.01, K2 0.03).

    Args:
        gt: Ground-truth volume ``(slices, H, W)``.
        pred: Reconstruction of the same shape.
        maxval: Data range used for every slice; defaults to ``gt.max()`` of the whole volume (not of
            each slice), as fastMRI.
    """
    gt_np, pred_np = _to_numpy(gt), _to_numpy(pred)
    _check_volumes(gt_np, pred_np)
    maxval = gt_np.max() if maxval is None else maxval
    values = [structural_similarity(g, p, data_range=maxval) for g, p in zip(gt_np, pred_np, strict=True)]
    return float(np.mean(values))


# --- the metric table -----------------------------------------------------------------------------------

SliceStats = dict[str, float]


@dataclass(frozen=True)
class Metric:
    """One image-quality metric, as fastMRI's ``METRIC_FUNCS`` entry plus what reports need.

    A volume metric is computed from per-slice sufficient statistics, so slices may be spread over
    processes: ``slice_stats`` maps one slice to named floats, ``volume`` combines the statistics of all
    slices of a volume (arrays in slice order) and the volume's max into the volume's value; the epoch
    value is the mean over volumes, as ``fastmri.evaluate``.

    Attributes:
        name: Its column in every report and table.
        slice_stats: ``(target, output, max_value) -> {statistic: value}`` of one un-normalised slice.
        volume: ``(statistics as arrays, max_value) -> value`` of one volume.
        label: Display name (axis labels, table headers).
        fmt: Format spec for tables (``".4f"``).
        higher_is_better: The direction of improvement.
    """

    name: str
    slice_stats: Callable[[np.ndarray, np.ndarray, float], SliceStats]
    volume: Callable[[Mapping[str, np.ndarray], float], float]
    label: str
    fmt: str
    higher_is_better: bool


_METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the table; every report, table and curve then carries it."""
    return _METRICS.add(metric.name, metric)


def unregister_metric(name: str) -> None:
    """Remove a metric (tests and interactive sessions)."""
    _METRICS.remove(name)


def metric_table() -> dict[str, Metric]:
    """The registered metrics by name, in registration order (fastMRI's: NMSE, PSNR, SSIM)."""
    return _METRICS.as_dict()


# The metric the study is judged by: ASHA's objective, the "best epoch" and the sort order of tables.
PRIMARY_METRIC = "ssim"


@dataclass(frozen=True)
class Objective:
    """A metric to optimise and its direction.

    Attributes:
        metric: The metric's name, its key in every report.
        mode: ``max`` or ``min``, as Tune's ``TuneConfig`` and Train's ``CheckpointConfig`` take it.
    """

    metric: str
    mode: Literal["max", "min"]

    @property
    def sign(self) -> float:
        """+1 when larger is better, else -1: the best of some values is the largest ``sign * value``."""
        return 1.0 if self.mode == "max" else -1.0


def primary_objective() -> Objective:
    """:data:`PRIMARY_METRIC` in the direction its entry of :func:`metric_table` gives."""
    better = "max" if metric_table()[PRIMARY_METRIC].higher_is_better else "min"
    return Objective(PRIMARY_METRIC, better)


def _squared_error(target: np.ndarray, output: np.ndarray, max_value: float) -> SliceStats:
    del max_value
    target64, output64 = target.astype(np.float64), output.astype(np.float64)
    return {"mse": float(np.mean((target64 - output64) ** 2)), "target_sq": float(np.mean(target64**2))}


def _structural_similarity(target: np.ndarray, output: np.ndarray, max_value: float) -> SliceStats:
    # On the arrays in their own dtype, exactly as fastMRI's MriModule passes them to evaluate.ssim.
    return {"ssim": float(structural_similarity(target, output, data_range=float(max_value)))}


def _volume_psnr(stats: Mapping[str, np.ndarray], max_value: float) -> float:
    mse = float(np.mean(stats["mse"]))
    return math.inf if mse == 0 else 20 * math.log10(max_value) - 10 * math.log10(mse)


# Per volume these equal the whole-volume definitions above (mean slice MSE over mean squared target, PSNR
# from the mean MSE and the volume max, mean slice SSIM) because all slices of a volume have the same size.
register_metric(
    Metric(
        "nmse",
        _squared_error,
        lambda stats, max_value: float(np.mean(stats["mse"]) / np.mean(stats["target_sq"])),
        label="NMSE",
        fmt=".4f",
        higher_is_better=False,
    )
)
register_metric(Metric("psnr", _squared_error, _volume_psnr, "PSNR (dB)", ".2f", higher_is_better=True))
register_metric(
    Metric(
        "ssim",
        _structural_similarity,
        lambda stats, max_value: float(np.mean(stats["ssim"])),
        label="SSIM",
        fmt=".4f",
        higher_is_better=True,
    )
)


# --- per slice, for distributed validation ------------------------------------------------------------


def _as_slice(array: ArrayLike, name: str) -> np.ndarray:
    image = _to_numpy(array)
    while image.ndim > 2 and image.shape[0] == 1:  # accept (1, H, W) and (1, 1, H, W) too
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"{name} must be one slice (H, W), got shape {_to_numpy(array).shape}")
    return image


def slice_metrics(output: ArrayLike, target: ArrayLike, max_value: float) -> SliceStats:
    """The sufficient statistics of every registered metric for one un-normalised slice.

    Args:
        output: Reconstruction ``(H, W)`` (leading singleton dimensions are dropped).
        target: Target of the same shape.
        max_value: The volume's maximum (``attrs["max"]``), the data range of PSNR and SSIM.

    Returns:
        Statistic name -> float (``mse``, ``target_sq``, ``ssim`` for fastMRI's metrics).
    """
    out, tgt = _as_slice(output, "output"), _as_slice(target, "target")
    if out.shape != tgt.shape:
        raise ValueError(f"output shape {out.shape} != target shape {tgt.shape}")
    stats: SliceStats = {}
    for function in dict.fromkeys(metric.slice_stats for metric in metric_table().values()):
        stats.update(function(tgt, out, float(max_value)))
    return stats


class VolumeMetricAccumulator:
    """Gathers per-slice statistics from any number of processes and computes the volume metrics.

    Slices may arrive in any order. A repeated ``(fname, slice_num)`` counts once (the later value
    replaces the earlier), because distributed samplers pad the last batch with duplicate slices.
    """

    def __init__(self) -> None:
        self._slices: dict[str, dict[int, SliceStats]] = {}
        self._max_values: dict[str, float] = {}

    def __len__(self) -> int:
        """Number of distinct slices gathered."""
        return sum(len(slices) for slices in self._slices.values())

    def add(self, fname: str, slice_num: int, stats: Mapping[str, float], max_value: float) -> None:
        """Record one slice.

        Args:
            fname: Volume file name (the key that groups slices into volumes).
            slice_num: Index of the slice in its volume.
            stats: The slice's :func:`slice_metrics`.
            max_value: The volume's maximum (``attrs["max"]``).

        Raises:
            ValueError: If the volume was seen before with a different max value.
        """
        fname, max_value = str(fname), float(max_value)
        known = self._max_values.get(fname)
        # isclose, not ==: the same attrs["max"] may arrive as float32 on one path and float64 on another.
        if known is not None and not math.isclose(known, max_value, rel_tol=1e-6):
            raise ValueError(f"volume {fname!r} has max value {known} and now {max_value}")
        self._max_values.setdefault(fname, max_value)
        self._slices.setdefault(fname, {})[int(slice_num)] = {k: float(v) for k, v in stats.items()}

    def add_slices(
        self,
        fnames: Sequence[str],
        slice_nums: Sequence[int],
        outputs: Sequence[ArrayLike],
        targets: Sequence[ArrayLike],
        max_values: Sequence[float],
    ) -> None:
        """Record a batch of un-normalised slices: :func:`slice_metrics` of each, then :meth:`add`."""
        for fname, slice_num, output, target, max_value in zip(
            fnames, slice_nums, outputs, targets, max_values, strict=True
        ):
            self.add(fname, int(slice_num), slice_metrics(output, target, float(max_value)), float(max_value))

    def state(self) -> dict[str, Any]:
        """A picklable plain-Python snapshot, to gather from other processes and :meth:`merge`."""
        return {
            "slices": {fname: dict(slices) for fname, slices in self._slices.items()},
            "max_values": dict(self._max_values),
        }

    def merge(self, other_state: Mapping[str, Any] | VolumeMetricAccumulator) -> None:
        """Add the slices of another accumulator (or of its :meth:`state`); duplicates count once.

        Args:
            other_state: The other accumulator or its state.
        """
        if isinstance(other_state, VolumeMetricAccumulator):
            other_state = other_state.state()
        for fname, slices in other_state["slices"].items():
            max_value = other_state["max_values"][fname]
            for slice_num, stats in slices.items():
                self.add(fname, slice_num, stats, max_value)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> VolumeMetricAccumulator:
        """Rebuild an accumulator from :meth:`state`."""
        accumulator = cls()
        accumulator.merge(state)
        return accumulator

    def per_volume(self) -> dict[str, dict[str, float]]:
        """Every registered metric of every volume gathered so far."""
        results = {}
        metrics = metric_table()
        for fname, slices in self._slices.items():
            ordered = [slices[index] for index in sorted(slices)]
            stats = {key: np.array([s[key] for s in ordered], dtype=np.float64) for key in ordered[0]}
            max_value = self._max_values[fname]
            results[fname] = {name: metric.volume(stats, max_value) for name, metric in metrics.items()}
        return results

    def compute(self) -> dict[str, float]:
        """The volume metrics averaged over volumes.

        Returns:
            Every metric of :func:`metric_table` and ``num_volumes``; NaN metrics when nothing was added.
        """
        volumes = self.per_volume()
        result: dict[str, float] = {
            name: float(np.mean([v[name] for v in volumes.values()])) if volumes else math.nan
            for name in metric_table()
        }
        result["num_volumes"] = len(volumes)
        return result
