"""Name -> builder registries for models, objectives, mask generators and datasets.

One small class so that later methods (MAE, ASL, evolved-hierarchical masking) plug in
by decorating a builder, never by editing a dispatch table.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str = ""):
        self.kind = kind
        self.key = key  # the config key that names an entry (for the user's error)
        self._builders: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._builders[name]
        except KeyError:
            from .config import ConfigError

            where = f"{self.key}: " if self.key else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._builders))}"
                              ) from None

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> Iterable[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
