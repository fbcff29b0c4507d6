"""Per-seed tables of a study and their summary over seeds.

The seed is the unit of replication (``docs/statistics.md``): :func:`seed_table` lays a metric out with
one row per seed block (and, on the test split, one column per test volume), :func:`aggregate` summarises
rows over seeds, :func:`config_groups` splits them by configuration, and :func:`at_common_budget` reads
every trial after the same training. The tests on these tables are in :mod:`analysis.inference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.points import common_budget, metric_at_epoch, point_column
from analysis.study import Study

SEED_STATS = {"mean": "mean", "std": "std", "min": "min", "max": "max", "n": "count"}


def aggregate(table: pd.DataFrame, by: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: ``<metric>_mean``, ``_std`` (ddof 1), ``_min``, ``_max`` and ``_n`` over the rows
    (seeds), counting only finite values; a metric absent from the table gets NaN statistics and n = 0."""
    if table.empty:
        return pd.DataFrame(columns=by)
    values = table[[*by]].copy()
    for metric in metrics:
        column = table[metric] if metric in table else pd.Series(np.nan, index=table.index)
        values[metric] = pd.to_numeric(column, errors="coerce").replace([np.inf, -np.inf], np.nan)
    keys = by or [values.assign(_all=0)["_all"]]
    stats_table = values.groupby(keys, dropna=False, sort=False)[list(metrics)].agg(list(SEED_STATS.values()))
    stats_table.columns = [f"{metric}_{name}" for metric in metrics for name in SEED_STATS]
    return stats_table.reset_index(drop=not by)


def config_groups(table: pd.DataFrame, keys: Sequence[str]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Rows split by configuration (one group when there are no config keys)."""
    keys = [k for k in keys if k in table]
    if not keys or table.empty:
        return [({}, table)]
    return [
        (dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)), group)
        for key, group in table.groupby(keys, dropna=False, sort=True)
    ]


def at_common_budget(
    study: Study, trials: pd.DataFrame, columns: Sequence[str]
) -> tuple[pd.DataFrame, int | None]:
    """Per trial of ``trials``: its own columns and ``columns`` at the common budget of ``trials`` (the last
    epoch every completed or stopped one reached): every trial read after the same training. Returns the
    table and that epoch (None when there is none)."""
    budget = common_budget(trials)
    if budget is None or study.epochs.empty:
        return pd.DataFrame(), None
    at = metric_at_epoch(study.epochs, budget, columns)
    own = trials.drop(columns=[c for c in columns if c in trials])
    return own.merge(at, on=["experiment", "trial_id"]), budget


def seed_table(
    study: Study, trials: pd.DataFrame, point: str, metric: str, keys: Sequence[str]
) -> pd.DataFrame:
    """One row per block (the values of ``keys``, the seed among them) and one column per test volume: each
    trial's ``metric`` at a test point, from the per-volume rows. At other points, or without per-volume
    rows, one column (``trial``) of the trial's value. Blocks index the rows, so tables of two arms
    subtract into their paired differences."""
    volumes = study.volumes
    if point.startswith("test_") and not volumes.empty and "split" in volumes:
        acceleration = int(point.removeprefix("test_").removesuffix("x"))
        rows = volumes[(volumes["split"] == "test") & (volumes["source"] == "network")
                       & (volumes["acceleration"] == acceleration)]  # fmt: skip
        rows = rows.drop(columns=[k for k in keys if k in rows])
        rows = rows.merge(trials[["experiment", "trial_id", *keys]], on=["experiment", "trial_id"])
        if not rows.empty and metric in rows:
            return rows.pivot_table(index=list(keys), columns="file", values=metric, aggfunc="mean")
    column = point_column(point, metric)
    values = trials[[*keys, column]].rename(columns={column: "trial"})
    return values.groupby(list(keys), dropna=False)[["trial"]].mean()


def zero_filled_row(study: Study, point: str, metric: str) -> pd.Series | None:
    """The zero-filled input's ``metric`` per test volume at a test point (None elsewhere)."""
    volumes = study.volumes
    if not point.startswith("test_") or volumes.empty or "split" not in volumes:
        return None
    acceleration = int(point.removeprefix("test_").removesuffix("x"))
    rows = volumes[(volumes["split"] == "test") & (volumes["source"] == "zero_filled")
                   & (volumes["acceleration"] == acceleration)]  # fmt: skip
    return rows.groupby("file")[metric].mean() if not rows.empty and metric in rows else None
