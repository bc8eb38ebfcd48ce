"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

The method declares its units (scale/engine/parallelize.py): each transformer block,
encoder and decoder alike, is its own unit (all-gathered for its forward/backward, then
freed), the modules it keeps fp32 (OCL's temperature and head) are fp32 units, and the
root holds the rest (patch embedding, [CLS], final norm, mask token). FSDP2 cannot shard 0-d parameters, so OCL's learnable
temperature is given shape (1,) (`promote_scalar_parameters`; exports restore it). On CUDA the blocks compute in bf16 and reduce gradients
in fp32 (MixedPrecisionPolicy); on CPU everything stays fp32. Checkpoints are sharded
torch.distributed.checkpoint (DCP) directories (scale/checkpoint_io/dcp.py): each rank
writes its own shards, and a checkpoint loads on any number of ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from ..checkpoint_io import dcp
from ..config import EngineConfig
from .base import ENGINES, Engine, EngineRun, OptimizerFactory
from .batch_plan import BatchPlan
from .parallelize import shard_fsdp2
from .distributed import DistributedEngine, enable_method_dispatch, promote_scalar_parameters, restore_parameter_shapes


@dataclass
class FSDPConfig:
    """FSDP2's keys (engine.*)."""
    fsdp_reshard_after_forward: bool = True  # free each block's gathered params after its forward


class FSDPEngine(DistributedEngine):
    name = "fsdp"
    checkpoint_format = dcp.FORMAT
    sharded_state = True

    def _policies(self):
        bf16 = self.device.type == "cuda" and self.run.precision != "fp32"
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        main = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else fp32
        return main, fp32

    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory, plan: BatchPlan) -> None:
        module = enable_method_dispatch(module).to(self.device)
        main, fp32 = self._policies()
        self._shapes = promote_scalar_parameters(module)
        shard_fsdp2(module, main, fp32, self.cfg.fsdp_reshard_after_forward)  # the method's declaration
        self.module = module
        self.optimizer = build_optimizer(module)

    def unwrapped(self) -> nn.Module:
        return self.module

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def step(self, clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        return self.clip_and_step(self.module.parameters(), clip_grad)

    @contextlib.contextmanager
    def full_parameters(self, prefix: str) -> Iterator[Dict[str, torch.Tensor]]:
        """Each DTensor shard all-gathered (collective: every rank, the same order)."""
        yield {name[len(prefix):]: (param.full_tensor() if isinstance(param, DTensor) else param).detach()
               for name, param in self.module.named_parameters() if name.startswith(prefix)}

    def save(self, directory: Path, extra: Dict[str, Any]) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save(directory, model_state, optim_state, extra, write_extra=self.is_main)

    def load(self, directory: Path) -> Dict[str, Any]:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        model_state, optim_state, extra = dcp.load(directory, model_state, optim_state)
        set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        return extra

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Collective: every rank must call it; every rank gets the whole dict on CPU."""
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        return restore_parameter_shapes({k: v.detach().cpu() for k, v in state.items()}, self._shapes)


@ENGINES.register("fsdp", config=FSDPConfig)
def build_fsdp(device: torch.device, cfg: EngineConfig, run: EngineRun, **_: Any) -> Engine:
    return FSDPEngine(device, cfg, run)
