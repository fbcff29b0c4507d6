"""Search-space distributions of a sweep YAML: what a key may hold instead of a grid's list of values.

``search: {weight_decay: {loguniform: [1e-7, 1e-3]}, drop_prob: {uniform: [0, 0.3]}, model: [unet, ...]}``.
A distribution is a mapping with one entry, its kind and its arguments, as Ray Tune names them:

- ``loguniform: [low, high]`` and ``uniform: [low, high]``: floats in [low, high) (``low > 0`` for log);
- ``quniform: [low, high, q]``: uniform rounded to multiples of ``q``;
- ``randint: [low, high]``: integers ``low <= n < high`` (Tune's convention: ``high`` excluded);
- ``choice: [a, b, ...]``: one of the values (a plain list is a choice too under a random or model-based
  searcher, a grid under ``search_alg: grid``).

:func:`probe_points` gives the values that :class:`ray_jobs.sweep_config.ValidatedSweep` validates before
any trial: each key's bounds and options one at a time (so an error names the key and value), then seeded
joint samples; a suggestion made during the search is validated again as its trial starts.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import tune

PROBE_SAMPLES = 8  # seeded joint samples beyond the bounds and options of each key
MAX_ENUMERATED_INTEGERS = 16  # a randint range up to this size is probed value by value


class Distribution(BaseModel):
    """One search key's distribution: exactly one of the fields, with Tune's arguments."""

    model_config = ConfigDict(extra="forbid")

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    quniform: tuple[float, float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_valid_kind(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(type(self).model_fields)}, got {given or 'none'}"
            )
        kind, args = given[0], getattr(self, given[0])
        if kind != "choice" and not args[0] < args[1]:
            raise ValueError(f"{kind}: low {args[0]} must be below high {args[1]}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {args[0]}")
        if kind == "quniform" and args[2] <= 0:
            raise ValueError(f"quniform: q must be > 0, got {args[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    @property
    def continuous(self) -> bool:
        return self.kind in ("loguniform", "uniform", "quniform")

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.loguniform(low, high)``, ...)."""
        args = self.args
        return tune.choice(list(args)) if self.kind == "choice" else getattr(tune, self.kind)(*args)

    def edges(self) -> list[Any]:
        """The values probed one by one: the bounds (every integer of a small range), or every option."""
        if self.kind == "choice":
            return list(self.choice)
        low, high = self.args[:2]
        if self.kind == "randint":
            if high - low <= MAX_ENUMERATED_INTEGERS:
                return list(range(low, high))
            return [low, high - 1]
        if self.kind == "quniform":
            q = self.args[2]
            return [round(low / q) * q, round(high / q) * q]
        return [low, high]

    def sample(self, rng: random.Random) -> Any:
        """One seeded sample, drawn as Tune draws (for probing, not for the search itself)."""
        return self.to_tune().sample(random_state=rng.randrange(2**31))


SearchValues = list[Any] | Distribution  # a grid's (or a choice's) values, or a distribution


def as_distribution(values: SearchValues) -> Distribution:
    """A list is a choice among its values."""
    return values if isinstance(values, Distribution) else Distribution(choice=list(values))


def probe_points(search: dict[str, SearchValues], seed: int) -> list[dict[str, Any]]:
    """Points that cover the space: each key's edges with the other keys at their first edge, then
    :data:`PROBE_SAMPLES` seeded joint samples."""
    space = {key: as_distribution(values) for key, values in search.items()}
    first = {key: dist.edges()[0] for key, dist in space.items()}
    points = [dict(first)]
    for key, dist in space.items():
        points += [{**first, key: value} for value in dist.edges()[1:]]
    rng = random.Random(seed)
    points += [{key: dist.sample(rng) for key, dist in space.items()} for _ in range(PROBE_SAMPLES)]
    return points


def tune_space(search: dict[str, SearchValues]) -> dict[str, Any]:
    """The Tune param space of a random or model-based search: every key a Tune domain."""
    return {key: as_distribution(values).to_tune() for key, values in search.items()}
