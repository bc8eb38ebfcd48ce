"""The pre-training transform on the CPU: decode, crop, resize and flip, all in uint8.

MAE's augmentation is RandomResizedCrop(img_size, scale=crop_scale, bicubic) + horizontal
flip + normalise. Workers do everything but the normalisation and hand over uint8 batches
(a quarter of the bytes of float ones); `scale.data.device_input` converts and normalises
on the device, inside the step.

Crop-aware decoding (the CPU half of what FFCV and DALI do): the crop and flip are drawn
first, on the size in the image's header (`scale.data.crop`), then a JPEG is decoded at the
smallest DCT scale (1, 1/2, 1/4 or 1/8, libjpeg's) whose pixels still cover the crop at the
output size on both sides, and only the crop box of that decode is resampled. No float work
happens in the worker.

Interpolation, the same on every path: bicubic with antialiasing, PIL's kernel (a = -0.5,
support widened by the downscale factor). PIL images are resized by PIL; tensor images by
torchvision / `F.interpolate(antialias=True)`, which implement the same kernel; the crop box
is resampled at sub-pixel precision. The reduced-scale JPEG decode acts as an extra
low-pass pre-filter before the bicubic step; it is only chosen when the crop keeps at least
the output's resolution, so it never upsamples what a full decode would have downsampled.
"""
from __future__ import annotations

import logging
import math
from typing import IO, Any, Callable, Tuple, Union

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from ..config import ConfigError, DataConfig
from .crop import CropParams, draw_crop, seeded_generator, whole_image

DCT_SCALES = (8, 4, 2, 1)  # libjpeg's reductions that PIL's `draft` can ask for


def pil_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def open_image(fp: Union[str, IO[bytes]]) -> Image.Image:
    """Open an image file lazily: the header is parsed (size, format), pixels are not decoded yet."""
    return Image.open(fp)


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


def draft_request(width: int, height: int, crop: CropParams, out_size: int) -> Tuple[int, int]:
    """The decoded size to ask PIL's `draft` for: the crop keeps >= out_size pixels on both sides.

    PIL reduces by the largest of 8, 4, 2, 1 that divides neither side below the request.
    """
    return (min(width, math.ceil(width * out_size / crop.width)),
            min(height, math.ceil(height * out_size / crop.height)))


def dct_scale(width: int, height: int, decoded: Tuple[int, int]) -> int:
    """The reduction libjpeg applied: decoded sides are ceil(side / k)."""
    return next((k for k in DCT_SCALES if -(-width // k) == decoded[0] and -(-height // k) == decoded[1]), 1)


def _channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[0] == in_chans:
        return x
    if x.shape[0] == 1:
        return x.expand(in_chans, -1, -1)
    if in_chans == 1:
        return x.float().mean(0, keepdim=True).round().to(x.dtype) if x.dtype == torch.uint8 else x.mean(0, keepdim=True)
    raise ValueError(f"image has {x.shape[0]} channels, model expects {in_chans}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] -> uint8, rounded (what saving it as a PNG would store)."""
    return x if x.dtype == torch.uint8 else x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class PretrainTransform:
    """(image, sample seed) -> uint8 CHW tensor (in_chans, img_size, img_size).

    `image`: a PIL image, ideally freshly opened and not yet decoded (then a JPEG is
    decoded at a reduced DCT scale where the crop allows), or a CHW tensor (uint8, or
    float in [0, 1]). `augment=False` (`transform: none`) resizes the whole image, unflipped.
    """

    def __init__(self, img_size: int, in_chans: int, augment: bool = True, crop_scale: Tuple[float, float] = (0.2, 1.0),
                 hflip: bool = True, reduced_decode: bool = True):
        self.img_size, self.in_chans, self.augment = img_size, in_chans, augment
        self.crop_scale, self.hflip, self.reduced_decode = tuple(crop_scale), hflip, reduced_decode

    def params(self, width: int, height: int, seed: int) -> CropParams:
        if not self.augment:
            return whole_image(width, height)
        return draw_crop(width, height, seeded_generator(seed), self.crop_scale, hflip=self.hflip)

    def __call__(self, image: Any, seed: int) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.from_pil(image, self.params(*image.size, seed))
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise TypeError(f"expected a PIL image or a CHW tensor, got {type(image).__name__}")
        return self.from_tensor(image, self.params(image.shape[-1], image.shape[-2], seed))

    def from_pil(self, image: Image.Image, crop: CropParams) -> torch.Tensor:
        mode, size = pil_mode(self.in_chans), self.img_size
        width, height = image.size
        drafted = self.reduced_decode and image.format == "JPEG" and \
            image.draft(mode, draft_request(width, height, crop, size)) is not None  # None once decoded
        image.load()  # decode here: undecodable data fails here, where the source can replace the sample
        k = dct_scale(width, height, image.size) if drafted else 1
        if image.mode != mode:
            image = image.convert(mode)
        out = image.resize((size, size), Image.BICUBIC, box=crop.box(1 / k, 1 / k))
        if crop.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _channels(v2.functional.pil_to_tensor(out), self.in_chans)

    def from_tensor(self, image: torch.Tensor, crop: CropParams) -> torch.Tensor:
        x = _channels(to_uint8(image), self.in_chans)
        x = v2.functional.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [self.img_size] * 2,
                                       interpolation=InterpolationMode.BICUBIC, antialias=True)
        return x.flip(-1) if crop.flip else x


def build_pretrain_transform(cfg: DataConfig, img_size: int, in_chans: int) -> PretrainTransform:
    if len(cfg.mean) != in_chans:
        raise ConfigError(f"data.mean/data.std have {len(cfg.mean)} values but the model takes "
                          f"{in_chans} channels; set data.mean and data.std to {in_chans} values")
    return PretrainTransform(img_size, in_chans, augment=cfg.transform != "none", crop_scale=tuple(cfg.crop_scale),
                             hflip=cfg.hflip)


Transform = Callable[[Any, int], torch.Tensor]
