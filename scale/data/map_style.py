"""Deterministic loading for indexable datasets (synthetic, image folders).

Each epoch is a seeded permutation cut into global batches: global batch k is
perm[k*G:(k+1)*G] (G = per-rank batch x world size = train.global_batch), and rank r takes
the r-th of its world_size equal slices (rows r*b..(r+1)*b-1). Each sample's augmentation
runs under its own seed. So global batch k, and every image in it, depends on (seed, epoch,
G) alone: neither the world size nor the DataLoader workers change it, and a resume on any
allocation with the same G skips straight to batch k with every sample of the epoch used
once. With world size 1 this is the plain order perm[k*b:(k+1)*b]. Workers yield uint8
batches; `prepare` normalises them on the device. The loader's third element is each
sample's index in the source (the intended one: a stand-in for a bad file keeps its index).

A source that meets bad files replaces them and flags the replacement; a sample for which
no stand-in decoded either comes as label UNREADABLE. A batch of nothing but those stops
the run with a UserError: training on blank images would only hide that the data is gone.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..errors import UserError
from .base import Batch, LoaderSpec, PretrainData, epoch_permutation, sample_seed
from .device_input import DeviceInput, HostBatch
from .loader_workers import ignore_stop_signals, loader_generator, start_workers
from .transforms import Transform

Sample = Tuple[torch.Tensor, int, int]  # uint8 image, label, 1 if it stands in for a bad one
UNREADABLE = -1  # the label of a sample that neither it nor any stand-in could give (a zero image)


class _SeededView(Dataset):
    """Item i is sample `indices[i]` under its own augmentation seed, both resolved in the worker: the
    seed is computed from (seed, epoch, index) there rather than kept per sample, so a rank holds one
    int64 tensor of its samples, not Python lists of the epoch."""

    def __init__(self, data: "MapStyleData", indices: torch.Tensor, seed: int, epoch: int):
        self.data, self.indices, self.seed, self.epoch = data, indices, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = int(self.indices[i])
        return self.data.load_sample(index, sample_seed(self.seed, self.epoch, index))


class _Batches(Sampler):
    """Batch b is positions [offsets[b], offsets[b + 1]) of the view, listed only when it is drawn."""

    def __init__(self, offsets: Sequence[int]):
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[List[int]]:
        for start, end in zip(self.offsets, self.offsets[1:]):
            yield list(range(start, end))


class MapStyleData(PretrainData):
    def __init__(self, source: Dataset, transform: Transform, device_input: DeviceInput):
        super().__init__(device_input)
        self.source = source
        self.transform = transform
        self._skipped = 0  # main-process total, fed by the batches' replaced flags

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def load_sample(self, index: int, seed: int) -> Sample:
        """Sample `index` augmented under `seed` (sources that can meet bad files override this)."""
        image, label = self.source[index]
        return self.transform(image, seed), int(label), 0

    def collate(self, samples: List[Sample]) -> Tuple[HostBatch, torch.Tensor, torch.Tensor]:
        """A batch's samples -> (images, labels, replaced flags), in the worker: uint8 images stacked
        (into shared memory). Indexed shards override it to batch what `data.decode` makes of a sample
        (encoded JPEGs for the device, scale/data/indexed_shards.py)."""
        return default_collate(samples)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """Every sample of `epoch` in the order global batches take them: a permutation of (seed, epoch)
        (indexed shards override it with one that keeps reads local, scale/data/indexed_shards.py)."""
        return epoch_permutation(self.num_samples, seed, epoch)

    def rank_samples(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Tuple[torch.Tensor, List[int]]:
        """The samples of `epoch` on `spec.rank` from its batch `start_batch` on, in the order its batches
        hold them (int64), and each of those batches' size: its slice of each global batch. Every rank gets
        an equal share (the last num_samples % world_size samples sit out); without drop_last the last
        global batch is the remainder, split evenly too. Tensor slices of the epoch's order, so a rank
        holds its share of the epoch, not lists of all of it."""
        batches = self.batches_per_epoch(spec)
        if not 0 <= start_batch <= batches:
            raise ValueError(f"start_batch {start_batch} outside epoch of {batches} batches")
        order = self.epoch_order(spec.seed, epoch)
        world, per_rank = spec.world_size, spec.batch_size
        global_batch = world * per_rank
        usable = self.num_samples // world * world
        whole = min(batches, usable // global_batch)  # global batches of global_batch samples
        first = min(start_batch, whole)
        parts = [order[first * global_batch:whole * global_batch].view(-1, world, per_rank)[:, spec.rank].reshape(-1)]
        sizes = [per_rank] * (whole - first)
        if batches > whole and start_batch <= whole:  # the remainder (no drop_last), split evenly
            rest = order[whole * global_batch:usable]
            share = len(rest) // world
            parts.append(rest[spec.rank * share:(spec.rank + 1) * share])
            sizes.append(share)
        return torch.cat(parts), sizes

    def rank_indices(self, spec: LoaderSpec, epoch: int) -> List[int]:
        """The samples of `epoch` on `spec.rank`, in the order its batches hold them."""
        return self.rank_samples(spec, epoch)[0].tolist()

    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        indices, sizes = self.rank_samples(spec, epoch, start_batch)
        # Batch b of the loader is positions [offsets[b], offsets[b + 1]) of `indices`.
        offsets = list(itertools.accumulate(sizes, initial=0))
        loaded = start_workers(DataLoader(_SeededView(self, indices, spec.seed, epoch), batch_sampler=_Batches(offsets),
                                          collate_fn=self.collate, num_workers=spec.num_workers,
                                          pin_memory=spec.pin_memory,
                                          persistent_workers=False, worker_init_fn=ignore_stop_signals,
                                          generator=loader_generator(sample_seed(spec.seed, epoch, -2 - spec.rank))))
        return self._count_skips(loaded, indices, offsets, epoch, start_batch)

    def _count_skips(self, loaded: Iterator[Any], indices: torch.Tensor, offsets: List[int], epoch: int,
                     start_batch: int) -> Iterator[Batch]:
        for batch, (images, labels, replaced), start, end in zip(itertools.count(start_batch), loaded, offsets,
                                                                 offsets[1:]):
            if bool((labels == UNREADABLE).all()):
                raise UserError(f"data.root: every sample of batch {batch} of epoch {epoch} ({len(labels)} samples) is "
                                "unreadable, and so is every stand-in tried for each; expected decodable images (the "
                                "warnings above name the files)")
            self._skipped += int(replaced.sum())
            yield images, labels, indices[start:end].clone()  # a copy: a batch does not keep the rank's share alive

    def skipped_samples(self) -> int:
        return self._skipped
