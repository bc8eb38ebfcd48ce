"""Indexed WebDataset shards as a map-style source: item i is sample i of the shard set.

The webdataset source takes this path when every shard of the split is a local file with its
member-offset index next to it (`NAME.tar.idx.json`, scale/shards/shard_index.py: the converters
write it, `scale-verify-shards --index DIR` builds it for shards written by other tools) and the
split is read finitely (not data.resampled). Samples are numbered shard by shard, in the order the
manifest (or the brace pattern, or the sorted directory) lists the shards, and in each shard's own
order. Sample i is one positioned read (os.pread) of its members' bytes, parsed as a tar in memory
and made into a batch item by the streaming path's code (`wds_stream.decode_sample`, with the same
`items`): with data.decode=cpu a finished uint8 image; with data.decode=gpu the JPEG's bytes and the
crop and flip drawn from the sample's seed (scale/data/gpu_decode.py), which `collate` batches into
the EncodedBatch the device decodes, as the stream's workers do.

Order. MapStyleData's (scale/data/map_style.py): global batch k of an epoch is a fixed slice of
`epoch_order` and each rank takes its rows, so the batches depend on (seed, epoch, shard set,
data.shuffle_buffer, global batch) and not on the world size or the DataLoader workers: a run
resumes on another allocation with every sample of the epoch used once. `epoch_order` keeps reads
local, like the streaming path's shuffle buffer: the shards are permuted per (seed, epoch), their
samples laid end to end, and the samples permuted within consecutive windows of
data.shuffle_buffer samples (0 or 1: not permuted; as large as the split: one full permutation).

I/O cost. One read per sample of the sample's bytes plus its tar headers (512 bytes a member)
instead of one sequential read per shard. Within a window of data.shuffle_buffer samples the reads
jump around about shuffle_buffer x (bytes per sample) of one or two shards (1000 x 110 KB = 110 MB
for ImageNet at 256 px): free from the page cache or an SSD, a seek each on a disk, a request each
on network storage, where the streaming path makes one request per shard. The indexes are read
once, at start-up (about 60 bytes a sample).

Corrupt samples are replaced, not dropped, as the image-folder source replaces bad files: sample i
that does not read or decode takes the first good one of its fixed stand-ins
(`image_folder.stand_ins`, drawn from i alone) under i's own augmentation seed, warned (rate
limited) and counted; if none decodes it becomes a zero image labelled UNREADABLE. With
data.decode=gpu a worker reads only a JPEG's header, so a body that does not decode is found on the
device and replaced there (`EncodedBatch.decode`), and counted too.

An index that does not fit its shard (not the format, wrong types, a span outside the tar or off a
512-byte block, spans out of order, a size that is not the tar's, a sample count the manifest does
not have) is a UserError naming the file and how to rebuild it.
"""
from __future__ import annotations

import itertools
import logging
import os
import tarfile
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..shards.shard_index import index_path, load_index, span_members, split_member_name
from .base import INDEXED_SHARD_WINDOWS, epoch_permutation, sample_seed
from .device_input import DeviceInput, HostBatch
from .image_folder import REPLACEMENT_TRIES, stand_ins
from .map_style import UNREADABLE, MapStyleData, Sample
from .transforms import RateLimitedWarning
from .wds_stream import CorruptSample, SampleItems, ShardSet, _local_path, decode_sample

log = logging.getLogger(__name__)

OPEN_SHARDS = 16  # file descriptors a reader keeps open (reads stay within a window of a few shards)
REBUILD = "rebuild it with scale-verify-shards --index (python -m data_prep.verify_shards --index) on the shard folder"


@dataclass(frozen=True)
class ShardSpans:
    """What reading needs of one shard's index: each sample's byte span, as int64 tensors. The keys are
    checked with the rest of the index and then dropped: samples are named by their int index (what
    data.record_samples writes), and a rank keeping every key of the shard set would hold gigabytes."""

    offsets: torch.Tensor
    sizes: torch.Tensor


def shard_indexes(shards: ShardSet) -> Tuple[Optional[List[ShardSpans]], str]:
    """The spans of every shard of `shards` from its index, or (None, why the split is streamed instead).

    UserError for an index that is there but does not fit its shard, or a count the manifest
    does not have: reading it would give the wrong bytes.
    """
    paths = [_local_path(url) for url in shards.urls]
    if any(path is None for path in paths):
        return None, "its shards are URLs (pipe:, http:, ...), which are read as a stream"
    missing = [path for path in paths if not index_path(path).is_file()]
    if missing:
        return None, (f"{len(missing)} of {len(paths)} shards have no index (first: {index_path(missing[0])}); "
                      f"scale-verify-shards --index {missing[0].parent} writes them (before a run or at an "
                      "epoch's end: a checkpoint's epoch goes on in the order it began)")
    spans = []
    for position, path in enumerate(paths):
        index, problem = load_index(path)
        if index is None:
            raise ConfigError(f"{shards.setting} {shards.root!r}: {problem}; {REBUILD}")
        if shards.counts is not None and len(index.keys) != shards.counts[position]:
            raise ConfigError(f"{shards.setting} {shards.root!r}: index {index_path(path)} lists {len(index.keys)} "
                              f"samples, manifest {shards.manifest} says {shards.counts[position]}; {REBUILD}")
        spans.append(ShardSpans(torch.tensor(index.offsets, dtype=torch.int64),
                                torch.tensor(index.sizes, dtype=torch.int64)))
    return spans, ""


class IndexedShards(Dataset):
    """Item i: sample i of the shard set as webdataset gives it ({extension: bytes, "__key__", "__url__"})."""

    def __init__(self, paths: Sequence[Path], spans: Sequence[ShardSpans]):
        self._files: "OrderedDict[int, int]" = OrderedDict()  # shard -> descriptor, in this process
        self._pid = os.getpid()
        self.paths = [str(path) for path in paths]
        self.starts = list(itertools.accumulate((len(shard.offsets) for shard in spans), initial=0))
        # Offsets and sizes of every sample in two tensors: one object each, however many samples,
        # so forked workers share them instead of copying a list's pages on every refcount change.
        self.offsets = torch.cat([shard.offsets for shard in spans]) if spans else torch.zeros(0, dtype=torch.int64)
        self.sizes = torch.cat([shard.sizes for shard in spans]) if spans else torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.starts[-1]

    def where(self, index: int) -> str:
        """Sample `index` for a message: its shard and position there."""
        shard = bisect_right(self.starts, index) - 1
        return f"{self.paths[shard]} sample {index - self.starts[shard]}"

    def __getitem__(self, index: int) -> Dict[str, Any]:
        shard = bisect_right(self.starts, index) - 1
        offset, size = int(self.offsets[index]), int(self.sizes[index])
        span = os.pread(self._descriptor(shard), size, offset)
        if len(span) != size:
            raise CorruptSample(f"the shard ends {size - len(span)} bytes into the sample (truncated since indexing?)")
        sample: Dict[str, Any] = {"__url__": self.paths[shard]}
        try:
            members = span_members(span)
        except (tarfile.TarError, EOFError) as err:
            raise CorruptSample(f"no tar members at byte {offset} ({type(err).__name__}: {err})") from None
        for name, data in members:
            if Path(name).name.startswith("__"):
                continue
            key, extension = split_member_name(name)
            if sample.setdefault("__key__", key) != key:
                raise CorruptSample(f"its indexed bytes hold two samples ({sample['__key__']}, {key}): "
                                    f"a stale index? {REBUILD}")
            sample[extension.lower()] = data
        return sample

    def _descriptor(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its parent's descriptors share a file position
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= OPEN_SHARDS:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> Dict[str, Any]:  # a spawned worker opens its own files
        return {**self.__dict__, "_files": OrderedDict()}

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)


class IndexedShardData(MapStyleData):
    """MapStyleData over IndexedShards, in a read-local `epoch_order`; bad samples are replaced.
    `items` (CpuItems or DeviceJpegItems, as data.decode says) makes each sample's image a batch
    item and batches them, as in the stream's workers."""

    source: IndexedShards
    order = INDEXED_SHARD_WINDOWS  # elastic; data.shuffle_buffer, which also sets it, is checked on resume as config

    def __init__(self, source: IndexedShards, items: SampleItems, device_input: DeviceInput, *,
                 shuffle_buffer: int, shards: ShardSet):
        super().__init__(source, items.transform, device_input)
        self.items, self.shuffle_buffer, self.shards = items, shuffle_buffer, shards
        self._warn = RateLimitedWarning("skipping unreadable or corrupt sample", log)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """All samples of `epoch`: shards permuted, samples permuted within windows of shuffle_buffer."""
        starts = self.source.starts
        shards = epoch_permutation(len(starts) - 1, seed, epoch).tolist()
        order = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards])
        if self.shuffle_buffer <= 1:
            return order
        # Window number plus a uniform draw in [0, 1): sorting keeps the windows and shuffles inside each.
        # The draws' seed is another (seed, epoch) stream than the shard permutation's (sample index -1).
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -2**40))
        keys = torch.arange(len(order), dtype=torch.float64).div_(self.shuffle_buffer).floor_()
        keys += torch.rand(len(order), dtype=torch.float64, generator=generator)
        return order[torch.argsort(keys)]

    def collate(self, samples: List[Sample]) -> Tuple[HostBatch, torch.Tensor, torch.Tensor]:
        """`items` batches the images: stacked uint8, or an EncodedBatch for the device."""
        images, labels, replaced = zip(*samples)
        return (self.items.collate(list(images)), torch.tensor(labels, dtype=torch.int64),
                torch.tensor(replaced, dtype=torch.int64))

    def skipped_samples(self) -> int:
        """Samples replaced in the workers plus, with data.decode=gpu, JPEGs the device could not decode."""
        return super().skipped_samples() + self.device_input.replaced

    def load_sample(self, index: int, seed: int) -> Sample:
        for candidate in stand_ins(index, len(self.source)):
            try:
                item, label = decode_sample(self.source[candidate], self.items, seed)
                return item, label, int(candidate != index)
            except Exception as err:  # any unreadable or undecodable sample; it must not end the run
                self._warn(f"{self.source.where(candidate)}: {err!r}"[:300])
        log.error("%s and its %d stand-ins are all unreadable; yielding a zero image with label %d",
                  self.source.where(index), REPLACEMENT_TRIES, UNREADABLE)
        transform = self.items.transform
        return (torch.zeros(transform.in_chans, transform.img_size, transform.img_size, dtype=torch.uint8),
                UNREADABLE, 1)
