"""An ImageFolder tree (one sub-folder per class) as a pre-training source."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from ..config import DataConfig
from .base import DATASETS, PretrainData
from .map_style import MapStyleData
from .transforms import build_pretrain_transform


@DATASETS.register("image_folder")
def build_image_folder(cfg: DataConfig, img_size: int, in_chans: int, train: bool) -> PretrainData:
    root = Path(cfg.root)
    split = root / ("train" if train else "val")
    if split.is_dir():  # ImageNet layout: root/train/<class>/..., root/val/<class>/...
        root = split
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {cfg.root!r} is not a directory")
    try:
        source = ImageFolder(str(root))
    except FileNotFoundError as err:  # torchvision's message for an empty tree
        raise FileNotFoundError(f"data.root {cfg.root!r}: {err}") from None
    return MapStyleData(source, build_pretrain_transform(cfg, img_size, in_chans))
