"""A sweep's result tables in a form two runs of the same sweep can be compared in, number for number."""

from __future__ import annotations

import re

import pandas as pd

# Columns that measure time or count failures: they differ between any two runs by nature.
NOT_NUMBERS = re.compile(
    r"seconds|time|date|timestamp|per_second|fraction|pid|hostname|node_ip|attempts|preemptions|error"
)


def comparable(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``trials.csv`` or ``epochs.csv`` without its timing and failure columns and its trial ids (which
    differ between runs), sorted by ``keys`` (the searched values, and ``epoch`` for epochs)."""
    keep = [c for c in table.columns if not NOT_NUMBERS.search(c) and c not in ("trial_id", "trial_dir")]
    return table[keep].sort_values(keys).reset_index(drop=True)
