"""The one mechanism behind the model, penalty and metric registries: entries by name, in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order.

    Registering an equal entry again is harmless (a plugin module imported in several processes, or twice);
    a different entry under a taken name is an error, so two extensions cannot silently replace each other.

    Args:
        kind: What the entries are, for messages (``"model name"``, ``"metric"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        existing = self._entries.get(name)
        if existing is not None and existing != entry:
            raise ValueError(f"{self.kind} {name!r} is already registered ({existing})")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T | None:
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def as_dict(self) -> dict[str, T]:
        """A copy of the entries by name, in registration order."""
        return dict(self._entries)
