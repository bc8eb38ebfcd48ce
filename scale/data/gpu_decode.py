"""`data.decode: gpu`: JPEG batches decoded with nvJPEG and cropped, resized and flipped on the device.

The worker no longer decodes: it reads each JPEG's header (size), draws the sample's crop
and flip from its seed (`scale.data.crop`, exactly as the CPU path does) and ships the
compressed bytes, concatenated into one tensor, with one row of crop parameters per sample.
Images nvJPEG cannot take (PNG and other formats, CMYK JPEGs) are decoded and cropped on
the CPU in the worker and travel as pixels. On the device, `EncodedBatch.decode` runs
`torchvision.io.decode_jpeg` on the whole batch, then crops each image and resizes it with
`F.interpolate(bicubic, antialias=True)` (PIL's kernel, as on the CPU path), flips, rounds
to uint8. Should the device reject an image the header did not give away, that image is
decoded on the CPU instead (warned); one that PIL rejects too is replaced and counted as on the
CPU path, and a batch in which no image decodes stops the run. nvJPEG runs on its own CUDA
streams, which do not wait for work queued on the training stream (pytorch/vision#9606), so the
device is synchronised around the decode: one host sync per step.

Crop and flip are a function of the sample's seed ((seed, epoch, sample index)) and its bytes,
so exact resume holds as on the CPU path. The stream's workers and the indexed-shard reader
(scale/data/indexed_shards.py, whose order does not depend on the allocation) both build their
batches with `DeviceJpegItems`: a sample under a seed is the same row on either. Pixels differ
from the CPU path's full-scale decode by the decoders' rounding (0.2 levels of 255 on average,
measured on the CPU), and more where the CPU path decodes a large JPEG at a reduced DCT scale.
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
from ..errors import UserError
from .crop import CropParams
from .transforms import PretrainTransform, RateLimitedWarning, open_image

log = logging.getLogger(__name__)

NVJPEG_MODES = ("L", "RGB", "YCbCr")  # JPEG colour spaces decode_jpeg converts; CMYK / YCCK are not


@dataclass
class EncodedBatch:
    """One worker batch for device decoding.

    `data` holds every JPEG's bytes back to back (`offsets[i]:offsets[i+1]` is sample i's;
    empty for samples decoded on the CPU), `crops` is (B, 5) int64 (top, left, height,
    width, flip), `sizes` (B, 2) the images' (width, height), `seeds` (B,) their augmentation
    seeds, `pixels` the CPU-decoded samples (N, C, S, S) uint8 in order of `on_cpu`.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    crops: torch.Tensor
    sizes: torch.Tensor
    seeds: torch.Tensor
    pixels: torch.Tensor
    on_cpu: torch.Tensor  # (N,) int64 sample positions that `pixels` fills
    transform: PretrainTransform  # the CPU path's, for its crop draws and for fallbacks

    @property
    def shape(self) -> Tuple[int, ...]:
        return (len(self.crops), self.transform.in_chans, self.transform.img_size, self.transform.img_size)

    def __len__(self) -> int:
        return len(self.crops)

    def pin_memory(self) -> "EncodedBatch":  # the DataLoader's pin_memory thread calls this
        return dataclasses.replace(self, data=self.data.pin_memory(), pixels=self.pixels.pin_memory())

    @classmethod
    def collate(cls, items: Sequence["EncodedItem"], transform: PretrainTransform) -> "EncodedBatch":
        """From per-sample items: a JPEG for the device, or a uint8 crop made on the CPU."""
        size, chans = transform.img_size, transform.in_chans
        chunks, offsets, crops, sizes, seeds, pixels, on_cpu, at = [], [0], [], [], [], [], [], 0
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                pixels.append(item)
                on_cpu.append(i)
                crops.append([0, 0, size, size, 0])
                sizes.append([size, size])
                seeds.append(0)
            else:
                chunks.append(item.data)
                at += len(item.data)
                crops.append(item.crop.as_list())
                sizes.append(list(item.size))
                seeds.append(item.seed)
            offsets.append(at)
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if at else torch.empty(0, dtype=torch.uint8)
        stacked = torch.stack(pixels) if pixels else torch.empty(0, chans, size, size, dtype=torch.uint8)

        def table(rows: List[List[int]], width: int) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int64).view(-1, width)
        return cls(data, torch.tensor(offsets, dtype=torch.int64), table(crops, 5), table(sizes, 2),
                   torch.tensor(seeds, dtype=torch.int64), stacked, torch.tensor(on_cpu, dtype=torch.int64), transform)

    def jpeg(self, row: int) -> bytes:
        return self.data[int(self.offsets[row]):int(self.offsets[row + 1])].numpy().tobytes()

    def decode(self, device: torch.device) -> Tuple[torch.Tensor, int]:
        """((B, C, S, S) uint8 on `device`, samples replaced): nvJPEG on CUDA (torchvision's CPU
        decoder elsewhere). A JPEG the device rejects is decoded on the CPU; one that PIL rejects
        too (a corrupt body behind a valid header) is replaced by the next decodable JPEG of the
        batch (else the first), cropped under the bad one's seed, as on the CPU path, and counted.
        Its label stays the bad sample's (labels left the worker with the batch)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        size = self.transform.img_size
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        if len(self.on_cpu):
            out[self.on_cpu.to(device)] = self.pixels.to(device, non_blocking=True)
        cpu_rows = set(self.on_cpu.tolist())
        rows = [i for i in range(len(self)) if i not in cpu_rows]
        if not rows:
            return out, 0
        offsets = self.offsets.tolist()
        jpegs = [self.data[offsets[i]:offsets[i + 1]] for i in rows]
        mode = ImageReadMode.GRAY if self.transform.in_chans == 1 else ImageReadMode.RGB
        cuda = device.type == "cuda"
        if cuda:  # nvJPEG decodes on its own streams, which do not wait for the kernels still queued here
            torch.cuda.synchronize(device)
        try:
            images: List[Optional[torch.Tensor]] = list(decode_jpeg(jpegs, mode=mode, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # one image the device cannot take fails the whole call: find it
            images = [_decode_one(j, mode, device) for j in jpegs]
        if cuda:  # ... nor do the kernels that will read their output
            torch.cuda.synchronize(device)
        crops = self.crops.tolist()
        bad: List[int] = []
        for row, image in zip(rows, images):
            top, left, height, width, flip = crops[row]
            if image is None:
                pixels = self._cpu_decode(row, CropParams(top, left, height, width, bool(flip)))
                if pixels is None:
                    bad.append(row)
                else:
                    out[row] = pixels.to(device)
                continue
            region = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            resized = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]
            out[row] = resized.flip(-1) if flip else resized
        if len(bad) == len(self):  # nothing to stand in: training on blank images would go on silently
            raise UserError(f"data.root: every image of a batch of {len(self)} is a corrupt JPEG that the device and "
                            "PIL both reject; expected decodable images (check the shards with scale-verify-shards "
                            "(python -m data_prep.verify_shards))")
        good = [row for row in rows if row not in bad]
        for row in bad:
            out[row] = self._replacement(row, good).to(device)
        return out, len(bad)

    def _cpu_decode(self, row: int, crop: CropParams) -> Optional[torch.Tensor]:
        try:
            return self.transform.from_pil(open_image(io.BytesIO(self.jpeg(row))), crop)
        except Exception as err:  # a corrupt body behind a valid header: the caller replaces it
            _warn_corrupt(f"row {row}: {err!r}"[:200])
            return None

    def _replacement(self, row: int, good: Sequence[int]) -> torch.Tensor:
        for stand_in in [r for r in good if r > row] + [r for r in good if r < row]:
            width, height = self.sizes[stand_in].tolist()
            pixels = self._cpu_decode(stand_in, self.transform.params(width, height, int(self.seeds[row])))
            if pixels is not None:
                return pixels
        log.error("no JPEG of a batch of %d decodes; a zero image stands in", len(self))
        return torch.zeros(self.shape[1:], dtype=torch.uint8)


_warn_fallback = RateLimitedWarning("the device could not decode a JPEG; decoding it on the CPU", log)
_warn_corrupt = RateLimitedWarning("replacing a corrupt JPEG that the device and PIL both reject", log)


def _decode_one(jpeg: torch.Tensor, mode, device: torch.device) -> Optional[torch.Tensor]:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(jpeg, mode=mode, device=device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        _warn_fallback(repr(err)[:200])
        return None


@dataclass(frozen=True)
class DeviceJpeg:
    """A sample for the device: its JPEG bytes, original (width, height), crop and seed."""

    data: bytes
    size: Tuple[int, int]
    crop: CropParams
    seed: int


EncodedItem = Union[DeviceJpeg, torch.Tensor]


class DeviceJpegItems:
    """The worker half: sample bytes + seed -> an item for `EncodedBatch.collate`."""

    def __init__(self, transform: PretrainTransform):
        self.transform = transform

    def __call__(self, data: bytes, seed: int) -> EncodedItem:
        image = open_image(io.BytesIO(data))  # header only; raises on data that is no image
        crop = self.transform.params(*image.size, seed)
        if image.format == "JPEG" and image.mode in NVJPEG_MODES:
            return DeviceJpeg(bytes(data), image.size, crop, seed)
        return self.transform.from_pil(image, crop)

    def collate(self, items: Sequence[EncodedItem]) -> EncodedBatch:
        return EncodedBatch.collate(items, self.transform)


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
