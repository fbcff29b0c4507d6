"""Typed sweep specifications: a YAML file with per-profile sections, merged with ``--set`` overrides.

A sweep YAML holds the fields of :class:`SweepSpec` plus ``profiles: {smoke: {...}, cpu: {...},
paper: {...}}`` whose entries override them for that profile. Merging is key-wise for the ``train``,
``search``, ``scheduler`` and ``confirm`` mappings and replaces everything else. Validation happens once,
here, for every trial of a grid or a probe set of a search space's (:class:`ValidatedSweep`), so a bad
value fails before any trial starts.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mri_models.arms import without_inapplicable
from mri_models.plugins import load_plugins
from ray_jobs.config import ConfigError, TrainConfig, load_yaml, make_train_config, profile_defaults
from ray_jobs.search_space import Distribution, SearchValues, probe_points

_MERGED_KEYWISE = ("train", "search", "scheduler", "confirm")


class SchedulerSpec(BaseModel):
    """ASHA on validation SSIM with ``epoch`` as time attribute, or FIFO for full-budget studies."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1.0)


class ConfirmSpec(BaseModel):
    """After the search, the ``top_k`` best configurations on validation, each with every seed, at full
    budget (FIFO): the sweep's tables and best configuration come from this stage."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(ge=1, description="configurations to confirm (per value of ``per``)")
    seeds: list[int] = Field(min_length=1)
    per: list[str] = Field(default_factory=list, description="search keys ranked apart, e.g. [model]")


class SweepSpec(BaseModel):
    """One sweep: fixed training values, a grid or search space, seeds, the searcher, the scheduler, the
    resources per trial and an optional confirm stage."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(min_length=1, description="default experiment name")
    description: str = ""
    profile: Literal["smoke", "cpu", "paper"] = "cpu"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig values for every trial")
    search: dict[str, SearchValues] = Field(
        default_factory=dict, description="TrainConfig key -> grid values or a distribution"
    )
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="explicit configurations, each run with every seed (a confirm stage)",
    )
    search_alg: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int | None = Field(None, ge=1, description="suggestions of a random or optuna search")
    search_seed: int = Field(0, description="seeds the searcher's suggestions")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    confirm: ConfirmSpec | None = None
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: derived from the cluster")
    workers_per_trial: int | None = Field(None, ge=1)

    @field_validator("search", mode="before")
    @classmethod
    def _lists_or_distributions(cls, search: Any) -> Any:
        """One readable error per key (pydantic's own would list both forms' failures)."""
        if not isinstance(search, dict):
            return search
        parsed = {}
        for key, values in search.items():
            if isinstance(values, (list, Distribution)):
                parsed[key] = values
            elif isinstance(values, dict):
                try:
                    parsed[key] = Distribution.model_validate(values)
                except ValidationError as err:
                    problem = err.errors()[0]
                    message = problem["msg"].removeprefix("Value error, ")
                    if problem["type"] == "extra_forbidden":
                        kinds = ", ".join(Distribution.model_fields)
                        message = f"unknown distribution {problem['loc'][0]}; expected one of {kinds}"
                    elif problem["loc"]:
                        message = f"{'.'.join(str(p) for p in problem['loc'])}: {message}"
                    raise ValueError(f"{key}: {message}") from None
            else:
                raise ValueError(
                    f"{key}: expected a list of values or a distribution such as {{uniform: [0.0, 0.3]}}, "
                    f"got {values!r}"
                )
        return parsed

    @property
    def is_grid(self) -> bool:
        """Enumerated trials (a grid or candidates) rather than a searcher's suggestions."""
        return self.search_alg == "grid"

    @property
    def point_keys(self) -> list[str]:
        """The keys that vary between trials, seed last."""
        keys = list(self.search)
        for candidate in self.candidates:
            keys += [key for key in candidate if key not in keys]
        return [*keys, "seed"]

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
        """Every grid point (or candidate) with its seed, in grid order (seed varying fastest)."""
        if not self.is_grid:
            raise ValueError(f"a {self.search_alg} search has no grid points")
        keys = list(self.search)
        combinations = [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*self.search.values())
        ]
        return [{**point, "seed": seed} for point in (self.candidates or combinations) for seed in self.seeds]

    def probe_points(self) -> list[dict[str, Any]]:
        """The points validated before a search's first suggestion, with the search's seed
        (:func:`ray_jobs.search_space.probe_points`)."""
        return [{**point, "seed": self.seeds[0]} for point in probe_points(self.search, self.search_seed)]

    def trial_configs(self) -> list[TrainConfig]:
        """Validated TrainConfigs of every grid trial, or of a search's probe points; raises ConfigError
        naming the first bad one."""
        configs = []
        for point in self.grid_points() if self.is_grid else self.probe_points():
            configs.append(self.suggestion_config(point, "trial" if self.is_grid else "search space value"))
        return configs

    def suggestion_config(self, point: dict[str, Any], what: str = "suggestion") -> TrainConfig:
        """The validated TrainConfig of one point; ConfigError names it and what is wrong."""
        try:
            return make_train_config(self.trial_values(point))
        except ConfigError as err:
            raise ConfigError(f"{what} {point}: {err}") from None

    @property
    def max_epochs(self) -> int:
        return int(self.base_values().get("epochs", TrainConfig.model_fields["epochs"].default))


@dataclass(frozen=True)
class ValidatedSweep:
    """A sweep whose every trial has been validated: what the sweep's driver passes along.

    Attributes:
        spec: the sweep.
        trials: every grid point's TrainConfig, in grid order (:meth:`SweepSpec.grid_points`); for a random or
            model-based search, those of its probe points (:meth:`SweepSpec.probe_points`), which stand for
            the suggestions wherever the data, the cluster or the baselines are checked before any trial.
    """

    spec: SweepSpec
    trials: tuple[TrainConfig, ...]

    @classmethod
    def of(cls, spec: SweepSpec) -> ValidatedSweep:
        """Validate every trial of ``spec`` (of a search, its probe points), loading its plugins
        (ConfigError names the first bad one)."""
        return cls(spec, tuple(spec.trial_configs()))

    @property
    def num_trials(self) -> int:
        """Trials the sweep runs: the grid's, or the searcher's suggestions."""
        return len(self.trials) if self.spec.is_grid else int(self.spec.num_samples or 0)


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


def _problem(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "value_error":  # our validators' messages name the key and value themselves
        return f"{where}.{error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


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
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ConfigError(f"{path}: {problems}") from None
    empty = [key for key, options in spec.search.items() if isinstance(options, list) and not options]
    if empty or not spec.seeds:
        raise ConfigError(f"{path}: empty grid for {', '.join(empty) or 'seeds'}; give at least one value")
    overlap = set(spec.search) & set(spec.train)
    if overlap:
        raise ConfigError(f"{path}: {sorted(overlap)} both fixed in train and searched in search")
    check_search(spec, path)
    try:
        return ValidatedSweep.of(spec)  # every trial (or probe point) must be valid before any starts
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def check_search(spec: SweepSpec, path: Path | str) -> None:
    """The searcher's rules: distributions and ``num_samples`` only with a searcher, one seed per
    suggestion, a distribution's kind fitting its key's type.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    distributions = {key: v for key, v in spec.search.items() if isinstance(v, Distribution)}
    if spec.is_grid:
        if distributions:
            raise ConfigError(
                f"{path}: search.{next(iter(distributions))}: a distribution needs search_alg random or "
                "optuna (search_alg grid takes lists of values)"
            )
        if spec.num_samples is not None:
            raise ConfigError(
                f"{path}: num_samples: a grid runs every point; set search_alg random or optuna"
            )
        if spec.candidates and spec.search:
            raise ConfigError(f"{path}: give either candidates or search, not both")
        return
    unknown = [key for key in (spec.confirm.per if spec.confirm else []) if key not in spec.search]
    if unknown:
        raise ConfigError(f"{path}: confirm.per: {unknown} are not search keys ({', '.join(spec.search)})")
    if spec.num_samples is None:
        raise ConfigError(f"{path}: search_alg {spec.search_alg} needs num_samples (suggestions to try)")
    if spec.candidates or not spec.search:
        raise ConfigError(f"{path}: search_alg {spec.search_alg} needs a search space and no candidates")
    if len(spec.seeds) != 1:
        raise ConfigError(
            f"{path}: seeds: search_alg {spec.search_alg} runs each suggestion with one seed, got "
            f"{spec.seeds}; confirm.seeds re-runs the best configurations with several"
        )
    for key, dist in distributions.items():
        field = TrainConfig.model_fields.get(key)
        if dist.continuous and field is not None and field.annotation is int:
            raise ConfigError(
                f"{path}: search.{key}: {key} is an integer; use randint or choice, not {dist.kind}"
            )
    if spec.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{path}: search_alg optuna needs the optuna package (pip install optuna)"
            ) from None
