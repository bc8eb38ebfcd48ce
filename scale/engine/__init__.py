"""Engines: how the PretrainModule is distributed, stepped and checkpointed."""
from . import single  # noqa: F401  (registration)
from .base import ENGINES, Engine
from .single import SingleProcessEngine

__all__ = ["ENGINES", "Engine", "SingleProcessEngine"]
