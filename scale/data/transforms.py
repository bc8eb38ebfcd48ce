"""Pre-training image transforms (MAE's: RandomResizedCrop(0.2, 1) + flip + normalise)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from ..config import DataConfig


def to_float_tensor(image: Any, in_chans: int) -> torch.Tensor:
    """PIL image or CHW tensor -> float CHW tensor in [0, 1] with `in_chans` channels."""
    if isinstance(image, Image.Image):
        image = image.convert("L" if in_chans == 1 else "RGB")
        image = v2.functional.pil_to_tensor(image)
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise TypeError(f"expected a PIL image or a CHW tensor, got {type(image).__name__}")
    if image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    if image.shape[0] != in_chans:
        if image.shape[0] == 1:
            image = image.expand(in_chans, -1, -1)
        elif in_chans == 1:
            image = image.mean(0, keepdim=True)
        else:
            raise ValueError(f"image has {image.shape[0]} channels, model expects {in_chans}")
    return image.contiguous()


def build_pretrain_transform(cfg: DataConfig, img_size: int, in_chans: int) -> Callable[[Any], torch.Tensor]:
    if len(cfg.mean) != in_chans:
        raise ValueError(f"data.mean/data.std have {len(cfg.mean)} values but the model takes "
                         f"{in_chans} channels; set data.mean and data.std to {in_chans} values")
    normalize = v2.Normalize(mean=list(cfg.mean), std=list(cfg.std))
    if cfg.transform == "none":
        resize = v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True)

        def plain(image: Any) -> torch.Tensor:
            x = to_float_tensor(image, in_chans)
            if x.shape[-2:] != (img_size, img_size):
                x = resize(x)
            return normalize(x)
        return plain

    ops = [v2.RandomResizedCrop(img_size, scale=tuple(cfg.crop_scale),
                                interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    spatial = v2.Compose(ops)

    def augment(image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            # Crop and resize the uint8 PIL image before converting: ~1.5x faster than in float.
            image = spatial(image.convert("L" if in_chans == 1 else "RGB"))
            return normalize(to_float_tensor(image, in_chans))
        return normalize(spatial(to_float_tensor(image, in_chans)))
    return augment
