"""The objective interface: one batch object in, loss and metrics out.

An objective is an nn.Module because it may own trainable state (OCL's temperature and
head, MAE's decoder). It declares what it needs (`ObjectiveNeeds`: the visible tokens, the
images) and the encoder pass provides exactly that in an `ObjectiveBatch`. It never talks
to torch.distributed itself: it receives a `FeatureGather` that turns local rows into the
global batch (identity in a single process, an autograd-aware all-gather across ranks), so
the same code scores against the local or the global batch.

Precision: the objective runs under the step's autocast. Where a loss needs fp32 (OCL's
logits divided by a temperature of 0.001), the objective opens `fp32_region()` itself,
so a decoder (MAE) still runs in bf16.

Parallelism is applied from outside (scale/engine/parallelize.py) from what the objective
declares: its shard units (e.g. decoder blocks), the modules whose parameters stay fp32
(e.g. OCL's temperature and head), and the blocks where activation checkpointing and
compile apply.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import torch
import torch.nn as nn

from ..config import ObjectiveConfig
from ..masking import Masks
from ..models import ViTSpec
from ..registry import Registry


class FeatureGather(Protocol):
    def __call__(self, local: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(B_local, ...) -> (B_global, ...) and the row offset of this rank's rows in it."""


def local_gather(local: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The single-process gather: the local batch is the global batch."""
    return local, 0


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What the encoder pass must hand the objective besides the CLS of every group."""

    tokens: bool = False  # the visible tokens after the final norm (MAE, ASL)
    images: bool = False  # the input images (pixel targets)
    # Independent encoder passes over the same visible patches, as extra groups: the batch's groups are
    # the mask's G groups once per pass, (B, passes * G, ...). ASL's DLE: 2, made different by
    # dropout on the patch embeddings (`embed_dropout`, off in eval mode).
    encoder_passes: int = 1
    embed_dropout: float = 0.0


@dataclass
class ObjectiveBatch:
    """Everything an objective may score, for the local batch of B images with G groups of n patches."""

    cls: torch.Tensor  # (B, G, D) [CLS] output of every group, after the final norm
    masks: Masks  # group_ids (B, G, n) visible patch indices; masked_ids (B, m) patches no group sees
    tokens: Optional[torch.Tensor] = None  # (B, G, n, D) visible tokens after the final norm, if needed
    images: Optional[torch.Tensor] = None  # (B, C, H, W) normalised images, if needed


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


@contextlib.contextmanager
def fp32_region(device: torch.device) -> Iterator[None]:
    """Autocast off: what runs inside computes in the dtype of its inputs (cast them to fp32)."""
    if device.type in ("cuda", "cpu"):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


class Objective(nn.Module, abc.ABC):
    needs: ObjectiveNeeds = ObjectiveNeeds()
    # Whether the loss couples the images of a batch (a contrastive loss: OCL). Coupled losses reach
    # large batches by gradient caching; per-image losses (MAE, ASL) by exact gradient accumulation.
    couples_batch: bool = False
    min_global_batch: int = 1  # images per step the loss needs (a contrastive loss: 2, for one negative)
    num_groups: int = 1  # visible groups per image the objective scores (MAE: 1, OCL: 2)
    # (metric key, short label) of the metrics worth a glance on the console line, besides
    # loss and lr (OCL: its temperature as "τ"); every metric still goes to metrics.jsonl.
    console_metrics: Tuple[Tuple[str, str], ...] = ()

    @abc.abstractmethod
    def forward(self, batch: ObjectiveBatch, gather: FeatureGather = local_gather) -> ObjectiveOutput:
        """Loss of the local batch (against the global one where the objective gathers)."""

    def parameter_bounds(self) -> Dict[str, Tuple[float, float]]:
        """Closed intervals that parameters must stay in, keyed by parameter name relative to
        this objective (e.g. OCL's log-temperature). The objective only declares them: the
        engine projects the parameters back into them after every optimizer step, on every
        copy its optimizer keeps (`Engine.apply_parameter_bounds`; DeepSpeed's fp32 master
        copy included, which a clamp of this module's copy would miss)."""
        return {}

    # ------------------------------------------------------------ declarations for parallelize
    def blocks(self) -> List[nn.Module]:
        """Transformer blocks of the objective (a decoder's): each its own shard unit, and where
        activation checkpointing and compile apply."""
        return []

    def no_weight_decay(self) -> set:
        """Parameter names (relative to the objective) without weight decay besides norms and biases."""
        return set()

    def fp32_modules(self) -> List[nn.Module]:
        """Submodules whose parameters stay fp32 and compute in fp32 under every engine."""
        return []

    def loss_methods(self) -> List[str]:
        """Names of this objective's methods that compute its loss from tensors alone, after any
        gather: no collective, no host read, shapes fixed by the batch. train.compile compiles each
        in place (scale/engine/parallelize.py), as it does the blocks; the gather and the engines'
        hooks stay eager around them."""
        return []

    def forward_flops(self, spec: ViTSpec, num_images: int, visible_per_group: int) -> int:
        """Forward matmul FLOPs of the objective's own layers (a decoder) for `num_images` images."""
        return 0


OBJECTIVES: Registry[Objective] = Registry("objective", "objective.name")


def build_objective(cfg: ObjectiveConfig, spec: ViTSpec) -> Objective:
    """The objective `cfg.name` names, built from its section (its own config plus `name`)."""
    return OBJECTIVES.build(cfg.name, cfg, spec)
