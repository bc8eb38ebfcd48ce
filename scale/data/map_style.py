"""Deterministic loading for indexable datasets (synthetic, image folders).

Each epoch is a seeded permutation split across ranks by striding; each sample's
augmentation runs under its own seed, so the batches do not depend on how many
DataLoader workers decode them, and a resume can skip straight to batch k.
Workers yield uint8 batches; `prepare` normalises them on the device.

A source that meets bad files replaces them and flags the replacement; a sample for which
no stand-in decoded either comes as label UNREADABLE. A batch of nothing but those stops
the run with a UserError: training on blank images would only hide that the data is gone.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .base import Batch, LoaderSpec, PretrainData, epoch_permutation, sample_seed
from .device_input import DeviceInput
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

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """Every sample of `epoch` in the order global batches take them: a permutation of (seed, epoch)
        (indexed shards override it with one that keeps reads local, scale/data/indexed_shards.py)."""
        return epoch_permutation(self.num_samples, seed, epoch)

    def rank_indices(self, spec: LoaderSpec, epoch: int) -> List[int]:
        perm = self.epoch_order(spec.seed, epoch)
        usable = (self.num_samples // spec.world_size) * spec.world_size  # equal share per rank
        return perm[:usable][spec.rank::spec.world_size].tolist()

    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        indices = self.rank_indices(spec, epoch)
        n_batches = self.batches_per_epoch(spec)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} outside epoch of {n_batches} batches")
        end = n_batches * spec.batch_size if spec.drop_last else len(indices)
        indices = indices[start_batch * spec.batch_size:end]
        seeds = [sample_seed(spec.seed, epoch, i) for i in indices]
        batches = start_workers(DataLoader(_SeededView(self, indices, seeds), batch_size=spec.batch_size,
                                           shuffle=False, num_workers=spec.num_workers, pin_memory=spec.pin_memory,
                                           drop_last=spec.drop_last, persistent_workers=False,
                                           worker_init_fn=ignore_stop_signals,
                                           generator=loader_generator(sample_seed(spec.seed, epoch, -2 - spec.rank))))
        return self._count_skips(batches, epoch, start_batch)

    def _count_skips(self, batches: Iterator[Any], epoch: int, start_batch: int) -> Iterator[Batch]:
        for batch, (images, labels, replaced) in enumerate(batches, start_batch):
            if bool((labels == UNREADABLE).all()):
                raise UserError(f"data.root: every sample of batch {batch} of epoch {epoch} ({len(labels)} samples) is "
                                "unreadable, and so is every stand-in tried for each; expected decodable images (the "
                                "warnings above name the files)")
            self._skipped += int(replaced.sum())
            yield images, labels

    def skipped_samples(self) -> int:
        return self._skipped
