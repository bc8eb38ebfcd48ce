"""Grid-like masking (the static "grid" pattern of the EHM paper's ablations, MAE's grid-wise sampling).

Patches fall into the four phases of a 2 x 2 lattice, (row mod 2, column mod 2). Phases are visited
in a random order, each in a random order within, and the first r x N patches are masked. On an
even grid at r = 0.75 the visible patches are exactly one phase, one patch in every 2 x 2 cell, so
every masked patch has a visible neighbour (the fine-grained, texture-level extreme); on an odd grid
the phases differ in size (7 x 7: 16, 12, 12, 9) and the visible set may spill into a second phase.
"""
from __future__ import annotations

import torch

from ..config import MaskConfig
from .base import MASK_GENERATORS, MaskContext, MaskGenerator, Masks, visible_count


class GridMasking(MaskGenerator):
    def __init__(self, grid_size: int, ratio: float):
        super().__init__(grid_size)
        self.ratio = ratio
        self.num_keep = visible_count(self.num_patches, ratio, 1)
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        self.phase = ((rows % 2) * 2 + cols % 2).flatten()

    def __call__(self, batch_size: int, context: MaskContext) -> Masks:
        n = self.num_patches
        phase_rank = context.rand(batch_size, 4).argsort(dim=1).argsort(dim=1)
        within = context.rand(batch_size, n).argsort(dim=1).argsort(dim=1)
        key = phase_rank.gather(1, self.phase.to(context.device).expand(batch_size, n)) * n + within
        order = key.argsort(dim=1)
        masked = n - self.num_keep
        return Masks(group_ids=order[:, masked:].unsqueeze(1), masked_ids=order[:, :masked])


@MASK_GENERATORS.register("grid")
def build_grid(cfg: MaskConfig, grid_size: int) -> MaskGenerator:
    return GridMasking(grid_size, cfg.ratio)
