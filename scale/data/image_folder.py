"""An ImageFolder tree (one sub-folder per class) as a pre-training source.

Listing: root/<class>/**/<image> (root/train or root/val when the root has them), classes
the sorted class folder names, samples the files with an image extension, sorted by path.
Symlinked folders are followed, but each real folder and file is listed once
(scale/shards/source_tree.py: symlink loops and repeated links cannot recurse forever or
duplicate samples); what is left out, and files without an image extension, are logged
once. A missing root, or one without class folders or images, is a UserError naming
data.root.

Order: MapStyleData's, a pure function of (seed, epoch, rank, world_size), with a seeded
augmentation per sample.

Bad files (unreadable, truncated, not an image despite the extension) are replaced, not
dropped: sample i that cannot be decoded takes the image and label of the first decodable
file of a fixed pseudo-random sequence of other indices drawn from i alone, transformed
under i's own augmentation seed. So every batch keeps its size and its positions, which
samples a batch holds stays a pure function of (seed, epoch, rank), and neither the worker
count nor a resume nor a skip changes any other sample. Replaced samples are counted where
they are decoded and the count travels with the batch (a DataLoader worker is another
process); the main process sums the counts for `skipped_samples()`. The workers warn for
each bad file, rate limited. If none of REPLACEMENT_TRIES candidates decodes, the sample
becomes a zero image labelled -1 (logged as an error).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from ..shards.source_tree import walk_files
from .base import DATASETS, Batch, LoaderSpec, PretrainData
from .map_style import MapStyleData
from .transforms import RateLimitedWarning, build_pretrain_transform, load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
REPLACEMENT_TRIES = 16
LAYOUT = "expected root/<class>/<image> files (or root/train/<class>/... and root/val/<class>/...)"


@dataclass(frozen=True)
class Decoded:
    """What the source hands the transform: the image (None: nothing decodable) and whether
    it stands in for a bad file."""

    image: Optional[Image.Image]
    replaced: bool


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


class ImageFiles(Dataset):
    """Indexable image files; item i is (Decoded, label), a replacement when file i is bad."""

    def __init__(self, root: Path, files: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                 in_chans: int):
        self.root, self.files, self.labels, self.classes = root, list(files), list(labels), list(classes)
        self.in_chans = in_chans
        self._warn = RateLimitedWarning("skipping unreadable or corrupt image", log)

    def __len__(self) -> int:
        return len(self.files)

    def candidates(self, index: int) -> List[int]:
        """`index`, then the fixed stand-ins for it: a function of the index alone."""
        rng = random.Random(f"replace:{index}")  # string seeds hash stably across processes
        n = len(self.files)
        return [index] + [(index + 1 + rng.randrange(n - 1)) % n for _ in range(REPLACEMENT_TRIES if n > 1 else 0)]

    def __getitem__(self, index: int) -> Tuple[Decoded, int]:
        for candidate in self.candidates(index):
            try:
                with open(self.root / self.files[candidate], "rb") as stream:
                    image = load_image(stream, self.in_chans)
            except Exception as err:  # any unreadable or undecodable file; it must not end the run
                self._warn(f"{self.root / self.files[candidate]}: {err!r}"[:300])
                continue
            return Decoded(image, replaced=candidate != index), self.labels[candidate]
        log.error("%s and its %d stand-ins are all unreadable; yielding a zero image with label -1",
                  self.root / self.files[index], REPLACEMENT_TRIES)
        return Decoded(None, replaced=True), -1


class ImageFolderData(MapStyleData):
    """MapStyleData over ImageFiles; the transform also returns each sample's replaced flag,
    which collates into the batch, so the count comes back from the worker processes."""

    def __init__(self, source: ImageFiles, transform: Callable[[Any], torch.Tensor], img_size: int):
        zeros = torch.zeros(source.in_chans, img_size, img_size)

        def transform_and_flag(item: Decoded) -> Tuple[torch.Tensor, int]:
            return (zeros if item.image is None else transform(item.image)), int(item.replaced)
        super().__init__(source, transform_and_flag)
        self._skipped = 0

    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        return self._count_skips(super().loader(spec, epoch, start_batch))

    def _count_skips(self, batches: Iterator[Any]) -> Iterator[Batch]:
        for (images, replaced), labels in batches:
            self._skipped += int(replaced.sum())
            yield images, labels

    def skipped_samples(self) -> int:
        return self._skipped


@DATASETS.register("image_folder")
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
    source = ImageFiles(root, files, labels, classes, in_chans)
    return ImageFolderData(source, build_pretrain_transform(cfg, img_size, in_chans), img_size)
