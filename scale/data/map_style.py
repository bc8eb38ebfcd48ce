"""Deterministic loading for indexable datasets (synthetic, image folders).

Each epoch is a seeded permutation split across ranks by striding; each sample's
augmentation runs under its own seed, so the batches do not depend on how many
DataLoader workers decode them, and a resume can skip straight to batch k.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .base import Batch, LoaderSpec, PretrainData, epoch_permutation, sample_seed
from .loader_workers import ignore_stop_signals, loader_generator, start_workers


class _SeededView(Dataset):
    """Items are (dataset index, augmentation seed) pairs resolved in the worker."""

    def __init__(self, source: Dataset, transform: Callable[[Any], torch.Tensor],
                 indices: Sequence[int], seeds: Sequence[int]):
        self.source, self.transform = source, transform
        self.indices, self.seeds = indices, seeds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image, label = self.source[self.indices[i]]
        # fork_rng keeps the worker's global RNG untouched; torchvision draws from it.
        # Seeding the CPU generator directly skips torch.manual_seed's accelerator set-up.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seeds[i])
            return self.transform(image), int(label)


class MapStyleData(PretrainData):
    def __init__(self, source: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.source = source
        self.transform = transform

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def rank_indices(self, spec: LoaderSpec, epoch: int) -> List[int]:
        perm = epoch_permutation(self.num_samples, spec.seed, epoch)
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
        view = _SeededView(self.source, self.transform, indices, seeds)
        return start_workers(DataLoader(view, batch_size=spec.batch_size, shuffle=False,
                                        num_workers=spec.num_workers, pin_memory=spec.pin_memory,
                                        drop_last=spec.drop_last, persistent_workers=False,
                                        worker_init_fn=ignore_stop_signals,
                                        generator=loader_generator(sample_seed(spec.seed, epoch, -2 - spec.rank))))
