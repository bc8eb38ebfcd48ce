"""DistributedDataParallel: a full replica per rank, gradients averaged by all-reduce.

Checkpoints are the single-process engine's torch file (scale/checkpoint_io/torch_file.py),
written by rank 0, so a DDP checkpoint resumes under `single` and back.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint_io import torch_file
from ..config import EngineConfig
from .base import ENGINES, Engine, EngineRun, OptimizerFactory
from .distributed import DistributedEngine, enable_method_dispatch
from .batch_plan import GRAD_CACHE, BatchPlan


@dataclass
class DDPConfig:
    """DDP's keys (engine.*)."""
    find_unused_parameters: bool = False  # turned on automatically under gradient caching


class DDPEngine(DistributedEngine):
    name = "ddp"
    checkpoint_format = torch_file.FORMAT

    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory, plan: BatchPlan) -> None:
        self._inner = enable_method_dispatch(module).to(self.device)
        # State that follows the weights (an EMA of the encoder) is updated identically on every rank
        # from the synchronised weights: DDP must not broadcast it (a whole encoder) before each forward.
        followers = [f"{name}." for name, child in self._inner.named_children()
                     if any(child is f for f in self._inner.weight_followers())]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self._inner, [name for name, _ in self._inner.named_buffers() if name.startswith(tuple(followers))])
        # Under gradient caching the last (synchronised) backward reaches only the encoder;
        # the objective's gradients were accumulated earlier under no_sync. DDP then has to
        # look for parameters unused in that backward and reduce their accumulated grads.
        grad_cache = plan.mode == GRAD_CACHE
        self.module = DistributedDataParallel(
            self._inner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.find_unused_parameters or grad_cache)
        self.optimizer = build_optimizer(self._inner)

    def unwrapped(self) -> nn.Module:
        return self._inner

    def grad_sync(self, enabled: bool):
        return contextlib.nullcontext() if enabled else self.module.no_sync()

    def step(self, clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        return self.clip_and_step(self._inner.parameters(), clip_grad)

    def save(self, directory: Path, extra: Dict[str, Any]) -> None:
        if self.is_main:  # replicas are identical: one copy
            torch_file.save(directory, self._inner, self.optimizer, extra)

    def load(self, directory: Path) -> Dict[str, Any]:
        return torch_file.load(directory, self._inner, self.optimizer, map_location=self.device)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self._inner.state_dict().items()}


@ENGINES.register("ddp", config=DDPConfig)
def build_ddp(device: torch.device, cfg: EngineConfig, run: EngineRun, **_: Any) -> Engine:
    return DDPEngine(device, cfg, run)
