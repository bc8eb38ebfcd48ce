"""MAE's objective (He et al., `models_mae.py`): decode every patch from the visible tokens,
score the pixels of the masked ones.

The encoder has already run (on the visible patches only, one group per image); this
objective owns MAE's decoder and loss:

- decoder: Linear(D -> 512) of [CLS] and the visible tokens, a learnt mask token at every
  masked position (placed by index: MAE's unshuffle with `ids_restore`), fixed 2-D sin-cos
  decoder positions (zero [CLS] row), 8 ViT blocks (512-d, 16 heads, MLP 4, qkv bias,
  LayerNorm eps 1e-6), LayerNorm, Linear(512 -> p*p*C); the [CLS] output is dropped;
- target: `patchify` in (h, w, p, q, c) order; with norm_pix_loss each patch is normalised
  by its own mean and *unbiased* variance, `(x - mean) / sqrt(var + 1e-6)`;
- loss: per-patch MSE averaged over the p*p*C values, then over the MASKED patches only,
  `(loss * mask).sum() / mask.sum()`, computed in fp32 (the decoder runs under autocast);
- init: Xavier-uniform on every Linear, N(0, 0.02) mask token, LayerNorm (1, 0).

The loss is a per-image mean over exactly r*N masked patches, so it does not couple the
batch: micro-batches accumulate gradients exactly (scale/engine/accumulation.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from ..config import Check, ConfigError
from ..models import ViTSpec
from ..models.attention import BackendAttention
from ..models.flops import blocks_forward_flops, linear_flops
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput,
                   fp32_region, local_gather)


@dataclass
class DecoderConfig:
    """MAE's pixel decoder (MAE, ASL): a narrow ViT over all patch positions."""
    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class MAEConfig:
    """MAE's keys (objective.*): its decoder and its pixel targets."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    norm_pix_loss: bool = True  # targets: each patch normalised by its mean and (unbiased) variance

    def validate(self, check: Check) -> None:
        d = self.decoder
        check.range("decoder.dim", d.dim, 1)
        check.range("decoder.depth", d.depth, 1)
        check.range("decoder.num_heads", d.num_heads, 1)
        check.require(d.dim % d.num_heads == 0 and d.dim % 4 == 0,
                      f"objective.decoder.dim must be divisible by 4 and by objective.decoder.num_heads, got "
                      f"{d.dim} and {d.num_heads}")
        check.range("decoder.mlp_ratio", d.mlp_ratio, 0.0, float("inf"), low_open=True, high_open=True)
        # The loss is computed on the masked patches: with none masked it is 0 / 0 (NaN).
        ratio, name = check.run.mask.ratio, check.run.objective.name
        check.require(ratio > 0, f"mask.ratio must be in (0, 1) for objective.name={name}, whose loss is computed on "
                                 f"the masked patches; got {ratio}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, values in (p, q, c) order (MAE's)."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, patch_size * patch_size * C)


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked patches (mask == 1) of each patch's mean squared error."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mask_of(masked_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, m) masked patch indices -> (B, N) float mask, 1 where masked."""
    mask = torch.zeros(masked_ids.shape[0], num_patches, device=masked_ids.device)
    return mask.scatter_(1, masked_ids, 1.0)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's init of a module's layers: Xavier-uniform Linear with zero bias, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAEDecoder(nn.Module):
    """MAE's decoder: every patch position from the visible tokens and a shared mask token."""

    def __init__(self, spec: ViTSpec, cfg: DecoderConfig):
        super().__init__()
        if cfg.dim % 4:
            raise ConfigError(f"objective.decoder.dim must be divisible by 4 (2-D sin-cos), got {cfg.dim}")
        self.spec, self.dim = spec, cfg.dim
        self.decoder_embed = nn.Linear(spec.embed_dim, cfg.dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.num_patches, cfg.dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(cfg.dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), attn_layer=BackendAttention)
            for _ in range(cfg.depth)])
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.dim, spec.patch_size ** 2 * spec.in_chans, bias=True)
        self.mlp_ratio, self.depth = cfg.mlp_ratio, cfg.depth
        self.init_weights()

    def init_weights(self) -> None:
        pos = build_sincos2d_pos_embed([self.spec.grid_size, self.spec.grid_size], self.dim)
        with torch.no_grad():
            self.decoder_pos_embed[:, 1:].copy_(pos.unsqueeze(0))
            self.decoder_pos_embed[:, :1].zero_()
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor, visible_ids: torch.Tensor) -> torch.Tensor:
        """cls (B, D), tokens (B, n, D) at patch positions visible_ids (B, n) -> (B, N, p*p*C)."""
        return self.decode_all(cls, tokens, visible_ids)[:, 1:]

    def decode_all(self, cls: torch.Tensor, tokens: torch.Tensor, visible_ids: torch.Tensor) -> torch.Tensor:
        """As `forward`, with the [CLS] position's output first: (B, 1 + N, p*p*C) (ASL may align it)."""
        B, N = tokens.shape[0], self.spec.num_patches
        visible = self.decoder_embed(tokens)
        full = self.mask_token.to(visible.dtype).expand(B, N, self.dim)
        full = full.scatter(1, visible_ids.unsqueeze(-1).expand(-1, -1, self.dim), visible)
        x = torch.cat([self.decoder_embed(cls).unsqueeze(1), full], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)

    def forward_flops(self, num_images: int, visible: int) -> int:
        seq = 1 + self.spec.num_patches
        return (linear_flops(num_images * (1 + visible), self.spec.embed_dim, self.dim)
                + blocks_forward_flops(self.dim, self.mlp_ratio, self.depth, num_images, seq)
                + linear_flops(num_images * seq, self.dim, self.decoder_pred.out_features))


class MAEObjective(Objective):
    needs = ObjectiveNeeds(tokens=True, images=True)
    couples_batch = False
    num_groups = 1

    def __init__(self, spec: ViTSpec, decoder: DecoderConfig, norm_pix_loss: bool = True):
        super().__init__()
        self.spec, self.norm_pix_loss = spec, norm_pix_loss
        self.decoder = MAEDecoder(spec, decoder)

    def predict(self, batch: ObjectiveBatch) -> torch.Tensor:
        """(B, N, p*p*C) pixel predictions of every patch from the single visible group."""
        return self.decoder(batch.cls[:, 0], batch.tokens[:, 0], batch.masks.group_ids[:, 0])

    def loss_of(self, pred: torch.Tensor, batch: ObjectiveBatch) -> torch.Tensor:
        """Norm-pix MSE on the masked patches, in fp32."""
        return self.pixel_loss(pred, batch.images, batch.masks.masked_ids)

    def pixel_loss(self, pred: torch.Tensor, images: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
        """`loss_of` on tensors alone (train.compile compiles it)."""
        with fp32_region(pred.device):
            target = pixel_targets(images, self.spec.patch_size, self.norm_pix_loss)
            return masked_mse(pred.float(), target, mask_of(masked_ids, self.spec.num_patches))

    def forward(self, batch: ObjectiveBatch, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        if batch.cls.shape[1] != 1:
            raise ValueError(f"MAE decodes one visible group per image, got {batch.cls.shape[1]}")
        return ObjectiveOutput(self.loss_of(self.predict(batch), batch))

    def blocks(self) -> List[nn.Module]:
        return list(self.decoder.decoder_blocks)

    def loss_methods(self) -> List[str]:
        return ["pixel_loss"]

    def forward_flops(self, spec: ViTSpec, num_images: int, visible_per_group: int) -> int:
        return self.decoder.forward_flops(num_images, visible_per_group)


@OBJECTIVES.register("mae", config=MAEConfig)
def build_mae(cfg: MAEConfig, spec: ViTSpec) -> Objective:
    return MAEObjective(spec, cfg.decoder, cfg.norm_pix_loss)
