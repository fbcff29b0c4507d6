"""Where a trial is read: its best or last validation epoch, a common epoch budget, or a test setting.

A *point* names one of these: ``best`` (the epoch of best validation SSIM), ``last``, ``budget`` (the
common budget, see :func:`common_budget`) or ``test_<N>x`` (the final evaluation on the test split at
acceleration N). A trial's value of a metric at a point is a column of the study's trial table
(:func:`point_column`); :func:`metric_at_epoch` reads any epoch from the epoch table.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mri_models.metrics import PRIMARY_METRIC


def test_points(table: pd.DataFrame) -> list[str]:
    """The test settings a table of trials has results for (``test_4x``, ``test_8x``), in order."""
    prefix = f"test_{PRIMARY_METRIC}_"
    found = [c.removeprefix(prefix).removesuffix("x") for c in table.columns if c.startswith(prefix)]
    return [f"test_{n}x" for n in sorted(int(n) for n in found if n.isdigit())]


def point_column(point: str, metric: str) -> str:
    """The trial column of ``metric`` at a point: ``best_ssim``, ``last_ssim``, ``test_ssim_4x``."""
    if point.startswith("test_"):
        return f"test_{metric}_{point.removeprefix('test_')}"
    return f"{point}_{metric}"


def point_label(point: str) -> str:
    """What a point means, for table captions."""
    if point.startswith("test_"):
        return (
            f"test split at {point.removeprefix('test_')}, checkpoint of the best validation "
            f"{PRIMARY_METRIC.upper()}"
        )
    best = f"validation at the epoch of best validation {PRIMARY_METRIC.upper()}, chosen on the same data"
    budget = "validation at the common budget (the last epoch every trial reached; ASHA stopped some)"
    return {"best": best, "last": "validation, last epoch", "budget": budget}[point]


def common_budget(trials: pd.DataFrame) -> int | None:
    """The largest epoch every finished-or-stopped trial reached (ASHA's lowest rung, typically)."""
    if trials.empty:
        return None
    finished = trials["status"].isin(("completed", "reached_target", "stopped"))
    pool = trials[finished & (trials["epochs_run"] > 0)]
    if pool.empty:
        pool = trials[trials["epochs_run"] > 0]
    return int(pool["epochs_run"].min()) if not pool.empty else None


def metric_at_epoch(epochs: pd.DataFrame, epoch: int, metrics: Sequence[str]) -> pd.DataFrame:
    """Per trial, the metrics reported at ``epoch`` (trials that never reached it are absent)."""
    if epochs.empty or "epoch" not in epochs:
        return pd.DataFrame(columns=["experiment", "trial_id", *metrics])
    rows = epochs[epochs["epoch"] == epoch]
    columns = ["experiment", "trial_id", *[m for m in metrics if m in rows]]
    return rows[columns].drop_duplicates(["experiment", "trial_id"], keep="last")
