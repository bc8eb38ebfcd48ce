"""An exponential moving average of a module's weights, held as buffers (module state, not parameters).

As buffers, the copy is saved and restored by every engine's checkpoint (so resume stays exact),
never sharded, trained or decayed by the optimizer, and runs as an ordinary module of the same
architecture. The engine feeds `update` the source's full parameters after each optimizer step
(`Engine.update_weight_followers`), gathering them first where they are sharded (FSDP2, ZeRO-3).
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn


class WeightEMA(nn.Module):
    def __init__(self, source: nn.Module, source_prefix: str, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.source_prefix = source_prefix  # where the source's parameters sit in the parent module's names
        self.decay = decay
        self.model = copy.deepcopy(source)
        for module in self.model.modules():  # parameters -> buffers of the same names
            for name, param in list(module._parameters.items()):
                if param is not None:
                    del module._parameters[name]
                    module.register_buffer(name, param.detach().clone().float())
        self.model.eval()

    def train(self, mode: bool = True) -> "WeightEMA":
        return super().train(False)  # always eval semantics (no drop path)

    @torch.no_grad()
    def update(self, source_parameters: Dict[str, torch.Tensor]) -> None:
        """ema <- decay ema + (1 - decay) source, for each parameter of the source (full tensors)."""
        buffers = dict(self.model.named_buffers())
        for name, value in source_parameters.items():
            buffers[name].lerp_(value.to(buffers[name].device, torch.float32), 1.0 - self.decay)
