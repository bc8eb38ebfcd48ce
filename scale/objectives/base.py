"""The objective interface: CLS embeddings of every group in -> loss and metrics out.

An objective is an nn.Module because it may own trainable state (OCL's temperature, an
optional projection head). It never talks to torch.distributed itself: it receives a
`FeatureGather` that turns local rows into the global batch (identity in a single
process, an autograd-aware all-gather across ranks), so the same code scores against
the local or the global batch.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, Protocol, Tuple

import torch
import torch.nn as nn

from ..config import ObjectiveConfig
from ..registry import Registry


class FeatureGather(Protocol):
    def __call__(self, local: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(B_local, ...) -> (B_global, ...) and the row offset of this rank's rows in it."""


def local_gather(local: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The single-process gather: the local batch is the global batch."""
    return local, 0


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


class Objective(nn.Module, abc.ABC):
    @abc.abstractmethod
    def forward(self, embeddings: torch.Tensor, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        """embeddings: (B_local, G, D) encoder outputs, one row per group of each image."""

    def parameter_bounds(self) -> Dict[str, Tuple[float, float]]:
        """Closed intervals that parameters must stay in, keyed by parameter name relative to
        this objective (e.g. OCL's log-temperature). The objective only declares them: the
        engine projects the parameters back into them after every optimizer step, on every
        copy its optimizer keeps (`Engine.apply_parameter_bounds`; DeepSpeed's fp32 master
        copy included, which a clamp of this module's copy would miss)."""
        return {}


OBJECTIVES: Registry[Objective] = Registry("objective", "objective.name")


def build_objective(cfg: ObjectiveConfig, embed_dim: int) -> Objective:
    return OBJECTIVES.build(cfg.name, cfg, embed_dim)
