"""Loader batches -> the model's input on the device: where pixels become normalised floats.

Workers hand over uint8 batches (or, with `data.decode: gpu`, JPEG bytes and crop
parameters: `scale.data.gpu_decode.EncodedBatch`). The step copies them to the device
(non-blocking; the DataLoader pins them on CUDA) and converts there: one fused
multiply-add per pixel, x * 1/(255 std) - mean/std, which equals (x/255 - mean)/std. A
float batch is taken as already being the model's input (benchmarks and custom sources
that normalise themselves). `DeviceImages` keeps the uint8 pixels on the device and
normalises on access, so a step split into micro-batches holds one micro-batch in float.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple, Union

import torch

from .gpu_decode import EncodedBatch

HostBatch = Union[torch.Tensor, EncodedBatch]


class DeviceImages:
    """A batch on the device, handed to the model as normalised float a slice at a time."""

    def __init__(self, pixels: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor]):
        self.pixels, self.convert = pixels, convert

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.convert(self.pixels[index])

    def all(self) -> torch.Tensor:
        return self.convert(self.pixels)


class DeviceInput:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values, std {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._affine: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.replaced = 0  # corrupt JPEGs the device path replaced (the CPU path counts in its workers)

    def affine(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (1, C, 1, 1) float32 on `device`, cached."""
        if device not in self._affine:
            std = torch.tensor(self.std, dtype=torch.float64)
            mean = torch.tensor(self.mean, dtype=torch.float64)
            scale, shift = (1.0 / (255.0 * std)).float(), (-mean / std).float()
            self._affine[device] = (scale.view(1, -1, 1, 1).to(device), shift.view(1, -1, 1, 1).to(device))
        return self._affine[device]

    def pixels(self, batch: HostBatch, device: torch.device) -> torch.Tensor:
        """The batch on `device`: uint8 (B, C, H, W) pixels, decoded there if it is encoded;
        a float batch as it is."""
        if isinstance(batch, EncodedBatch):
            pixels, replaced = batch.decode(device)
            self.replaced += replaced
            return pixels
        return batch.to(device, non_blocking=True)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 or float image batch, got {pixels.dtype}")
        scale, shift = self.affine(pixels.device)
        return torch.addcmul(shift, pixels.float(), scale)

    def images(self, batch: HostBatch, device: torch.device) -> DeviceImages:
        """The batch on `device`, still uint8, normalised slice by slice on access."""
        return DeviceImages(self.pixels(batch, device), self.normalise)

    def __call__(self, batch: HostBatch, device: torch.device) -> torch.Tensor:
        return self.normalise(self.pixels(batch, device))
