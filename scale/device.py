"""Which device a run uses and which autocast dtype it computes in (training and evaluation alike)."""
from __future__ import annotations

from typing import Optional

import torch

from .config import ConfigError


def resolve_device(requested: str, setting: str = "train.device") -> torch.device:
    """`auto` -> CUDA when available, else CPU; an explicit `cuda` without a GPU is an error naming `setting`."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=cuda but no CUDA device is available")
    return torch.device(requested)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA, fp32 on CPU (bf16 is ~20x slower than fp32 on most CPUs); None = no autocast."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32; got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None
