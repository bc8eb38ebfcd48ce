"""Decoding images, and the pre-training transforms (MAE's: RandomResizedCrop(0.2, 1) + flip + normalise).

The decoding helpers are what every source that reads image files shares: `load_image`
decodes fully (so a truncated file fails there, where the source can skip it, and not in
the transform) and `RateLimitedWarning` reports the skipped ones without flooding the log.
"""
from __future__ import annotations

import logging
from typing import IO, Any, Callable, Optional, Union

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from ..config import ConfigError, DataConfig


def pil_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def load_image(fp: Union[str, IO[bytes]], in_chans: int, draft_size: Optional[int] = None) -> Image.Image:
    """Decode an image file (path or binary file object) in the mode the model takes.

    Raises on anything undecodable. `draft_size`: let PIL decode a JPEG at a reduced scale
    as long as both sides stay >= draft_size (None: always full size).
    """
    mode = pil_mode(in_chans)
    image = Image.open(fp)
    if draft_size is not None and image.format == "JPEG":
        image.draft(mode, (draft_size, draft_size))
    image.load()  # decode here, so that truncated data fails here and not in the transform
    return image if image.mode == mode else image.convert(mode)


class RateLimitedWarning:
    """Logs the first few occurrences, then every `every`-th, with a running count."""

    def __init__(self, what: str, logger: logging.Logger, first: int = 5, every: int = 1000):
        self.what, self.log, self.first, self.every, self.count = what, logger, first, every, 0

    def __call__(self, detail: str) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            self.log.warning("%s (%d in this process so far%s): %s", self.what, self.count,
                             "; further ones are logged every %d" % self.every if self.count == self.first else "",
                             detail)


def to_float_tensor(image: Any, in_chans: int) -> torch.Tensor:
    """PIL image or CHW tensor -> float CHW tensor in [0, 1] with `in_chans` channels."""
    if isinstance(image, Image.Image):
        image = v2.functional.pil_to_tensor(image.convert(pil_mode(in_chans)))
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
        raise ConfigError(f"data.mean/data.std have {len(cfg.mean)} values but the model takes "
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
            image = spatial(image.convert(pil_mode(in_chans)))
            return normalize(to_float_tensor(image, in_chans))
        return normalize(spatial(to_float_tensor(image, in_chans)))
    return augment
