"""ASL (Self-Supervised Representation Learning from Arbitrary Scenarios): MAE plus a second,
feature-augmented prediction branch, the two branches' pixel predictions aligned patch by patch.

Two ways to make the second branch (papers/asl-arbitrary-scenarios.md, Fig. 3):

- AEE (default): one encoder-width pre-LN ViT block after the encoder's output,
  `fea_ori = encoder(visible)`, `fea_aug = block(fea_ori)` ([CLS] and tokens alike);
- DLE: dropout on the patch embeddings and the encoder run twice (`ObjectiveNeeds.encoder_passes`
  and `embed_dropout`: the encoder pass provides both branches as two groups).

Both branches go through the same MAE decoder (scale/objectives/mae.py) with the same mask.

    L     = mae_weight * L_MAE + align_weight * L_SEM                       (Eq. 11, 1 : 1)
    L_MAE = mean of the two branches' masked norm-pix MSE   (option: the original branch only)
    L_SEM = masked mean of L_s(i) = |ori_i - sg(aug_i)| + |sg(ori_i) - aug_i|          (Eq. 9-10)

with |.| the mean absolute difference over the p*p*C values of patch i, then the mean over the
masked patches (MAE's reduction, so that "coefficients 1" compares like with like). Eq. 9's
gradient is that of a plain L1 on each branch; only its value is twice the L1. Options for
the ablations: cosine instead of L1 (`1 - cos` per patch, same stop-gradients) and aligning the
decoder's [CLS] output too. After pre-training the block and the decoder are dropped: the
export keeps `encoder.*` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Literal, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..config import Check
from ..models import ViTSpec
from ..models.attention import BackendAttention
from ..models.flops import blocks_forward_flops
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput,
                   fp32_region, local_gather)
from .mae import DecoderConfig, MAEConfig, MAEDecoder, init_linear_and_norm, mask_of, masked_mse, pixel_targets


@dataclass
class ASLConfig:
    """ASL's own block (objective.asl.*, papers/asl-arbitrary-scenarios.md): the feature-augmented second
    branch and how its pixel predictions are aligned with the original's, patch by patch."""
    branch: Literal["aee", "dle"] = "aee"  # aee: one ViT block after the encoder | dle: embedding dropout, encoder run twice
    dle_dropout: float = 0.1  # DLE: dropout on the patch embeddings (the paper gives no value; reading 0.1)
    mae_weight: float = 1.0  # Eq. 11: L = mae_weight * L_MAE + align_weight * L_SEM, 1 : 1
    align_weight: float = 1.0
    # both: L_MAE is the mean of the two branches' MSE | original: first branch only
    mae_branches: Literal["both", "original"] = "both"
    align_loss: Literal["l1", "cosine"] = "l1"  # l1 (Eq. 9) | cosine (the ablation)
    align_cls: bool = False  # also align the decoder's [CLS] output (the ablation; off in the paper)


@dataclass
class ASLObjectiveConfig(MAEConfig):
    """ASL's keys (objective.*): MAE's decoder and targets, plus its `asl` block."""
    asl: ASLConfig = field(default_factory=ASLConfig)

    def validate(self, check: Check) -> None:
        super().validate(check)
        a = self.asl
        check.range("asl.dle_dropout", a.dle_dropout, 0.0, 1.0, high_open=True)
        check.unused("asl.dle_dropout", a.branch != "dle", "objective.asl.branch is aee (dropout is DLE's)")
        check.range("asl.mae_weight", a.mae_weight, 0.0, 1000.0)
        check.range("asl.align_weight", a.align_weight, 0.0, 1000.0)
        # Both 0: the loss is 0 with zero gradients, and the run trains nothing without a word.
        check.require(a.mae_weight > 0 or a.align_weight > 0,
                      "objective.asl.mae_weight and objective.asl.align_weight must not both be 0 (the loss would be "
                      "0 and nothing would train); give at least one of them a value in (0, 1000]")


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., P) -> (...): mean absolute difference over the last dim."""
    return (a - b).abs().mean(dim=-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., P) -> (...): 1 - cosine similarity over the last dim."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-6)


ALIGN_DISTANCES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": l1_distance, "cosine": cosine_distance}


def symmetric_alignment(ori: torch.Tensor, aug: torch.Tensor, distance: Callable) -> torch.Tensor:
    """Eq. 9 per position: d(ori, sg(aug)) + d(sg(ori), aug), shape (...)."""
    return distance(ori, aug.detach()) + distance(ori.detach(), aug)


class ASLObjective(Objective):
    couples_batch = False  # per-image losses: micro-batches accumulate exactly, like MAE
    num_groups = 1  # the mask's visible groups (DLE's second pass is an encoder pass, not a mask group)
    console_metrics = (("loss_mae", "mae"), ("loss_sem", "sem"), ("pred_gap", "gap"))

    def __init__(self, spec: ViTSpec, decoder: DecoderConfig, asl: ASLConfig, norm_pix_loss: bool = True):
        super().__init__()
        self.spec, self.cfg, self.norm_pix_loss = spec, asl, norm_pix_loss
        # The decoder first: with the same seed it is initialised exactly as MAE's (the MAE-equality test).
        self.decoder = MAEDecoder(spec, decoder)
        dle = asl.branch == "dle"
        self.needs = ObjectiveNeeds(tokens=True, images=True, encoder_passes=2 if dle else 1,
                                    embed_dropout=asl.dle_dropout if dle else 0.0)
        self.aug_block = None if dle else Block(
            spec.embed_dim, spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), attn_layer=BackendAttention)
        if self.aug_block is not None:
            init_linear_and_norm(self.aug_block)  # the encoder's MAE init
        self.distance = ALIGN_DISTANCES[asl.align_loss]

    def branch_features(self, batch: ObjectiveBatch) -> List[torch.Tensor]:
        """The two branches' (B, 1 + n, D) features ([CLS] first), original first."""
        if self.aug_block is None:  # DLE: the encoder's two passes are the two groups
            if batch.cls.shape[1] != 2:
                raise ValueError(f"ASL-DLE needs two encoder passes (two groups), got {batch.cls.shape[1]}")
            return [torch.cat([batch.cls[:, g].unsqueeze(1), batch.tokens[:, g]], dim=1) for g in (0, 1)]
        if batch.cls.shape[1] != 1:
            raise ValueError(f"ASL-AEE decodes one visible group per image, got {batch.cls.shape[1]}")
        ori = torch.cat([batch.cls[:, 0].unsqueeze(1), batch.tokens[:, 0]], dim=1)
        return [ori, self.aug_block(ori)]

    def aug_scored(self) -> bool:
        """Whether any loss term reads the second branch's predictions."""
        return self.cfg.align_weight > 0 or self.cfg.mae_branches == "both"

    def branches(self, batch: ObjectiveBatch) -> List[torch.Tensor]:
        """The two branches' (B, 1 + N, p*p*C) decoder outputs ([CLS] row first), original first.
        One decoder call over both (2B rows): each decoder unit then runs, and under FSDP2
        reduce-scatters, once per step. When no loss reads the second branch (the MAE-equivalent
        ablation) it is decoded apart and without gradients, for its metric only."""
        ori, aug = self.branch_features(batch)
        ids = batch.masks.group_ids[:, 0]
        decode = self.decoder.decode_all
        if not self.aug_scored():
            with torch.no_grad():
                aug_pred = decode(aug[:, 0], aug[:, 1:], ids)
            return [decode(ori[:, 0], ori[:, 1:], ids), aug_pred]
        both = torch.cat([ori, aug], dim=0)
        return list(decode(both[:, 0], both[:, 1:], torch.cat([ids, ids], dim=0)).chunk(2, dim=0))

    def forward(self, batch: ObjectiveBatch, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        ori, aug = self.branches(batch)
        return ObjectiveOutput(*self.branch_loss(ori, aug, batch.images, batch.masks.masked_ids))

    def branch_loss(self, ori: torch.Tensor, aug: torch.Tensor, images: torch.Tensor,
                    masked_ids: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 11's loss and its metrics from the two branches' decoder outputs (B, 1 + N, p*p*C), in fp32:
        tensors only (train.compile compiles it)."""
        cfg = self.cfg
        with fp32_region(ori.device):
            ori, aug = ori.float(), aug.float()
            target = pixel_targets(images, self.spec.patch_size, self.norm_pix_loss)
            mask = mask_of(masked_ids, self.spec.num_patches)
            mse_ori = masked_mse(ori[:, 1:], target, mask)
            loss_mae = mse_ori if cfg.mae_branches == "original" else (mse_ori + masked_mse(aug[:, 1:], target, mask)) / 2
            per_patch = symmetric_alignment(ori[:, 1:], aug[:, 1:], self.distance)
            loss_sem = (per_patch * mask).sum() / mask.sum()
            if cfg.align_cls:
                loss_sem = loss_sem + symmetric_alignment(ori[:, 0], aug[:, 0], self.distance).mean()
            loss = cfg.mae_weight * loss_mae
            if cfg.align_weight:  # weight 0 adds nothing at all (ASL then equals MAE exactly: tests)
                loss = loss + cfg.align_weight * loss_sem
            gap = ((ori[:, 1:] - aug[:, 1:]).abs().mean(dim=-1) * mask).sum() / mask.sum()
        return loss, {"loss_mae": loss_mae.detach(), "loss_sem": loss_sem.detach(), "pred_gap": gap.detach()}

    def blocks(self) -> List[nn.Module]:
        """Shard units: the decoder's blocks and the AEE block (each its own bf16 FSDP2 unit)."""
        return list(self.decoder.decoder_blocks) + ([self.aug_block] if self.aug_block is not None else [])

    def loss_methods(self) -> List[str]:
        return ["branch_loss"]

    def forward_flops(self, spec: ViTSpec, num_images: int, visible_per_group: int) -> int:
        """Two decoder passes, plus AEE's block over [CLS] + the visible tokens (DLE's second encoder
        pass is counted by the trainer from `needs.encoder_passes`)."""
        flops = 2 * self.decoder.forward_flops(num_images, visible_per_group)
        if self.aug_block is not None:
            flops += blocks_forward_flops(spec.embed_dim, spec.mlp_ratio, 1, num_images, 1 + visible_per_group)
        return flops


@OBJECTIVES.register("asl", config=ASLObjectiveConfig)
def build_asl(cfg: ASLObjectiveConfig, spec: ViTSpec) -> Objective:
    return ASLObjective(spec, cfg.decoder, cfg.asl, cfg.norm_pix_loss)
