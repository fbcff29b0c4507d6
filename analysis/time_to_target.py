"""Time to target: per arm and configuration, how many seeds reached the target SSIM, and how fast.

AlgoPerf's fastMRI workload judges training by the time to a validation SSIM target (0.7237 for its U-Net
on the real knee data); a sweep with ``target_ssim`` records, per trial, the epoch, the training slices
seen and the seconds its epochs took until its validation SSIM first reached the target
(:data:`mri_models.experiment.TARGET_KEYS`). Over each arm's included seeds this writes the share that
reached it and, over those that did, the mean and a 95% t-interval (``scipy.stats``) of each. A seed that
never reached the target is counted, never averaged in: its time is unknown (longer than its run).

Run ``python -m analysis.time_to_target --experiment PATH``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from scipy import stats

from analysis.cli import run_step
from analysis.output import Artifact, OutDir, StepResult
from analysis.study import Study
from mri_models.experiment import TARGET_KEYS

CONFIDENCE = 0.95


def _interval(values: pd.Series) -> tuple[float, float, float]:
    """Mean and the t-interval's bounds (NaN bounds with fewer than two values)."""
    n, mean = len(values), float(values.mean()) if len(values) else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def targets(study: Study) -> dict[str, float]:
    """The target SSIM of each experiment that set one."""
    found = {}
    for (experiment, _), config in study.configs.items():
        if config.get("target_ssim") is not None:
            found[experiment] = float(config["target_ssim"])
    return found


def table(study: Study) -> pd.DataFrame:
    """One row per arm and configuration of the experiments with a target: ``target_ssim``, ``seeds``,
    ``reached`` and, over the seeds that reached it, ``<key>_mean``, ``<key>_low``, ``<key>_high``."""
    by_experiment = targets(study)
    trials = study.included_trials()
    if not by_experiment or trials.empty:
        return pd.DataFrame()
    trials = trials[trials["experiment"].isin(by_experiment)]
    keys = ["arm", *study.config_keys]
    rows = []
    for values, group in trials.groupby(keys, dropna=False, sort=False):
        reached = group[group["target_epoch"].notna()]
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        target = by_experiment[group["experiment"].iloc[0]]
        row.update(target_ssim=target, seeds=len(group), reached=len(reached))
        for key in TARGET_KEYS:
            row[f"{key}_mean"], row[f"{key}_low"], row[f"{key}_high"] = _interval(reached[key])
        rows.append(row)
    return pd.DataFrame(rows)


def run(study: Study, out: OutDir) -> StepResult:
    """Write ``time_to_target.csv`` where an experiment set ``target_ssim``."""
    result = StepResult("Time to target")
    frame = table(study)
    if frame.empty:
        result.notes.append("time_to_target: no experiment set target_ssim; nothing to time")
        return result
    out.write_csv("time_to_target.csv", frame)
    result.artifacts.append(
        Artifact(
            "time_to_target.csv",
            "Per arm and configuration: the seeds whose validation SSIM reached target_ssim, and over those "
            "the mean and 95% t-interval of the epoch, training slices and epoch seconds until it first did "
            "(a seed that never reached it is counted, not averaged in).",
        )
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
