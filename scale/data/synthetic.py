"""A deterministic synthetic dataset with class structure, so learning is visible on CPU.

Each class owns a prototype (a sum of oriented gratings plus a coloured blob); a sample
is its class prototype under a random shift, contrast change and pixel noise, all drawn
from (seed, index). Two crops of one sample share the class pattern, so contrastive
learning separates classes, and a kNN monitor can check that it did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch.utils.data import Dataset

from ..config import Check, ConfigError, DataConfig
from .base import DATASETS, PretrainData
from .device_input import DeviceInput
from .map_style import MapStyleData
from .transforms import build_pretrain_transform


@dataclass
class SyntheticConfig:
    """The synthetic source's keys (data.*): data.num_samples images of this many classes."""
    num_classes: int = 10

    def validate(self, check: Check) -> None:
        check.range("num_classes", self.num_classes, 1)
        # data.root / val_root are left alone: a recipe's shards stay set when an override picks synthetic data.
        for name in ("shuffle_buffer", "decode"):
            check.unused(name, True, "data.name is synthetic (it generates its images)")


class SyntheticImages(Dataset):
    def __init__(self, num_samples: int, num_classes: int, img_size: int, in_chans: int,
                 sample_seed: int = 0, prototype_seed: int = 0):
        if num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {num_classes}")
        if num_samples < 1:
            raise ConfigError(f"data.num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.num_classes = num_samples, num_classes
        self.img_size, self.in_chans, self.sample_seed = img_size, in_chans, sample_seed
        g = torch.Generator().manual_seed(prototype_seed)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, img_size), torch.linspace(0, 1, img_size), indexing="ij")
        protos = []
        for _ in range(num_classes):
            img = torch.zeros(in_chans, img_size, img_size)
            for _ in range(3):  # oriented gratings with class-specific frequency and colour
                theta = torch.rand(1, generator=g).item() * math.pi
                freq = 2 + 6 * torch.rand(1, generator=g).item()
                wave = torch.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
                img += torch.rand(in_chans, 1, 1, generator=g) * wave
            cy, cx = torch.rand(2, generator=g).tolist()
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
            img += 2 * torch.rand(in_chans, 1, 1, generator=g) * blob
            protos.append(img)
        self.prototypes = torch.stack(protos)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.sample_seed * 1_000_003 + index)
        label = index % self.num_classes
        img = self.prototypes[label]
        shift = torch.randint(-self.img_size // 4, self.img_size // 4 + 1, (2,), generator=g).tolist()
        img = torch.roll(img, shifts=shift, dims=(1, 2))
        img = img * (0.6 + 0.8 * torch.rand(1, generator=g)) + 0.3 * torch.randn(img.shape, generator=g)
        img = (img - img.min()) / (img.max() - img.min() + 1e-6)
        return img, label


@DATASETS.register("synthetic", config=SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig | DataConfig, img_size: int, in_chans: int, train: bool) -> PretrainData:
    # The held-out split draws different samples from the same class prototypes.
    num_samples = cfg.num_samples if train else max(cfg.num_samples // 5, cfg.num_classes)
    source = SyntheticImages(num_samples, cfg.num_classes, img_size, in_chans, sample_seed=0 if train else 1)
    return MapStyleData(source, build_pretrain_transform(cfg, img_size, in_chans), DeviceInput(cfg.mean, cfg.std))
