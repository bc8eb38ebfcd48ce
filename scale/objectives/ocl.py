"""OCL's objective: symmetric cross-entropy over T-SP similarities of the two groups' CLS.

For image i, groups a_i and b_i are the positive pair; every other image's groups in
the global batch are negatives. Each rank scores its local rows against the gathered
global columns in both directions (open_clip's "local loss + gather with grad"), which
with gradient averaging across ranks gives the gradient of the global loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Check, ConfigError
from ..models import ViTSpec
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveOutput, fp32_region,
                   local_gather)
from .heads import mlp_head


@dataclass
class HeadConfig:
    layers: Literal[0, 2, 3] = 0  # 0: no head (paper default); 2 or 3: MoCo v3-style MLP head
    hidden_dim: int = 1024
    out_dim: int = 512


@dataclass
class OCLConfig:
    """OCL's keys (objective.*): the T-SP concentration, the learnt temperature and an optional head."""
    kappa: float = 64.0  # T-SP concentration; .inf gives (1 + c) / 2
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    learn_temperature: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)

    def validate(self, check: Check) -> None:
        check.require(self.kappa > 0, f"objective.kappa must be > 0 (or .inf), got {self.kappa}")
        check.require(0 < self.min_temperature <= self.init_temperature <= self.max_temperature < math.inf,
                      "objective temperatures must satisfy 0 < min_temperature <= init_temperature <= max_temperature "
                      f"< inf, got {self.min_temperature}, {self.init_temperature}, {self.max_temperature}")
        check.range("head.hidden_dim", self.head.hidden_dim, 1)
        check.range("head.out_dim", self.head.out_dim, 1)
        check.unused("head.hidden_dim", self.head.layers == 0, "objective.head.layers is 0 (no head)")
        check.unused("head.out_dim", self.head.layers == 0, "objective.head.layers is 0 (no head)")


def tsp_similarity(cosine: torch.Tensor, kappa: float) -> torch.Tensor:
    """T-distributed spherical similarity: (1 + c) / 2 / (1 + (1 - c) / kappa), in [0, 1].

    Smaller kappa concentrates the similarity near c = 1; kappa = inf gives (1 + c) / 2.
    """
    half = (1.0 + cosine) / 2.0
    if math.isinf(kappa):
        return half
    return half / (1.0 + (1.0 - cosine) / kappa)


class OCLObjective(Objective):
    couples_batch = True  # every other image of the global batch is a negative
    min_global_batch = 2
    num_groups = 2
    console_metrics = (("temperature", "τ"),)

    def __init__(self, embed_dim: int, kappa: float = 64.0, init_temperature: float = 0.07,
                 min_temperature: float = 0.001, max_temperature: float = 0.5,
                 learn_temperature: bool = True, head_layers: int = 0, head_hidden_dim: int = 1024,
                 head_out_dim: int = 512):
        super().__init__()
        if kappa <= 0:
            raise ConfigError(f"objective.kappa must be > 0, got {kappa}")
        self.kappa = kappa
        self.log_min, self.log_max = math.log(min_temperature), math.log(max_temperature)
        # Stored as a log so the optimizer moves it multiplicatively (as CLIP's logit scale).
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)),
                                            requires_grad=learn_temperature)
        self.head = mlp_head(embed_dim, head_layers, head_hidden_dim, head_out_dim) if head_layers else nn.Identity()

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, batch: ObjectiveBatch, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        # The loss runs in fp32 whatever the encoder's autocast says: logits / 0.001 in bf16 lose too much.
        with fp32_region(batch.cls.device):
            return self.score(batch.cls.float(), gather)

    def score(self, embeddings: torch.Tensor, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        """The loss of (B, 2, D) CLS embeddings, in the dtype they come in."""
        if embeddings.ndim != 3 or embeddings.shape[1] != 2:
            raise ValueError(f"OCL needs (B, 2, D) embeddings (two groups per image), got {tuple(embeddings.shape)}")
        B = embeddings.shape[0]
        z = self.head(embeddings.reshape(2 * B, -1))
        z = F.normalize(z, dim=-1).reshape(B, 2, -1)
        a, b = z[:, 0], z[:, 1]
        a_all, offset = gather(a)
        b_all, _ = gather(b)
        return ObjectiveOutput(*self.contrastive_loss(a, b, a_all, b_all, offset))

    def contrastive_loss(self, a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                         offset: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss and metrics of local unit embeddings a, b (B, d) against the gathered a_all, b_all,
        where this rank's rows start at `offset`: tensors only, the gather done (train.compile compiles it)."""
        B = a.shape[0]
        cos_ab = a @ b_all.T  # local groups A vs every group B
        cos_ba = b @ a_all.T  # local groups B vs every group A
        inv_t = 1.0 / self.temperature
        labels = torch.arange(B, device=a.device) + offset
        loss = 0.5 * (F.cross_entropy(tsp_similarity(cos_ab, self.kappa) * inv_t, labels)
                      + F.cross_entropy(tsp_similarity(cos_ba, self.kappa) * inv_t, labels))
        with torch.no_grad():
            positive = cos_ab.gather(1, labels[:, None]).mean()
            negative_sum = cos_ab.sum() - positive * B
            negative = negative_sum / max(B * (cos_ab.shape[1] - 1), 1)
        return loss, {"pos_cos": positive, "neg_cos": negative, "temperature": self.temperature.detach()}

    def parameter_bounds(self) -> Dict[str, Tuple[float, float]]:
        """log τ stays in [log min_temperature, log max_temperature] (the engine clamps it after each step)."""
        return {"log_temperature": (self.log_min, self.log_max)}


    def fp32_modules(self):
        return [self]  # the temperature and the optional head

    def loss_methods(self) -> List[str]:
        return ["contrastive_loss"]  # after the gather (a collective, with the engine's timing)


@OBJECTIVES.register("ocl", config=OCLConfig)
def build_ocl(cfg: OCLConfig, spec: ViTSpec) -> Objective:
    return OCLObjective(spec.embed_dim, kappa=cfg.kappa, init_temperature=cfg.init_temperature,
                        min_temperature=cfg.min_temperature, max_temperature=cfg.max_temperature,
                        learn_temperature=cfg.learn_temperature, head_layers=cfg.head.layers,
                        head_hidden_dim=cfg.head.hidden_dim, head_out_dim=cfg.head.out_dim)
