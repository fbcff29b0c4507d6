"""Search, then confirm: the few best configurations of a search, re-run with every seed at full budget.

Tuning practice separates exploration (many configurations, one seed, early stopping) from confirmation:
a search's ranking is one noisy seed at whatever budget the scheduler allowed, so the sweep's tables and
best configuration come from the confirm stage, a FIFO experiment ``<name>-confirm`` beside the search's,
whose candidates are the search's ``confirm.top_k`` best on validation.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mri_models.metrics import primary_objective
from ray_jobs.config import ConfigError
from ray_jobs.sweep_config import SchedulerSpec, SweepSpec, ValidatedSweep

CONFIRM_SUFFIX = "-confirm"


@dataclass(frozen=True)
class RankedConfiguration:
    """One searched configuration: its values, its trials' best validation objective (mean over seeds)."""

    values: dict[str, Any]
    objective: float
    trials: int


def rank_configurations(results, spec: SweepSpec) -> list[RankedConfiguration]:
    """The search's configurations, best first, by each trial's best validation epoch (as the result tables
    rank them: epoch 0, the untrained network, is never a trial's best), averaged over the configuration's
    seeds; errored and diverged trials are left out.

    Args:
        results: the search's ``ResultGrid``.
        spec: the search's spec (its ``search`` keys identify a configuration).
    """
    objective = primary_objective()
    best: dict[str, list[float]] = {}
    values: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.error is not None or (result.metrics or {}).get("diverged"):
            continue
        frame = result.metrics_dataframe
        if frame is None or objective.metric not in frame or "epoch" not in frame:
            continue
        scores = frame.loc[frame["epoch"] >= 1, objective.metric].dropna()
        if scores.empty:
            continue
        point = {key: result.config[key] for key in spec.search}
        key = json.dumps(point, sort_keys=True)
        values[key] = point
        best.setdefault(key, []).append(float(scores.max() if objective.mode == "max" else scores.min()))
    ranked = [RankedConfiguration(values[k], sum(v) / len(v), len(v)) for k, v in best.items()]
    return sorted(ranked, key=lambda c: c.objective, reverse=objective.mode == "max")


def confirm_sweep(spec: SweepSpec, ranked: list[RankedConfiguration]) -> ValidatedSweep:
    """The confirm stage of ``spec``: its ``top_k`` best configurations (of each value of ``confirm.per``),
    every confirm seed, FIFO.

    Raises:
        ConfigError: the search left no configuration to confirm.
    """
    assert spec.confirm is not None
    if not ranked:
        raise ConfigError(f"sweep {spec.experiment!r}: no search trial reported a result; nothing to confirm")
    chosen, per_group = [], Counter()
    for configuration in ranked:  # best first
        group = tuple(configuration.values[key] for key in spec.confirm.per)
        if per_group[group] < spec.confirm.top_k:
            per_group[group] += 1
            chosen.append(configuration.values)
    confirm = SweepSpec(
        **{
            **spec.model_dump(),
            "experiment": spec.experiment + CONFIRM_SUFFIX,
            "search": {},
            "candidates": chosen,
            "search_alg": "grid",
            "num_samples": None,
            "seeds": spec.confirm.seeds,
            "scheduler": SchedulerSpec(type="fifo"),
            "confirm": None,
        }
    )
    return ValidatedSweep.of(confirm)
