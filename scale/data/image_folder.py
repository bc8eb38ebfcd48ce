"""An ImageFolder tree (one sub-folder per class) as a pre-training source.

Listing: root/<class>/**/<image> (root/train or root/val when the root has them), classes
the sorted class folder names, samples the files with an image extension, sorted by path.
Symlinked folders are followed, but each real folder and file is listed once
(scale/shards/source_tree.py: symlink loops and repeated links cannot recurse forever or
duplicate samples); what is left out, and files without an image extension, are logged
once. A missing root, or one without class folders or images, is a UserError naming
data.root.

Order: MapStyleData's: global batch k a pure function of (seed, epoch, global batch), each rank
its rows of it, with a seeded augmentation per sample.

Bad files (unreadable, truncated, not an image despite the extension) are replaced, not
dropped: sample i that cannot be decoded takes the image and label of the first decodable
file of a fixed pseudo-random sequence of other indices drawn from i alone, transformed
under i's own augmentation seed. So every batch keeps its size and its positions, which
samples a global batch holds stays a pure function of (seed, epoch, global batch), and neither the worker
count nor a resume nor a skip changes any other sample. Replaced samples are counted where
they are decoded and the count travels with the batch (a DataLoader worker is another
process); the main process sums the counts for `skipped_samples()`. The workers warn for
each bad file, rate limited. If none of REPLACEMENT_TRIES candidates decodes, the sample
becomes a zero image labelled -1 (logged as an error).
"""
from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import Check, ConfigError, DataConfig
from ..shards.source_tree import walk_files
from .base import DATASETS, PretrainData
from .device_input import DeviceInput
from .map_style import UNREADABLE, MapStyleData, Sample
from .transforms import RateLimitedWarning, Transform, build_pretrain_transform, open_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
REPLACEMENT_TRIES = 16
LAYOUT = "expected root/<class>/<image> files (or root/train/<class>/... and root/val/<class>/...)"


def list_image_folder(root: Path, setting: str = "data.root") -> Tuple[List[str], List[int], List[str]]:
    """(image paths relative to root, their class indices, class names); UserError if none."""
    try:
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise ConfigError(f"{setting} {str(root)!r}: cannot list: {err.strerror or err}; {LAYOUT}") from None
    if not class_names:
        raise ConfigError(f"{setting} {str(root)!r}: no class folders; {LAYOUT}")
    files, left_out = walk_files(root, class_names)
    for path, reason in left_out:
        log.warning("%s %r: leaving out %s: %s", setting, str(root), path, reason)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(images) < len(files):
        others = [f for f in files if not f.lower().endswith(IMAGE_EXTENSIONS)]
        log.warning("%s %r: ignoring %d files without an image extension (%s), first: %s", setting, str(root),
                    len(others), " ".join(IMAGE_EXTENSIONS), others[0])
    if not images:
        raise ConfigError(f"{setting} {str(root)!r}: no images ({' '.join(IMAGE_EXTENSIONS)}) in its "
                          f"{len(class_names)} class folders; {LAYOUT}")
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[path.split("/", 1)[0]] for path in images]
    empty = sorted(set(class_names) - {path.split("/", 1)[0] for path in images})
    if empty:
        log.warning("%s %r: %d class folders hold no images, first: %s", setting, str(root), len(empty), empty[0])
    return images, labels, class_names


def stand_ins(index: int, count: int) -> List[int]:
    """`index`, then the fixed stand-ins for it among `count` samples: a function of the index alone
    (also the indexed shards' stand-ins, scale/data/indexed_shards.py)."""
    rng = random.Random(f"replace:{index}")  # string seeds hash stably across processes
    tries = REPLACEMENT_TRIES if count > 1 else 0
    return [index] + [(index + 1 + rng.randrange(count - 1)) % count for _ in range(tries)]


class ImageFiles(Dataset):
    """Indexable image files; item i is (file i opened lazily, its label)."""

    def __init__(self, root: Path, files: Sequence[str], labels: Sequence[int], classes: Sequence[str]):
        self.root, self.files, self.labels, self.classes = root, list(files), list(labels), list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        # Read whole, then open: the header is parsed, decoding waits for the transform's crop.
        return open_image(io.BytesIO((self.root / self.files[index]).read_bytes())), self.labels[index]

    def candidates(self, index: int) -> List[int]:
        return stand_ins(index, len(self.files))


class ImageFolderData(MapStyleData):
    """MapStyleData over ImageFiles: a bad file is replaced by the first of its stand-ins that
    decodes, under the bad one's augmentation seed."""

    source: ImageFiles

    def __init__(self, source: ImageFiles, transform: Transform, device_input: DeviceInput, img_size: int,
                 in_chans: int):
        super().__init__(source, transform, device_input)
        self.img_size, self.in_chans = img_size, in_chans
        self._warn = RateLimitedWarning("skipping unreadable or corrupt image", log)

    def load_sample(self, index: int, seed: int) -> Sample:
        for candidate in self.source.candidates(index):
            try:
                image, label = self.source[candidate]
                return self.transform(image, seed), label, int(candidate != index)
            except Exception as err:  # any unreadable or undecodable file; it must not end the run
                self._warn(f"{self.source.root / self.source.files[candidate]}: {err!r}"[:300])
        log.error("%s and its %d stand-ins are all unreadable; yielding a zero image with label %d",
                  self.source.root / self.source.files[index], REPLACEMENT_TRIES, UNREADABLE)
        return torch.zeros(self.in_chans, self.img_size, self.img_size, dtype=torch.uint8), UNREADABLE, 1


@dataclass
class ImageFolderConfig:
    """An image folder has no keys of its own: it reads data.root (data.val_root for monitors)."""

    def validate(self, check: Check) -> None:
        for name in ("num_samples", "shuffle_buffer", "decode"):
            check.unused(name, True, "data.name is image_folder (every file is one sample, decoded on the CPU)")


@DATASETS.register("image_folder", config=ImageFolderConfig)
def build_image_folder(cfg: DataConfig, img_size: int, in_chans: int, train: bool) -> PretrainData:
    if not cfg.root:
        raise ConfigError(f"data.root is empty; {LAYOUT}")
    root = Path(cfg.root)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise ConfigError(f"data.root {cfg.root!r}: {what}; {LAYOUT}")
    split = root / ("train" if train else "val")
    if split.is_dir():  # ImageNet layout: root/train/<class>/..., root/val/<class>/...
        root = split
    files, labels, classes = list_image_folder(root)
    return ImageFolderData(ImageFiles(root, files, labels, classes), build_pretrain_transform(cfg, img_size, in_chans),
                           DeviceInput(cfg.mean, cfg.std), img_size, in_chans)
