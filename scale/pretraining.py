"""What pre-training optimises: an encoder plus an objective, as one nn.Module.

Engines (DDP, FSDP, DeepSpeed) wrap this module whole, so every trainable parameter, the
objective's (temperature, head, decoder) included, is synchronised by the engine. The
engines call its methods through their wrapper (`Engine.encode`, `Engine.score`,
`Engine.model_signal`), so FSDP2's unshard and ZeRO-3's gather hooks fire for each.

`parallel_plan()` is the method's declaration of how it may be parallelised: which blocks
are shard units (and where activation checkpointing and compile apply) and which modules
stay fp32. `scale/engine/parallelize.py` applies it, per engine, from outside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .config import RunConfig
from .masking import Masks, SignalRequest, build_mask_generator
from .models import VisibleTokenViT, build_encoder
from .models.ema import WeightEMA
from .models.attention import BackendAttention
from .objectives import (FeatureGather, Objective, ObjectiveBatch, ObjectiveOutput, build_objective,
                         local_gather)

ATTENTION_SIGNAL = "attention"
ENCODER_PREFIX = "encoder."


@dataclass
class ParallelPlan:
    """How a method may be parallelised, declared by the model and applied by the engines."""

    encoder_blocks: List[nn.Module]  # shard units; activation checkpointing and compile apply here
    objective_blocks: List[nn.Module] = field(default_factory=list)  # e.g. MAE's decoder blocks: the same
    fp32_modules: List[nn.Module] = field(default_factory=list)  # parameters kept and computed in fp32
    # (objective, method name): the loss after any gather, compiled in place by train.compile (Objective.loss_methods)
    loss_methods: List[Tuple[nn.Module, str]] = field(default_factory=list)


class PretrainModule(nn.Module):
    def __init__(self, encoder: VisibleTokenViT, objective: Objective, signal: Optional[SignalRequest] = None):
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        encoder.set_embed_dropout(objective.needs.embed_dropout)
        # The mask generator's signal source when it asks for an EMA of the encoder (EHM's ablation).
        self.signal_ema: Optional[WeightEMA] = None
        if signal is not None and signal.ema_decay is not None:
            self.signal_ema = WeightEMA(encoder, ENCODER_PREFIX, signal.ema_decay)

    def encode(self, images: torch.Tensor, masks: Masks) -> ObjectiveBatch:
        """One encoder pass over every group (repeated `needs.encoder_passes` times, as extra groups of
        the same pass), with what the objective declared it needs."""
        needs = self.objective.needs
        group_ids = masks.group_ids.repeat(1, needs.encoder_passes, 1) if needs.encoder_passes > 1 else masks.group_ids
        out = self.encoder.encode(images, group_ids, with_tokens=needs.tokens)
        return ObjectiveBatch(cls=out.cls, masks=masks, tokens=out.tokens, images=images if needs.images else None)

    def score(self, batch: ObjectiveBatch, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        return self.objective(batch, gather)

    def forward(self, images: torch.Tensor, masks: Masks, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        return self.score(self.encode(images, masks), gather)

    @torch.no_grad()
    def model_signal(self, images: torch.Tensor, request: SignalRequest) -> torch.Tensor:
        """A signal of the current model (or of its EMA) for mask generators (`MaskNeeds.model_signal`)."""
        if request.kind != ATTENTION_SIGNAL:
            raise ValueError(f"unknown model signal {request.kind!r}; available: {ATTENTION_SIGNAL}")
        if request.ema_decay is None:
            return self.encoder.attention_maps(images, request.blocks)
        if self.signal_ema is None:
            raise ValueError("an EMA signal was requested from a PretrainModule built without one")
        # The EMA is fp32 buffers: FSDP2's mixed precision casts the inputs of every forward to bf16.
        return self.signal_ema.model.attention_maps(images.float(), request.blocks)

    def weight_followers(self) -> List[WeightEMA]:
        """State that follows the weights after each optimizer step (`Engine.update_weight_followers`)."""
        return [self.signal_ema] if self.signal_ema is not None else []

    def set_attn_backend(self, backend: str) -> str:
        """The attention kernel of the encoder and of the objective's blocks (a decoder's)."""
        resolved = self.encoder.set_attn_backend(backend)
        for module in self.objective.modules():
            if isinstance(module, BackendAttention):
                module.backend = resolved
        return resolved

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(encoder_blocks=list(self.encoder.blocks), objective_blocks=self.objective.blocks(),
                            fp32_modules=self.objective.fp32_modules(),
                            loss_methods=[(self.objective, name) for name in self.objective.loss_methods()])

    def no_weight_decay(self) -> set:
        return ({f"encoder.{name}" for name in self.encoder.no_weight_decay()}
                | {f"objective.{name}" for name in self.objective.no_weight_decay()})


def build_pretrain_module(cfg: RunConfig, attn_backend: str = "sdpa") -> PretrainModule:
    encoder = build_encoder(cfg.model.name, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                            train_patch_embed=cfg.model.train_patch_embed, attn_backend=attn_backend,
                            drop_path_rate=cfg.model.drop_path_rate, init=cfg.model.init)
    signal = build_mask_generator(cfg.mask, encoder.spec.grid_size).needs.model_signal
    return PretrainModule(encoder, build_objective(cfg.objective, encoder.spec), signal)
