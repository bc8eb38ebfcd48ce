"""The dataset interface every pre-training source implements.

A `PretrainData` hands the trainer an iterator of `(images, labels, indices)` batches for
one epoch on one rank, and turns each `images` into the model's input on the device with
`prepare` / `to_device` (inside the step): the built-in sources yield uint8 pixels, or
encoded JPEGs with `data.decode: gpu`, and the device decodes, converts and normalises
them there. `indices` (int64) names each sample by its index in the source, -1 where a
streaming reader cannot (`names_samples` False); data.record_samples writes them. The
order is a pure function of (seed, epoch, rank, world_size), so resuming mid-epoch is
`loader(epoch, start_batch=k)`: it yields exactly the batches an uninterrupted run would
have yielded after its first k. Map-style sources go further: global batch k (all ranks
together) depends on (seed, epoch, global batch) alone, not on the world size or the
workers (scale/data/map_style.py), so a run resumes on another allocation with every
sample of the epoch used once. Each source names its order (`order`), which every checkpoint
records: a resume mid-epoch continues that order, so another one (shards indexed or unindexed
since) waits for an epoch's end (scale/trainer/resume_check.py). Labels are only used for monitoring (kNN, probes);
pre-training ignores them.

A new source registers its builder (`@DATASETS.register("name")`, called with the data
config, image size, channels and split), passes `DeviceInput(cfg.mean, cfg.std)` to
`PretrainData.__init__`, and yields uint8 (B, C, H, W) batches (a float batch is taken as
already normalised), augmenting each sample under its own seed (`sample_seed`, and
`PretrainTransform` for MAE's crop and flip).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, FrozenSet, Iterator, Tuple

import torch

from ..config import DataConfig
from ..registry import Registry
from .device_input import DeviceImages, DeviceInput, HostBatch

# (images for `PretrainData.prepare`, labels, int64 index of each sample in the source or -1)
Batch = Tuple[HostBatch, torch.Tensor, torch.Tensor]

# The orders an epoch is drawn in (`PretrainData.order`; a checkpoint records its order as meta.json's
# data_order, and a resume mid-epoch must continue it: scale/trainer/resume_check.py).
GLOBAL_BATCH_SLICES = "global-batch slices"  # map-style: a permutation cut into global batches (map_style.py)
INDEXED_SHARD_WINDOWS = "indexed-shard windows"  # indexed shards: shards permuted, windows shuffled (indexed_shards.py)
STREAM = "stream"  # shards dealt to world_size x num_workers streaming readers (wds_stream.py)
# Orders whose global batch k is the same on any world size and number of DataLoader workers.
ELASTIC_ORDERS: FrozenSet[str] = frozenset({GLOBAL_BATCH_SLICES, INDEXED_SHARD_WINDOWS})


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that fixes the sample order for one rank."""

    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = True


class PretrainData(abc.ABC):
    """A deterministic, exactly resumable source of image batches."""

    # Whether the loader's indices name the samples (a streaming reader yields -1): data.record_samples needs it.
    names_samples: bool = True
    # The order an epoch is drawn in (one of the names above): the trainer records it in each checkpoint,
    # since a resume mid-epoch in another order (shards indexed or unindexed since) would skip and repeat samples.
    order: str = GLOBAL_BATCH_SLICES

    def __init__(self, device_input: DeviceInput):
        self.device_input = device_input

    def prepare(self, images: HostBatch, device: torch.device) -> torch.Tensor:
        """A loader batch -> normalised float (B, C, H, W) on `device`: decoded there if it is
        encoded, converted and normalised there if it is uint8, taken as it is if it is float."""
        return self.device_input(images, device)

    def to_device(self, images: HostBatch, device: torch.device) -> DeviceImages:
        """Like `prepare`, but the batch stays uint8 on `device` and is normalised a slice at a
        time (`DeviceImages[i:j]`, `.all()`): a step in micro-batches holds one in float."""
        return self.device_input.images(images, device)

    @property
    def elastic(self) -> bool:
        """Whether global batch k is the same on any world size and number of DataLoader workers, so that a
        run may resume on another allocation; a shard stream's order is not."""
        return self.order in ELASTIC_ORDERS

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples in one (global) epoch."""

    def batches_per_epoch(self, spec: LoaderSpec) -> int:
        """Global batches of spec.batch_size x world_size over an equal share of samples per rank: with
        drop_last, num_samples // global batch, whatever the world size that global batch is split over."""
        usable = self.num_samples // spec.world_size * spec.world_size
        global_batch = spec.batch_size * spec.world_size
        return usable // global_batch if spec.drop_last else -(-usable // global_batch)

    @abc.abstractmethod
    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` for `spec.rank`, skipping the first `start_batch`."""

    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far (sources that can meet corrupt data override this)."""
        return 0


DATASETS: Registry[PretrainData] = Registry("dataset", "data.name")

# Signature of a dataset builder: (data config, image size, channels, train split?) -> PretrainData
DatasetBuilder = Callable[[DataConfig, int, int, bool], PretrainData]


def build_dataset(cfg: DataConfig, img_size: int, in_chans: int, train: bool = True) -> PretrainData:
    return DATASETS.build(cfg.name, cfg, img_size, in_chans, train)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for augmentation, independent of which worker decodes it."""
    # Large odd multipliers spread nearby (epoch, index) pairs over the 63-bit range.
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63 - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(num_samples, generator=g)
