"""The two encoders that a pre-trained one must beat to have learnt anything, evaluated by the
same code as the real encoder (`extract_features` accepts them like a timm model):

- raw pixels: the image itself, flattened, in [0, 1] (the data normalisation undone);
- random init: the run's own architecture and initialisation, before its first step.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..config import RunConfig
from ..models import VisibleTokenViT
from ..pretraining import build_pretrain_module


class PixelEncoder(nn.Module):
    """Images -> flattened pixels in [0, 1], with timm's `forward_features`/`forward_head`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.std + self.mean).flatten(1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return features


def random_init_encoder(cfg: RunConfig) -> VisibleTokenViT:
    """The encoder exactly as the Trainer initialises it (same seed, same init scheme)."""
    torch.manual_seed(cfg.train.seed)
    return build_pretrain_module(cfg).encoder
