"""The engine interface: how a PretrainModule is placed, synchronised, stepped and saved.

Parallelism, checkpoint format and precision live here, applied to the model from
outside (as torchtitan does); model and objective code never import torch.distributed.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..objectives import FeatureGather, local_gather
from ..registry import Registry

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine(abc.ABC):
    rank: int = 0
    world_size: int = 1
    name: str = "base"

    def __init__(self, device: torch.device):
        self.device = device
        self.module: Optional[nn.Module] = None  # the wrapped module: call it for forward
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory) -> None:
        """Move/wrap `module`, then build the optimizer over the wrapped parameters."""

    @abc.abstractmethod
    def unwrapped(self) -> nn.Module:
        """The PretrainModule itself (for attribute access such as the objective)."""

    def gather(self) -> FeatureGather:
        """How objectives reach the global batch."""
        return local_gather

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abc.abstractmethod
    def step(self, clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        """Clip (if asked), step the optimizer, apply the parameter bounds, zero grads; return
        the pre-clip grad norm."""

    def bounded_parameters(self) -> List[Tuple[nn.Parameter, float, float]]:
        """(parameter, low, high) for each bound the objective declares (Objective.parameter_bounds)."""
        objective = self.unwrapped().objective
        return [(objective.get_parameter(name), low, high)
                for name, (low, high) in objective.parameter_bounds().items()]

    @torch.no_grad()
    def apply_parameter_bounds(self) -> None:
        """Clamp the bounded parameters into their bounds; every engine's `step` calls it right
        after the optimizer step. Here the optimizer steps the module's parameters themselves
        (single, DDP, and FSDP2's DTensor shards, clamped shard by shard), so clamping them in
        place is enough; an engine whose optimizer keeps its own master copy overrides this."""
        for param, low, high in self.bounded_parameters():
            param.clamp_(low, high)

    @abc.abstractmethod
    def save(self, directory: Path, extra: Dict[str, Any]) -> None:
        """Write model + optimizer (+ `extra`, rank 0's trainer state) into `directory`."""

    @abc.abstractmethod
    def load(self, directory: Path) -> Dict[str, Any]:
        """Restore what `save` wrote; return `extra`."""

    @abc.abstractmethod
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole PretrainModule state dict, unsharded, on CPU (for export)."""

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def close(self) -> None:
        pass


ENGINES: Registry[Engine] = Registry("engine", "engine.name")
