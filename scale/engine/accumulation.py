"""Exact gradient accumulation for objectives whose loss does not couple the batch (MAE, ASL).

A per-image loss averaged over the batch is the size-weighted mean of its micro-batches'
losses, so backpropagating `loss_k * b_k / B` for each micro-batch k of b_k images gives
the full batch's gradient. The gradients are synchronised across ranks once per step: every
backward but the last runs under the engine's `grad_sync(False)` (DDP `no_sync`, FSDP2
`set_requires_gradient_sync(False)`, DeepSpeed: one coalesced reduction per step).
Contrastive losses (OCL) couple the batch and use gradient caching instead.
"""
from __future__ import annotations

from typing import Callable, ContextManager, Dict

import torch

from ..masking import Masks
from ..objectives import ObjectiveOutput
from .base import Engine


class GradientAccumulation:
    def __init__(self, engine: Engine, micro_batch: int):
        if micro_batch < 1:
            raise ValueError(f"micro-batch must be >= 1, got {micro_batch}")
        self.engine, self.micro_batch = engine, micro_batch

    def __call__(self, images: torch.Tensor, masks: Masks, autocast: Callable[[], ContextManager]) -> ObjectiveOutput:
        engine, total = self.engine, images.shape[0]
        starts = list(range(0, total, self.micro_batch))
        loss = torch.zeros((), device=engine.device)
        metrics: Dict[str, torch.Tensor] = {}
        with engine.accumulation_scope():
            for k, start in enumerate(starts):
                end = min(start + self.micro_batch, total)
                weight = (end - start) / total
                with engine.grad_sync(k == len(starts) - 1):
                    with autocast():
                        out = engine.forward(images[start:end].to(engine.device, non_blocking=True),
                                             masks.rows(start, end))
                    engine.backward(out.loss * weight)
                loss = loss + out.loss.detach().float() * weight
                for name, value in out.metrics.items():  # per-image means: weighted like the loss
                    metrics[name] = metrics.get(name, 0.0) + value.detach().float() * weight
        return ObjectiveOutput(loss, metrics)
