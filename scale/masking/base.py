"""The mask-generator interface.

A generator turns (batch size, patch grid) into index tensors: for each image, the
patches each encoder pass sees. Indices are produced outside the model so that the
same masks can be replayed exactly (gradient caching, resume), and on the model's
device so that no host round-trip sits in the step.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, ContextManager, Dict, Optional, Tuple

import torch

from ..config import ConfigError, MaskConfig
from ..models import ViTSpec
from ..models.flops import blocks_forward_flops, patch_embed_flops
from ..registry import Registry


@dataclass
class Masks:
    group_ids: torch.Tensor  # (B, G, n) visible patch indices of each group
    masked_ids: Optional[torch.Tensor] = None  # (B, m) patches no group sees
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # logged with the step, e.g. EHM's depth

    @property
    def num_groups(self) -> int:
        return self.group_ids.shape[1]

    @property
    def visible_per_group(self) -> int:
        return self.group_ids.shape[2]

    def rows(self, start: int, end: int) -> "Masks":
        """The masks of images start..end-1 (a micro-batch)."""
        return Masks(self.group_ids[start:end], None if self.masked_ids is None else self.masked_ids[start:end],
                     self.metrics)


@dataclass(frozen=True)
class SignalRequest:
    """A signal of the current model that a generator asks for, computed by the PretrainModule."""

    kind: str = "attention"  # attention: (B, 1 + N, 1 + N) softmax attention, [CLS] first, fp32
    blocks: int = 6  # of the first `blocks` blocks (capped by depth), averaged over heads and blocks
    ema_decay: Optional[float] = None  # from an EMA of the encoder held as module state, not the live one

    def forward_flops(self, spec: ViTSpec, num_images: int) -> int:
        """Matmul FLOPs of the signal of `num_images` images: the patch embedding and the first `blocks`
        blocks over all 1 + N tokens, forward only (no gradient), as the EHM paper counts it. Not counted:
        the attention probabilities read from each block (`Attention.attention_probs` computes its qkv
        projection and q k^T once more: a quarter more for 6 blocks of ViT-B/16)."""
        blocks = max(1, min(self.blocks, spec.depth))
        return patch_embed_flops(spec, num_images) + blocks_forward_flops(
            spec.embed_dim, spec.mlp_ratio, blocks, num_images, 1 + spec.num_patches)


@dataclass(frozen=True)
class MaskNeeds:
    """What a generator needs besides its random generator and the training progress."""

    images: bool = False  # this batch's images (on the step's device)
    model_signal: Optional[SignalRequest] = None  # a signal from the current model on this batch's images


# images -> the signal of MaskNeeds.model_signal, computed by the current model through the engine
# (so FSDP2 / ZeRO-3 gather their parameters), without gradients and in eval semantics.
ModelSignal = Callable[[torch.Tensor], torch.Tensor]


def untimed(_name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def rand_rows(generator: torch.Generator, batch_size: int, tail: Tuple[int, ...], device: torch.device,
              rows: Optional[slice] = None, global_batch: Optional[int] = None) -> torch.Tensor:
    """Uniform (batch_size, *tail) noise for rows `rows` of the global batch: drawn for all
    `global_batch` rows (default: batch_size, the batch is the global one), then sliced (None: all). Every
    rank draws the same global tensor from the step's generator, so an image's masks depend on its
    row of the global batch, not on the world size."""
    noise = torch.rand(global_batch or batch_size, *tail, generator=generator, device=device)
    if rows is not None:
        noise = noise[rows]
    if noise.shape[0] != batch_size:
        raise ValueError(f"rows {rows} of a global batch of {global_batch} are {noise.shape[0]} images, "
                         f"not the {batch_size} the masks are drawn for")
    return noise


@dataclass
class MaskContext:
    """What a generator may draw masks from. Identical contexts give identical masks."""

    generator: torch.Generator  # seeded by (seed, step), the same on every rank, on `device`
    device: torch.device
    step: int = 0
    # step / total steps and completed epochs / total epochs, in [0, 1]; the trainer passes exact
    # Fractions (EHM's depth is floor(progress x H): a float can round it one level low)
    progress: float | Fraction = 0.0
    epoch_progress: float | Fraction = 0.0
    images: Optional[torch.Tensor] = None  # when needs.images or needs.model_signal
    model_signal: Optional[ModelSignal] = None  # when needs.model_signal
    time_region: Callable[[str], ContextManager[None]] = untimed  # name -> a timed region, logged as time_<name>_s
    # This rank's images are rows `rows` of a global batch of `global_batch` (None: the batch is the global one).
    global_batch: Optional[int] = None
    rows: Optional[slice] = None

    def rand(self, batch_size: int, *tail: int) -> torch.Tensor:
        """Uniform (batch_size, *tail) noise for this rank's rows of the global batch (`rand_rows`):
        generators draw through it, so masks do not depend on how the global batch is split."""
        return rand_rows(self.generator, batch_size, tail, self.device, self.rows, self.global_batch)


class MaskGenerator(abc.ABC):
    """Draws masks for a batch; identical (seed, step, rows of the global batch) give identical masks."""

    needs: MaskNeeds = MaskNeeds()
    num_groups: int = 1  # visible groups per image it draws
    # (Masks.metrics key, short label) worth a glance on the console line (EHM: its depth and tree height).
    console_metrics: Tuple[Tuple[str, str], ...] = ()

    def __init__(self, grid_size: int):
        self.grid_size = grid_size
        self.num_patches = grid_size * grid_size

    @abc.abstractmethod
    def __call__(self, batch_size: int, context: MaskContext) -> Masks:
        """Masks for `batch_size` images drawn from `context.rand` (the step's generator, on `context.device`)."""

    def forward_flops(self, spec: ViTSpec, num_images: int) -> int:
        """Matmul FLOPs the generator spends on the masks of `num_images` images, counted in the step's
        FLOPs (the trainer's logged FLOP/s, the run's plan): the model signal it asks for (EHM's
        attention forward), else nothing. A generator with costly computation of its own adds it here."""
        signal = self.needs.model_signal
        return signal.forward_flops(spec, num_images) if signal is not None else 0


def visible_count(num_patches: int, ratio: float, num_groups: int) -> int:
    """Patches left visible at `ratio`: int(N (1 - ratio)), rounded down to a multiple of the group
    count (even, for OCL's two groups) so every group is the same length and the batch stays one tensor."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask.ratio must be in [0, 1), got {ratio}")
    keep = int(num_patches * (1.0 - ratio))
    keep -= keep % num_groups
    if keep < num_groups:
        raise ConfigError(f"mask.ratio {ratio} leaves {keep} of {num_patches} patches: fewer than one per group")
    return keep


MASK_GENERATORS: Registry[MaskGenerator] = Registry("mask generator", "mask.name")


def build_mask_generator(cfg: MaskConfig, grid_size: int) -> MaskGenerator:
    return MASK_GENERATORS.build(cfg.name, cfg, grid_size)


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """The seed of (seed, step, rank); `stream` > 0 gives independent streams of the same step."""
    return ((seed * 1_000_003 + step) * 65_537 + rank + stream * 0x9E3779B97F4A7C15) % (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, step, rank): masks never depend on what ran before."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank))
    return g


def seed_global_rng(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seed the global RNG (CPU, and `device` on CUDA) from (seed, step, rank), apart from the masks' stream."""
    value = step_seed(seed, step, rank, stream=1)
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)
