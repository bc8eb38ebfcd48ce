"""What several benchmarks share: the repository root, progress lines, atomic JSON, device syncs, memory,
and photo-like test JPEGs."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from scale.atomic_files import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# (width, height) of the test JPEGs: ImageNet's pre-resized shards, its full-size images, a large photo.
JPEG_SIZES = {"pre_resized": (341, 256), "full_size": (500, 375), "large": (2048, 1536)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all (a reader, or a kill mid-write, sees the previous file or the new one); values
    JSON cannot hold (paths, dtypes) as their text."""
    write_json_atomically(path, data, default=str)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2 ** 20:.0f} MiB"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark. Linux: VmHWM, the address space's own. Not
    ru_maxrss there: the kernel carries the pre-exec high-water mark across execve, so a child
    started from a large parent reports the parent's resident set (every method the same 2.27 GiB
    under the 2.3 GiB methods bench). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def smooth_noise_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Blobs at a few scales plus fine grain: compresses like a photo, unlike white noise."""
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 0.5), (12, 0.3), (48, 0.15)):
        coarse = rng.random((cells, max(2, cells * width // height), 3), dtype=np.float32)
        layer = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        canvas += weight * np.asarray(layer, np.float32)
    canvas += rng.normal(0, 4, canvas.shape).astype(np.float32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
