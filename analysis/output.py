"""What an analysis step writes and how it shows results: the output directory, tables, figures, labels.

Every file goes through :class:`OutDir` (a local path or URI), written whole by :mod:`mri_models.storage`
so that an interrupted step never leaves half a file; a step returns a :class:`StepResult` naming what it
wrote for the report.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # scripts run headless on clusters and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mri_models import storage


@dataclass
class Artifact:
    """A file an analysis step wrote, relative to the output directory, and what it shows."""

    path: str
    caption: str


@dataclass
class StepResult:
    """What one analysis step produced."""

    title: str
    artifacts: list[Artifact] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    markdown: str = ""  # a table to show inline in the report


class OutDir:
    """The analysis output directory (local path or URI): files are named relative to it."""

    def __init__(self, uri: str):
        self.uri = uri

    def join(self, relative: str) -> str:
        return storage.join(self.uri, relative)

    def write_bytes(self, relative: str, data: bytes) -> str:
        storage.write_bytes(self.join(relative), data)
        return relative

    def write_text(self, relative: str, text: str) -> str:
        return self.write_bytes(relative, text.encode())

    def write_csv(self, relative: str, table: pd.DataFrame) -> str:
        return self.write_text(relative, table.to_csv(index=False))

    def save_figure(self, figure: plt.Figure, relative: str, dpi: int = 120) -> str:
        """Write a figure as PNG and close it (figures are large; scripts draw many)."""
        buffer = io.BytesIO()
        # A constrained layout already fits everything; "tight" on top of it costs a second full draw.
        constrained = type(figure.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches=None if constrained else "tight")
        plt.close(figure)
        return self.write_bytes(relative, buffer.getvalue())

    def exists(self, relative: str) -> bool:
        return storage.exists(self.join(relative))


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    text = text.replace("γ=", "gamma").replace("γ", "gamma")
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def markdown_table(table: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table (``DataFrame.to_markdown``); numbers in ``formats``' specs, NaN as –."""
    if table.empty:
        return "_(no rows)_\n"
    shown = table.astype(object).copy()
    for column in shown.columns:
        spec = (formats or {}).get(column)
        shown[column] = [
            "–"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else format(value, spec)
            if spec and isinstance(value, (int, float, np.number))
            else str(value).replace("|", "\\|")
            for value in shown[column]
        ]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def mean_std_text(mean: float, std: float, fmt: str) -> str:
    """``mean ± std`` (just the mean when one seed leaves the std undefined)."""
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def config_text(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """``key=value`` pairs of a configuration, or ``-`` when the arm has a single configuration."""
    parts = [f"{k}={_short(row[k])}" for k in keys if k in row]
    return ", ".join(parts) or "-"


def _short(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def baseline_label(baseline: dict[str, Any], baselines: list[dict[str, Any]]) -> str:
    """``zero-filled input``, with its mask settings when the study has several."""
    if len(baselines) < 2:
        return "zero-filled input"
    mask = baseline["mask"]
    return f"zero-filled input ({mask['mask_type']}, {'/'.join(f'{a}x' for a in mask['accelerations'])})"


def draw_baselines(ax, baselines: list[dict[str, Any]], metric: str) -> None:
    """The zero-filled input's value of ``metric`` as a horizontal reference line (one per baseline)."""
    for baseline in baselines:
        value = baseline["metrics"].get(metric)
        if value is not None and np.isfinite(value):
            label = baseline_label(baseline, baselines)
            ax.axhline(value, color="tab:red", linestyle="-.", linewidth=1.2, label=label, gid="zero-filled")
