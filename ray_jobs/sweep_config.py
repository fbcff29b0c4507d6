"""Typed sweep specifications: a YAML file with per-profile sections, merged with ``--set`` overrides.

A sweep YAML holds the fields of :class:`SweepSpec` plus ``profiles: {smoke: {...}, cpu: {...},
paper: {...}}`` whose entries override them for that profile. Merging is key-wise for the ``train``,
``search`` and ``scheduler`` mappings and replaces everything else. Validation happens once, here, for
every trial of the grid (:class:`ValidatedSweep`), so a bad value fails before any trial starts.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mri_models.arms import without_inapplicable
from mri_models.plugins import load_plugins
from ray_jobs.config import ConfigError, TrainConfig, load_yaml, make_train_config, profile_defaults

_MERGED_KEYWISE = ("train", "search", "scheduler")


class SchedulerSpec(BaseModel):
    """ASHA on validation SSIM with ``epoch`` as time attribute, or FIFO for full-budget studies."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepSpec(BaseModel):
    """One sweep: fixed training values, a grid, seeds, the scheduler and the resources per trial."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(min_length=1, description="default experiment name")
    description: str = ""
    profile: Literal["smoke", "cpu", "paper"] = "cpu"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig values for every trial")
    search: dict[str, list[Any]] = Field(default_factory=dict, description="grid: TrainConfig key -> values")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: derived from the cluster")
    workers_per_trial: int | None = Field(None, ge=1)

    def base_values(self) -> dict[str, Any]:
        """Profile defaults overlaid with the sweep's fixed values (and the workers per trial)."""
        values = {**profile_defaults(self.profile), **self.train}
        if self.workers_per_trial is not None:
            values["num_workers"] = self.workers_per_trial
        return values

    def trial_values(self, point: dict[str, Any]) -> dict[str, Any]:
        """TrainConfig values of one grid point (including ``seed``).

        A fixed penalty weight applies only to the trials whose model takes it
        (:func:`mri_models.arms.without_inapplicable`).
        """
        values = {**self.base_values(), **point}
        plugins = values.get("plugins") or ()
        if isinstance(plugins, (list, tuple)):  # anything else: TrainConfig's validation names it
            try:
                load_plugins(plugins)  # their penalty weights are keys like gamma
            except ValueError as err:
                raise ConfigError(f"plugins: {err}") from None
        model = values.get("model", TrainConfig.model_fields["model"].default)
        return without_inapplicable(values, model, searched=point)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid point with its seed, in grid order (seed varying fastest)."""
        keys = list(self.search)
        points = []
        for combination in itertools.product(*(self.search[k] for k in keys)):
            for seed in self.seeds:
                points.append({**dict(zip(keys, combination, strict=True)), "seed": seed})
        return points

    def trial_configs(self) -> list[TrainConfig]:
        """Validated TrainConfigs of every trial; raises ConfigError naming the first bad one."""
        configs = []
        for point in self.grid_points():
            try:
                configs.append(make_train_config(self.trial_values(point)))
            except ConfigError as err:
                raise ConfigError(f"trial {point}: {err}") from None
        return configs

    @property
    def max_epochs(self) -> int:
        return int(self.base_values().get("epochs", TrainConfig.model_fields["epochs"].default))


@dataclass(frozen=True)
class ValidatedSweep:
    """A sweep whose every trial has been validated: what the sweep's driver passes along.

    Attributes:
        spec: the sweep.
        trials: every grid point's TrainConfig, in grid order (:meth:`SweepSpec.grid_points`).
    """

    spec: SweepSpec
    trials: tuple[TrainConfig, ...]

    @classmethod
    def of(cls, spec: SweepSpec) -> ValidatedSweep:
        """Validate every trial of ``spec``, loading its plugins (ConfigError names the first bad one)."""
        return cls(spec, tuple(spec.trial_configs()))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key in _MERGED_KEYWISE and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _apply_override(values: dict[str, Any], key: str, value: Any) -> None:
    """``a.b=v`` sets a nested key; a bare key names a SweepSpec field or else a TrainConfig field."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in SweepSpec.model_fields:
        parts = ["train", parts[0]]
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
    target[parts[-1]] = value


def load_sweep(path: Path, profile: str, overrides: dict[str, Any] | None = None) -> ValidatedSweep:
    """Load a sweep YAML for a profile, apply overrides, validate the spec and every trial.

    Raises:
        ConfigError: naming the file, key and value at fault.
    """
    try:
        raw = load_yaml(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read sweep config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sweep fields, got {type(raw).__name__}")
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile name to fields, got {profiles!r}")
    if profile not in profiles and profile not in ("smoke", "cpu", "paper"):
        raise ConfigError(f"unknown profile {profile!r}; expected smoke, cpu or paper")
    section = profiles.get(profile) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: profiles.{profile}: expected a mapping of fields, got {section!r}")
    values = _merge(raw, section)
    values["profile"] = profile
    for key, value in (overrides or {}).items():
        _apply_override(values, key, value)
    try:
        spec = SweepSpec(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    empty = [key for key, options in spec.search.items() if not options]
    if empty or not spec.seeds:
        raise ConfigError(f"{path}: empty grid for {', '.join(empty) or 'seeds'}; give at least one value")
    overlap = set(spec.search) & set(spec.train)
    if overlap:
        raise ConfigError(f"{path}: {sorted(overlap)} both fixed in train and searched in search")
    return ValidatedSweep.of(spec)  # every trial must be valid before any starts
