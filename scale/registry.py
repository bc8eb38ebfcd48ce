"""Name -> builder registries for models, objectives, mask generators, engines and data sources.

One small class so that later methods (MAE, ASL, evolved-hierarchical masking) plug in
by decorating a builder, never by editing a dispatch table. An entry may name its own
config dataclass (`register(name, config=...)`): the run config then reads that
component's keys in its section (scale.config.ComponentSection). An entry may also be
lazy (`register_lazy`): its config is known at once, its module is imported only when the
entry is built, so that e.g. synthetic data never imports `webdataset`.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterable, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str = ""):
        self.kind = kind
        self.key = key  # the config key that names an entry (for the user's error)
        self._builders: Dict[str, Callable[..., T]] = {}
        self._configs: Dict[str, Optional[type]] = {}  # name -> its config dataclass (None: no keys of its own)
        self._lazy: Dict[str, str] = {}  # name -> the module whose import registers its builder

    def register(self, name: str, config: Optional[type] = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: `name` builds with the decorated function and reads `config` (a dataclass) from the run config."""
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders or (name in self._configs and self._configs[name] is not config):
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            self._configs[name] = config
            return builder

        return decorator

    def register_lazy(self, name: str, module: str, config: Optional[type] = None) -> None:
        """`name` is built by a builder that importing `module` registers (with the same `config`)."""
        if name in self._configs:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = module
        self._configs[name] = config

    def _unknown(self, name: str) -> Exception:
        from .errors import ConfigError

        where = f"{self.key}: " if self.key else ""
        return ConfigError(f"{where}unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._builders[name]
        except KeyError:
            raise self._unknown(name) from None

    def config_class(self, name: str) -> Optional[type]:
        """The config dataclass `name` registered (None: it has no keys of its own); unknown names raise."""
        try:
            return self._configs[name]
        except KeyError:
            raise self._unknown(name) from None

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> Iterable[str]:
        return sorted(self._configs)

    def __contains__(self, name: str) -> bool:
        return name in self._configs
