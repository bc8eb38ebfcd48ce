"""Uniform random masking (MAE's argsort of noise): one visible group (MAE) or two (OCL)."""
from __future__ import annotations

import torch

from ..config import MaskConfig
from .base import MASK_GENERATORS, MaskContext, MaskGenerator, Masks, visible_count


class RandomGroupMasking(MaskGenerator):
    """MAE's argsort-of-noise masking at `ratio`, the kept patches (`visible_count`) split into equal groups."""

    def __init__(self, grid_size: int, ratio: float, num_groups: int = 2):
        super().__init__(grid_size)
        self.ratio, self.num_groups = ratio, num_groups
        self.num_keep = visible_count(self.num_patches, ratio, num_groups)

    def __call__(self, batch_size: int, context: MaskContext) -> Masks:
        noise = context.rand(batch_size, self.num_patches)
        order = torch.argsort(noise, dim=1)  # a uniformly random permutation per image
        kept = order[:, :self.num_keep]  # already in random order, so halves are a random split
        groups = kept.reshape(batch_size, self.num_groups, self.num_keep // self.num_groups)
        return Masks(group_ids=groups, masked_ids=order[:, self.num_keep:])


@MASK_GENERATORS.register("random_two_group")
def build_random_two_group(cfg: MaskConfig, grid_size: int) -> MaskGenerator:
    return RandomGroupMasking(grid_size, cfg.ratio, num_groups=2)


@MASK_GENERATORS.register("random")
def build_random(cfg: MaskConfig, grid_size: int) -> MaskGenerator:
    """MAE's masking: one visible group of int(N * (1 - ratio)) patches."""
    return RandomGroupMasking(grid_size, cfg.ratio, num_groups=1)
