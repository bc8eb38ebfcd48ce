"""What pre-training optimises: an encoder plus an objective, as one nn.Module.

Engines (DDP, FSDP, DeepSpeed) wrap this module whole, so every trainable parameter,
the objective's temperature and head included, is synchronised by the engine.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .config import RunConfig
from .models import VisibleTokenViT, build_encoder
from .objectives import FeatureGather, Objective, ObjectiveOutput, build_objective, local_gather


class PretrainModule(nn.Module):
    def __init__(self, encoder: VisibleTokenViT, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def embed(self, images: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, group_ids)

    def score(self, embeddings: torch.Tensor, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        # The loss runs in fp32 whatever the encoder's autocast says: logits / 0.001 in bf16 lose too much.
        device_type = embeddings.device.type
        with torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else contextlib.nullcontext():
            return self.objective(embeddings.float(), gather)

    def forward(self, images: torch.Tensor, group_ids: torch.Tensor,
                gather: FeatureGather = local_gather) -> ObjectiveOutput:
        return self.score(self.embed(images, group_ids), gather)

    def no_weight_decay(self) -> set:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}


def build_pretrain_module(cfg: RunConfig, attn_backend: str = "sdpa") -> PretrainModule:
    encoder = build_encoder(cfg.model.name, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                            train_patch_embed=cfg.model.train_patch_embed, attn_backend=attn_backend,
                            drop_path_rate=cfg.model.drop_path_rate)
    return PretrainModule(encoder, build_objective(cfg.objective, encoder.embed_dim))
