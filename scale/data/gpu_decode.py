"""`data.decode: gpu`: JPEG batches decoded with nvJPEG and cropped, resized and flipped on the device.

The worker no longer decodes: it reads each JPEG's header (size), draws the sample's crop
and flip from its seed (`scale.data.crop`, exactly as the CPU path does) and ships the
compressed bytes, concatenated into one tensor, with one row of crop parameters per sample.
Images nvJPEG cannot take (PNG and other formats, CMYK JPEGs) are decoded and cropped on
the CPU in the worker and travel as pixels. On the device, `EncodedBatch.decode` runs
`torchvision.io.decode_jpeg` on the whole batch, then crops each image and resizes it with
`F.interpolate(bicubic, antialias=True)` (PIL's kernel, as on the CPU path), flips, rounds
to uint8. Should the device reject an image the header did not give away, that image is
decoded on the CPU instead (warned); the batch stays the same size.

Crop and flip are a function of (seed, epoch, sample index) and the batches' bytes of the
sample stream, so exact resume holds as on the CPU path; pixels differ from the CPU path's
by the decoders' rounding (a few levels of 255).
"""
from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..config import DataConfig
from .crop import CropParams
from .transforms import PretrainTransform, RateLimitedWarning, open_image

log = logging.getLogger(__name__)

NVJPEG_MODES = ("L", "RGB", "YCbCr")  # JPEG colour spaces decode_jpeg converts; CMYK / YCCK are not


@dataclass
class EncodedBatch:
    """One worker batch for device decoding.

    `data` holds every JPEG's bytes back to back (`offsets[i]:offsets[i+1]` is sample i's;
    empty for samples decoded on the CPU), `crops` is (B, 5) int64 (top, left, height,
    width, flip), `pixels` the CPU-decoded samples (N, C, S, S) uint8 in order of `on_cpu`.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    crops: torch.Tensor
    pixels: torch.Tensor
    on_cpu: torch.Tensor  # (N,) int64 sample positions that `pixels` fills
    img_size: int
    in_chans: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return (len(self.crops), self.in_chans, self.img_size, self.img_size)

    def __len__(self) -> int:
        return len(self.crops)

    def pin_memory(self) -> "EncodedBatch":  # the DataLoader's pin_memory thread calls this
        return dataclasses.replace(self, data=self.data.pin_memory(), pixels=self.pixels.pin_memory())

    @classmethod
    def collate(cls, items: Sequence[Union[Tuple[bytes, CropParams], torch.Tensor]], img_size: int,
                in_chans: int) -> "EncodedBatch":
        """From per-sample items: (JPEG bytes, crop) for the device, or a uint8 crop made on the CPU."""
        chunks, offsets, crops, pixels, on_cpu, at = [], [0], [], [], [], 0
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                pixels.append(item)
                on_cpu.append(i)
                crops.append([0, 0, img_size, img_size, 0])
            else:
                data, crop = item
                chunks.append(data)
                at += len(data)
                crops.append(crop.as_list())
            offsets.append(at)
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if at else torch.empty(0, dtype=torch.uint8)
        stacked = torch.stack(pixels) if pixels else torch.empty(0, in_chans, img_size, img_size, dtype=torch.uint8)
        return cls(data, torch.tensor(offsets, dtype=torch.int64), torch.tensor(crops, dtype=torch.int64).view(-1, 5),
                   stacked, torch.tensor(on_cpu, dtype=torch.int64), img_size, in_chans)

    def decode(self, device: torch.device) -> torch.Tensor:
        """(B, C, S, S) uint8 on `device`: nvJPEG on CUDA (torchvision's CPU decoder elsewhere)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        size, batch = self.img_size, len(self)
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        if len(self.on_cpu):
            out[self.on_cpu.to(device)] = self.pixels.to(device, non_blocking=True)
        cpu_rows = set(self.on_cpu.tolist())
        rows = [i for i in range(batch) if i not in cpu_rows]
        if not rows:
            return out
        offsets = self.offsets.tolist()
        jpegs = [self.data[offsets[i]:offsets[i + 1]] for i in rows]
        mode = ImageReadMode.GRAY if self.in_chans == 1 else ImageReadMode.RGB
        try:
            images: List[Optional[torch.Tensor]] = list(decode_jpeg(jpegs, mode=mode, device=device))
        except RuntimeError:  # one image the device cannot take fails the whole call: find it
            images = [_decode_one(j, mode, device) for j in jpegs]
        crops = self.crops.tolist()
        for row, jpeg, image in zip(rows, jpegs, images):
            top, left, height, width, flip = crops[row]
            crop = CropParams(top, left, height, width, bool(flip))
            if image is None:
                out[row] = _cpu_fallback(jpeg, crop, size, self.in_chans).to(device)
                continue
            region = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            resized = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]
            out[row] = resized.flip(-1) if flip else resized
        return out


_warn_fallback = RateLimitedWarning("the device could not decode a JPEG; decoding it on the CPU", log)


def _decode_one(jpeg: torch.Tensor, mode, device: torch.device) -> Optional[torch.Tensor]:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(jpeg, mode=mode, device=device)
    except RuntimeError as err:
        _warn_fallback(repr(err)[:200])
        return None


def _cpu_fallback(jpeg: torch.Tensor, crop: CropParams, size: int, in_chans: int) -> torch.Tensor:
    try:
        image = open_image(io.BytesIO(jpeg.numpy().tobytes()))
        return PretrainTransform(size, in_chans).from_pil(image, crop)
    except Exception as err:  # corrupt past its header: a zero image, like a batch without any good sample
        log.error("a JPEG that neither the device nor PIL can decode (%r); using a zero image", err)
        return torch.zeros(in_chans, size, size, dtype=torch.uint8)


class DeviceJpegItems:
    """The worker half: sample bytes + seed -> an item for `EncodedBatch.collate`."""

    def __init__(self, transform: PretrainTransform):
        self.transform = transform

    def __call__(self, data: bytes, seed: int) -> Union[Tuple[bytes, CropParams], torch.Tensor]:
        image = open_image(io.BytesIO(data))  # header only; raises on data that is no image
        crop = self.transform.params(*image.size, seed)
        if image.format == "JPEG" and image.mode in NVJPEG_MODES:
            return bytes(data), crop
        return self.transform.from_pil(image, crop)

    def collate(self, items: Sequence[Union[Tuple[bytes, CropParams], torch.Tensor]]) -> EncodedBatch:
        return EncodedBatch.collate(items, self.transform.img_size, self.transform.in_chans)


def gpu_decode_problem(device: torch.device) -> Optional[str]:
    """Why nvJPEG decoding cannot run for `device` (None: it can)."""
    if device.type != "cuda":
        return f"the run's device is {device.type}, and nvJPEG needs CUDA"
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        probe = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
        decode_jpeg(probe, device=device)
    except Exception as err:  # a torchvision built without nvJPEG, a driver without it
        return f"torchvision cannot decode JPEGs on {device} ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
    return None


def resolve_decode(cfg: DataConfig, device: torch.device) -> DataConfig:
    """`cfg` with `decode: cpu` (and one warning saying why) where `decode: gpu` cannot run."""
    if cfg.decode != "gpu":
        return cfg
    problem = ("only data.name=webdataset decodes on the device; "
               f"{cfg.name!r} decodes on the CPU" if cfg.name != "webdataset" else gpu_decode_problem(device))
    if problem is None:
        return cfg
    log.warning("data.decode=gpu: %s; decoding on the CPU in the DataLoader workers instead", problem)
    return dataclasses.replace(cfg, decode="cpu")
