"""One process, one device: no wrapping, a plain torch checkpoint file (scale/checkpoint_io/torch_file.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..checkpoint_io import torch_file
from .base import ENGINES, Engine, OptimizerFactory
from .batch_plan import BatchPlan


class SingleProcessEngine(Engine):
    name = "single"
    checkpoint_format = torch_file.FORMAT

    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory, plan: BatchPlan) -> None:
        self.module = module.to(self.device)
        self.optimizer = build_optimizer(self.module)

    def unwrapped(self) -> nn.Module:
        return self.module

    def step(self, clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
        self.optimizer.step()
        self.apply_parameter_bounds()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: Path, extra: Dict[str, Any]) -> None:
        torch_file.save(directory, self.module, self.optimizer, extra)

    def load(self, directory: Path) -> Dict[str, Any]:
        return torch_file.load(directory, self.module, self.optimizer, map_location=self.device)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


@ENGINES.register("single")
def build_single(device: torch.device, **_: Any) -> Engine:
    return SingleProcessEngine(device)
