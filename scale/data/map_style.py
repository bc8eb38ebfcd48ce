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
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import UserError
from .base import Batch, LoaderSpec, PretrainData, epoch_permutation, sample_seed
from .device_input import DeviceInput, HostBatch
from .loader_workers import ignore_stop_signals, loader_generator, start_workers
from .transforms import Transform

Sample = Tuple[torch.Tensor, int, int]  # uint8 image, label, 1 if it stands in for a bad one
UNREADABLE = -1  # the label of a sample that neither it nor any stand-in could give (a zero image)


class _SeededView(Dataset):
    """Item i is sample `indices[i]` under augmentation seed `seeds[i]`, resolved in the worker."""

    def __init__(self, data: "MapStyleData", indices: Sequence[int], seeds: Sequence[int]):
        self.data, self.indices, self.seeds = data, indices, seeds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.data.load_sample(self.indices[i], self.seeds[i])


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

    def rank_batches(self, spec: LoaderSpec, epoch: int) -> List[List[int]]:
        """The samples of each batch of `epoch` on `spec.rank`: its slice of each global batch. Every
        rank gets an equal share (the last num_samples % world_size samples sit out); without
        drop_last the last global batch is the remainder, split evenly too."""
        perm = self.epoch_order(spec.seed, epoch).tolist()
        usable = self.num_samples // spec.world_size * spec.world_size
        global_batch = spec.batch_size * spec.world_size
        batches = []
        for start in range(0, self.batches_per_epoch(spec) * global_batch, global_batch):
            batch = perm[start:min(start + global_batch, usable)]
            share = len(batch) // spec.world_size
            batches.append(batch[spec.rank * share:(spec.rank + 1) * share])
        return batches

    def rank_indices(self, spec: LoaderSpec, epoch: int) -> List[int]:
        """The samples of `epoch` on `spec.rank`, in the order its batches hold them."""
        return [index for batch in self.rank_batches(spec, epoch) for index in batch]

    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        batches = self.rank_batches(spec, epoch)
        if not 0 <= start_batch <= len(batches):
            raise ValueError(f"start_batch {start_batch} outside epoch of {len(batches)} batches")
        batches = batches[start_batch:]
        indices = [index for batch in batches for index in batch]
        seeds = [sample_seed(spec.seed, epoch, i) for i in indices]
        # Batch b of the loader is positions [offsets[b], offsets[b + 1]) of `indices`.
        offsets = [0]
        for batch in batches:
            offsets.append(offsets[-1] + len(batch))
        positions = [list(range(a, b)) for a, b in zip(offsets, offsets[1:])]
        loaded = start_workers(DataLoader(_SeededView(self, indices, seeds), batch_sampler=positions,
                                          collate_fn=self.collate, num_workers=spec.num_workers,
                                          pin_memory=spec.pin_memory,
                                          persistent_workers=False, worker_init_fn=ignore_stop_signals,
                                          generator=loader_generator(sample_seed(spec.seed, epoch, -2 - spec.rank))))
        return self._count_skips(loaded, batches, epoch, start_batch)

    def _count_skips(self, loaded: Iterator[Any], batches: List[List[int]], epoch: int,
                     start_batch: int) -> Iterator[Batch]:
        for batch, (images, labels, replaced), indices in zip(itertools.count(start_batch), loaded, batches):
            if bool((labels == UNREADABLE).all()):
                raise UserError(f"data.root: every sample of batch {batch} of epoch {epoch} ({len(labels)} samples) is "
                                "unreadable, and so is every stand-in tried for each; expected decodable images (the "
                                "warnings above name the files)")
            self._skipped += int(replaced.sum())
            yield images, labels, torch.tensor(indices, dtype=torch.int64)

    def skipped_samples(self) -> int:
        return self._skipped
