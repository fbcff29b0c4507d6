"""Experiment tracking outside TensorBoard: every trial of a sweep as an MLflow run (optional extra)."""

from __future__ import annotations


def tracking_callbacks(tracking_uri: str | None, experiment: str, stage: str) -> list:
    """Tune callbacks that log every trial of the sweep ``experiment`` to ``tracking_uri`` (none: [])."""
    return []
