"""Crop and flip parameters of the pre-training augmentation, drawn from a sample's seed.

`draw_crop` is torchvision's `RandomResizedCrop.get_params` followed by
`RandomHorizontalFlip`'s coin, drawing the same numbers in the same order, but from a
generator seeded by the sample's seed (seed, epoch, sample index) instead of the global
RNG. The parameters are drawn on the image's *original* size (read from its header), so
every decode path (full CPU decode, reduced-scale JPEG decode, nvJPEG on the device) crops
the same region of the same sample, and a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MAE_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, as MAE uses it


@dataclass(frozen=True)
class CropParams:
    """Region (top, left, height, width) of the original image, and whether to mirror it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    def as_list(self) -> list:
        return [self.top, self.left, self.height, self.width, int(self.flip)]

    def box(self, scale_x: float = 1.0, scale_y: float = 1.0) -> tuple:
        """PIL's (left, upper, right, lower) box, in an image decoded at (scale_x, scale_y) of the original."""
        return (self.left * scale_x, self.top * scale_y,
                (self.left + self.width) * scale_x, (self.top + self.height) * scale_y)


def whole_image(width: int, height: int) -> CropParams:
    """No crop, no flip: `transform: none` resizes the whole image."""
    return CropParams(0, 0, height, width, False)


def draw_crop(width: int, height: int, generator: torch.Generator, scale: Sequence[float],
              ratio: Sequence[float] = MAE_RATIO, hflip: bool = True) -> CropParams:
    """RandomResizedCrop(scale, ratio) + RandomHorizontalFlip(0.5) parameters, from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            break
    else:  # torchvision's fallback: the central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(hflip and torch.rand(1, generator=generator).item() < 0.5)
    return CropParams(top, left, h, w, flip)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
