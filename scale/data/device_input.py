"""Loader batches -> the model's input on the device: where pixels become normalised floats.

Workers hand over uint8 batches (or, with `data.decode: gpu`, JPEG bytes and crop
parameters: `scale.data.gpu_decode.EncodedBatch`). The step copies them to the device
(non-blocking; the DataLoader pins them on CUDA) and converts there: one fused
multiply-add per pixel, x * 1/(255 std) - mean/std, which equals (x/255 - mean)/std. A
float batch is taken as already being the model's input (benchmarks and custom sources
that normalise themselves).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch

from .gpu_decode import EncodedBatch

HostBatch = Union[torch.Tensor, EncodedBatch]


class DeviceInput:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values, std {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._affine: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def affine(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (1, C, 1, 1) float32 on `device`, cached."""
        if device not in self._affine:
            std = torch.tensor(self.std, dtype=torch.float64)
            mean = torch.tensor(self.mean, dtype=torch.float64)
            scale, shift = (1.0 / (255.0 * std)).float(), (-mean / std).float()
            self._affine[device] = (scale.view(1, -1, 1, 1).to(device), shift.view(1, -1, 1, 1).to(device))
        return self._affine[device]

    def pixels(self, batch: HostBatch, device: torch.device) -> torch.Tensor:
        """The batch as uint8 (B, C, H, W) pixels on `device` (decoding it there if it is encoded)."""
        if isinstance(batch, EncodedBatch):
            return batch.decode(device)
        return batch.to(device, non_blocking=True)

    def __call__(self, batch: HostBatch, device: torch.device) -> torch.Tensor:
        if isinstance(batch, torch.Tensor) and batch.is_floating_point():
            return batch.to(device, non_blocking=True)
        pixels = self.pixels(batch, device)
        if pixels.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 or float image batch, got {pixels.dtype}")
        scale, shift = self.affine(device)
        return torch.addcmul(shift, pixels.float(), scale)
