"""Evolved Hierarchical Masking (EHM): masks cut from a patch tree of the current model's attention.

At every step, per image: the attention of the model's first k blocks on the full image gives a
patch similarity (`hierarchy.patch_similarity`); average-linkage merging turns it into a binary
tree (`hierarchy`); the tree cut at depth d gives parts, d = max(1, floor(progress x H)) rising
from textures (d = 1: single patches, MAE's random mask) to object parts, computed exactly from
the trainer's progress fraction. Parts are visited in a random order drawn from the step's
generator, each in depth-first order with the two children of every merge in an order drawn from
that generator too, and the first r x N patches of that ordering are masked, so the last part
visited is cut along the tree, at a random end of it.

Layouts of the one ordering:
- `ehm`: masked | visible (MAE, ASL);
- `ehm_two_group`: dropped | group A | group B (OCL): the two views hold different parts;
- `ehm_drop_two_group`: EHM picks the dropped set, the visible patches are split at random.
At d = 1 each is exactly its random counterpart in distribution (`random`, `random_two_group`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, Optional

import torch

from ..config import Check, MaskConfig
from .base import (MASK_GENERATORS, MaskContext, MaskGenerator, MaskNeeds, Masks, SignalRequest, rand_rows,
                   visible_count)
from .hierarchy import TREE_BUILDERS, PatchTree
from .similarity import SIMILARITIES

ONE_GROUP, TWO_GROUP, DROP_TWO_GROUP = "one_group", "two_group", "drop_two_group"


@dataclass
class EHMConfig:
    """EHM's settings (mask.ehm.*; papers/evolved-hierarchical-masking.txt, METHODS.md): parts of a patch
    tree built from the current model's attention, cut at a depth that rises with training."""
    blocks: int = 6  # attention of the first k blocks (capped by depth), averaged over heads and blocks
    signal_batch: int = 64  # images per attention forward: fixed, so masks never depend on micro-batching
    # attention: (A + A^T) / 2 (the paper) | attention_rows: cosine of attention rows
    similarity: Literal["attention", "attention_rows"] = "attention"
    tree: Literal["rnn", "greedy"] = "rnn"  # rnn: reciprocal nearest neighbours, a few dozen rounds | greedy: one merge a round
    # evolved: d = max(1, floor(progress x H)) | fixed: d = max(1, floor(fixed_depth x H))
    depth: Literal["evolved", "fixed"] = "evolved"
    progress: Literal["epoch", "step"] = "epoch"  # epoch: completed epochs / epochs (the paper) | step: step / total steps
    fixed_depth: float = 0.2  # depth=fixed, as a fraction of each tree's height H (0.2 shallow, 0.8 deep)
    max_depth: float = 1.0  # cap on d, as a fraction of H (two-group OCL: near the root only 2-5 parts remain)
    source: Literal["online", "ema"] = "online"  # online: the current model (the paper) | ema: an EMA of it (Evolved Part Masking)
    ema_decay: float = 0.999  # source=ema


@dataclass
class EHMMaskConfig:
    """The keys of the EHM generators (ehm, ehm_two_group, ehm_drop_two_group): mask.ratio and mask.ehm.*."""
    ehm: EHMConfig = field(default_factory=EHMConfig)

    def validate(self, check: Check) -> None:
        e = self.ehm
        check.range("ehm.blocks", e.blocks, 1)
        check.range("ehm.signal_batch", e.signal_batch, 1)
        check.range("ehm.fixed_depth", e.fixed_depth, 0.0, 1.0)
        check.range("ehm.max_depth", e.max_depth, 0.0, 1.0, low_open=True)
        check.range("ehm.ema_decay", e.ema_decay, 0.0, 1.0, high_open=True)
        check.unused("ehm.fixed_depth", e.depth != "fixed", "mask.ehm.depth is evolved (the depth follows progress)")
        check.unused("ehm.progress", e.depth == "fixed", "mask.ehm.depth is fixed (mask.ehm.fixed_depth sets it)")
        check.unused("ehm.ema_decay", e.source != "ema", "mask.ehm.source is online (no EMA is kept)")


def visit_order(tree: PatchTree, parts: torch.Tensor, generator: torch.Generator, rows: Optional[slice] = None,
                global_batch: Optional[int] = None) -> torch.Tensor:
    """(B, N) patches in EHM's order: the parts (`tree.cut(depth)`) in a uniformly random order,
    each part's patches in depth-first order with each merge's two children in a random order.
    The random draws are those of rows `rows` of a global batch (`rand_rows`; default: these B images).

    Only the last part visited is cut, and a fixed child order (smaller leaves first) would mask
    the same end of it every time: on chain-like trees, the top rows."""
    batch, n = parts.shape
    noise = rand_rows(generator, batch, (n,), parts.device, rows, global_batch)
    part_rank = noise.argsort(dim=1).argsort(dim=1)  # a random permutation of the slots naming parts
    swapped = rand_rows(generator, batch, (n,), parts.device, rows, global_batch) < 0.5  # per merge: its absorbed slot
    key = part_rank.gather(1, parts) * n + tree.leaf_positions(swapped)  # distinct: part first, then depth-first
    return key.argsort(dim=1)


def exact(value: float | Fraction) -> Fraction:
    """`value` as an exact fraction: a Fraction as it is (the trainer's completed epochs / epochs), a
    float as the decimal it prints as (a recipe's 0.2 is 1/5, not the binary float just above it)."""
    return value if isinstance(value, Fraction) else Fraction(repr(float(value)))


def floor_times(fraction: Fraction, height: int) -> int:
    """floor(fraction x height) in integers: no rounding can put it one level low."""
    return fraction.numerator * height // fraction.denominator


class EvolvedHierarchicalMasking(MaskGenerator):
    console_metrics = (("ehm_depth", "d"), ("ehm_height", "H"))

    def __init__(self, grid_size: int, ratio: float, cfg: EHMConfig, layout: str):
        super().__init__(grid_size)
        self.cfg, self.layout, self.ratio = cfg, layout, ratio
        self.num_groups = 1 if layout == ONE_GROUP else 2
        self.num_keep = visible_count(self.num_patches, ratio, self.num_groups)
        self.build_tree = TREE_BUILDERS[cfg.tree]
        self.patch_similarity = SIMILARITIES[cfg.similarity]
        self.needs = MaskNeeds(images=True, model_signal=SignalRequest(
            "attention", cfg.blocks, cfg.ema_decay if cfg.source == "ema" else None))

    def similarity(self, context: MaskContext) -> torch.Tensor:
        """(B, N, N) fp32, computed `signal_batch` images at a time whatever the batch's split."""
        return torch.cat([self.patch_similarity(context.model_signal(chunk))
                          for chunk in context.images.split(self.cfg.signal_batch)])

    def depth(self, height: torch.Tensor, context: MaskContext) -> torch.Tensor:
        """(B,) the cut level of each image's tree of height H: d = max(1, min(floor(fraction x H),
        floor(max_depth x H))), exact (float rounding gave d one level low in 15 of the 59,700
        (epoch, H) pairs of a 300-epoch schedule). A table over every possible H (at most N) keeps
        the arithmetic in Python integers and the lookup on the device."""
        e = self.cfg
        fraction = exact(e.fixed_depth if e.depth == "fixed" else (
            context.epoch_progress if e.progress == "epoch" else context.progress))
        cap = exact(e.max_depth)
        by_height = torch.tensor([max(1, min(floor_times(fraction, h), floor_times(cap, h)))
                                  for h in range(self.num_patches + 1)])
        if height.is_cuda:  # copied from pinned memory, the table is queued, not waited for (a host sync)
            by_height = by_height.pin_memory()
        return by_height.to(height.device, non_blocking=True)[height]

    def __call__(self, batch_size: int, context: MaskContext) -> Masks:
        with context.time_region("mask_signal"):
            similarity = self.similarity(context)
        with context.time_region("mask_tree"):
            tree = self.build_tree(similarity)
            height = tree.height
            depth = self.depth(height, context)
            parts = tree.cut(depth)
            order = visit_order(tree, parts, context.generator, context.rows, context.global_batch)
        masked = self.num_patches - self.num_keep
        visible = order[:, masked:]
        if self.layout == DROP_TWO_GROUP:  # EHM drops, a random split of the rest
            noise = context.rand(batch_size, self.num_keep)
            visible = visible.gather(1, noise.argsort(dim=1))
        groups = visible.reshape(batch_size, self.num_groups, self.num_keep // self.num_groups)
        num_parts = (parts == torch.arange(self.num_patches, device=order.device)).sum(dim=1)
        metrics = {"ehm_depth": depth.float().mean(), "ehm_height": height.float().mean(),
                   "ehm_parts": num_parts.float().mean(),
                   "ehm_tree_rounds": torch.full((), float(tree.rounds), device=order.device)}  # no copy
        return Masks(group_ids=groups, masked_ids=order[:, :masked], metrics=metrics)


def _register(name: str, layout: str) -> None:
    @MASK_GENERATORS.register(name, config=EHMMaskConfig)
    def build(cfg: EHMMaskConfig | MaskConfig, grid_size: int) -> MaskGenerator:
        return EvolvedHierarchicalMasking(grid_size, cfg.ratio, cfg.ehm, layout)


_register("ehm", ONE_GROUP)
_register("ehm_two_group", TWO_GROUP)
_register("ehm_drop_two_group", DROP_TWO_GROUP)
