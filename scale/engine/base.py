"""The engine interface: how a PretrainModule is placed, synchronised, stepped and saved.

Parallelism, checkpoint format and precision live here, applied to the model from
outside (as torchtitan does); model and objective code never import torch.distributed.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import RunConfig
from ..masking import Masks, SignalRequest
from ..objectives import FeatureGather, ObjectiveBatch, ObjectiveOutput, local_gather
from ..registry import Registry
from .batch_plan import BatchPlan
from .timing import StepTimer

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class EngineRun:
    """The few run settings outside the engine section that an engine reads (it gets its own section,
    scale.config.EngineConfig with its engine's keys, and this; never the whole run config)."""

    precision: str = "auto"  # train.precision: FSDP2's bf16 policy, DeepSpeed's autocast
    clip_grad: Optional[float] = None  # optim.clip_grad: DeepSpeed clips inside its step

    @classmethod
    def of(cls, cfg: RunConfig) -> "EngineRun":
        return cls(precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad)


class Engine(abc.ABC):
    """Every capability the trainer, gradient caching, accumulation and monitors use is a method
    here, with the single-process behaviour as its default: a new engine cannot forget one."""

    rank: int = 0
    world_size: int = 1
    name: str = "base"
    # Whether full_state_dict() is a collective (every rank must call it): sharded parameters.
    sharded_state: bool = False
    checkpoint_format: str = ""  # the scale.checkpoint_io format it writes (recorded in meta.json)

    def __init__(self, device: torch.device, sync_timing: bool = True):
        self.device = device
        self.module: Optional[nn.Module] = None  # the wrapped module: call it for forward
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.timer = StepTimer(device, sync_timing)  # per-step timings (communication, optimizer)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory, plan: BatchPlan) -> None:
        """Move/wrap `module` (applying its ParallelPlan), then build the optimizer over the
        wrapped parameters. `plan` is the trainer's batch plan (per-rank batch, passes)."""

    @abc.abstractmethod
    def unwrapped(self) -> nn.Module:
        """The PretrainModule itself (for attribute access such as the objective)."""

    def gather(self) -> FeatureGather:
        """How objectives reach the global batch."""
        return local_gather

    # ------------------------------------------------------------ calls through the wrapper
    def invoke(self, method: str, *args: Any) -> Any:
        """`PretrainModule.<method>(*args)`; multi-process engines route it through their
        wrapper's forward so that gradient hooks, unshard and gather hooks fire."""
        return getattr(self.unwrapped(), method)(*args)

    def forward(self, images: torch.Tensor, masks: Masks) -> ObjectiveOutput:
        """Encode and score one (micro-)batch."""
        return self.module(images, masks, self.gather())

    def encode(self, images: torch.Tensor, masks: Masks) -> ObjectiveBatch:
        return self.invoke("encode", images, masks)

    def score(self, batch: ObjectiveBatch) -> ObjectiveOutput:
        return self.invoke("score", batch, self.gather())

    def model_signal(self, images: torch.Tensor, request: SignalRequest) -> torch.Tensor:
        with torch.no_grad():  # outside the wrapper too: DDP then prepares no backward for it
            return self.invoke("model_signal", images, request)

    # ------------------------------------------------------------ gradients
    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for a forward + backward whose gradients are (not) synchronised across ranks."""
        return contextlib.nullcontext()

    def accumulation_scope(self) -> contextlib.AbstractContextManager:
        """Around all the backwards of one optimizer step (DeepSpeed: one coalesced reduction)."""
        return contextlib.nullcontext()

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

    @contextlib.contextmanager
    def full_parameters(self, prefix: str) -> Iterator[Dict[str, torch.Tensor]]:
        """The PretrainModule's parameters under `prefix` (names without it), whole, for reading
        (collective where they are sharded: every rank enters)."""
        yield {name[len(prefix):]: param.detach() for name, param in self.unwrapped().named_parameters()
               if name.startswith(prefix)}

    @torch.no_grad()
    def update_weight_followers(self) -> None:
        """After each optimizer step: update the state that follows the weights (an EMA of the
        encoder, `PretrainModule.weight_followers`) from the full new weights."""
        for follower in self.unwrapped().weight_followers():
            with self.full_parameters(follower.source_prefix) as parameters:
                follower.update(parameters)

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
        """Wait for every rank."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def close(self) -> None:
        pass


ENGINES: Registry[Engine] = Registry("engine", "engine.name")
