"""Small name -> object registries (torchdistill style): duplicates refused, unknown names listed."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A case-insensitive registry. ``get`` of an unknown name raises ``KeyError``
    whose message lists every known name, so config errors can be surfaced as-is."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._canonical: dict[str, str] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("_", "").replace("-", "").lower()

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            keys = {self._key(n): n for n in (name, *aliases)}  # spellings that normalise alike count once
            for k, n in keys.items():
                if k in self._items:
                    raise ValueError(f"{self.kind} {n!r} is already registered")
                self._items[k] = obj
                self._canonical[k] = name
            return obj

        return deco

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (aliases map to their primary name)."""
        self.get(name)
        return self._canonical[self._key(name)]

    def get(self, name: str) -> T:
        if not isinstance(name, str) or self._key(name) not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[self._key(name)]

    def names(self) -> list[str]:
        return sorted(set(self._canonical.values()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
