"""WebDataset tar shards as a deterministic, exactly resumable pre-training source.

Registered as dataset "webdataset" (the module has another name so that it never
shadows the `webdataset` package it imports).

A split whose local shards all have their member-offset index (NAME.tar.idx.json: the
converters write it, `scale-verify-shards --index` builds it) and that is read finitely (with
either data.decode) is not streamed: the builder hands it to scale/data/indexed_shards.py,
which reads it by sample in an order independent of the ranks and workers (`elastic`).
What follows is the stream (pipe:/URL roots, shards without an index, resampled mode), whose
order depends on world_size x num_workers; the builder warns when local shards are streamed
for want of an index.

How one rank's epoch is built (W = max(1, num_workers) DataLoader workers):

* Shards. The shard list is shuffled with a rng seeded by (seed, epoch), full-size shards
  first, and dealt to "slots": rank r, worker w reads shards[r + world*w :: world*W]
  (split by node, then by worker). Finite mode needs at least world*W shards.
  Resampled mode draws shards with replacement from a stream seeded by (seed, epoch,
  slot) and never runs dry.
* Batches. Batching happens inside the workers (DataLoader batch_size=None), and torch's
  DataLoader takes batches from its workers round robin, skipping workers that are done.
  So the epoch is planned up front (`EpochPlan`): how many batches of what size each
  worker builds from the next samples of its shuffled stream, and hence which worker
  builds batch b. Every worker yields exactly its planned batches, which keeps the
  order exact.
* Equal length on every rank (drop_last=True, training). In finite mode the batch count
  B comes from the manifest, independent of the epoch: a slot holds a known number of
  full-size shards plus some short ones, at worst the shortest, and B is the most
  batches every rank can fill from such lower bounds, so a few samples per worker and
  epoch are left unread; which ones changes with the epoch; batch b comes from worker
  b % W. Resampled epochs are num_samples // world_size samples per rank.
* drop_last=False (evaluation) in finite mode yields every sample of the rank's shards
  once, each worker ending on a partial batch, so ranks may differ in batch count.
* Resume. `loader(spec, epoch, start_batch=k)` lets DataLoader worker j play the part of
  worker (p + j) % W, p the worker of batch k, which replays its stream (tar reading
  and the shuffle buffer only, no decoding) past the samples its earlier batches used.
* Augmentation. Each sample's crop and flip come from a generator seeded by
  sample_seed(seed, epoch, i), i unique per (rank, worker, position in the worker's
  stream). Workers yield uint8 batches (crop-aware JPEG decoding, scale.data.transforms)
  or, with `data.decode: gpu`, JPEG bytes and crops for nvJPEG (scale.data.gpu_decode);
  `prepare` normalises (and decodes) on the device.
* Corrupt samples (undecodable image, no image, missing or bad .cls) take their slot in
  the batch like any sample, so resuming needs no decoding; the worker fills the slot
  with another sample of the same batch under the corrupt one's augmentation seed,
  warns (rate limited) and reports the count with the batch. The main process adds the
  counts up for `skipped_samples()`. A batch with no decodable sample at all stops the
  run (a UserError naming the first bad sample): training on blank images would only
  hide that the data is gone. Unreadable tar data ends that shard with a warning; if a
  worker's shards give fewer samples than the manifest promised, it reads them again
  (reshuffled) to fill its batches. A resampled stream whose reads fail 2 x shards + 10
  times in a row (an unreachable URL, a pipe that fails) is a UserError too, so a dead
  source ends the run instead of spinning; its workers end with the trainer
  (scale.data.loader_workers).
* Roots. A shard is a local file when its URL has no scheme (or `file:`); anything with a
  scheme (`pipe:cat /d/x.tar`, `https://...`, `s3://...`) is left to webdataset to open, as
  webdataset itself decides. Such shards are never counted by scanning: finite mode then
  needs a manifest (data.manifest), resampled mode data.num_samples.
* Mistakes in the settings are UserErrors (one line, exit 2) naming data.root,
  data.val_root or data.manifest, or the shard: no such root, a directory without
  shards, a shard that is no regular file (a folder, a device), a first shard that is no
  tar, an invalid manifest (not JSON, another format, counts that are not integers >= 0, a
  shard listed twice, a shard name that is no plain file name), and, when samples are counted
  without a manifest, a shard that is unreadable, not a tar or truncated (no
  end-of-archive block).
* Cost of the bound: the worker with the fewest samples holds back its whole rank.
  Equal shards plus one short last shard (scale.shards' layout) lose little: about that
  shard's shortfall, plus the shards left over when world*W does not divide their
  number (ImageNet as 1281 x 1000 + 167 on 8 ranks x 8 workers: 0.25%). Shards of many
  different sizes lose more, since every slot's bound assumes it got the shortest.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ..atomic_files import irregular_kind
from ..config import ConfigError, DataConfig
from ..errors import UserError
from ..shards.manifest import MANIFEST_FORMAT, MANIFEST_NAME, load_manifest
from .base import DATASETS, STREAM, Batch, LoaderSpec, PretrainData, sample_seed
from .device_input import DeviceInput
from .gpu_decode import DeviceJpegItems
from .loader_workers import ignore_stop_signals, loader_generator, start_workers
from .transforms import RateLimitedWarning, Transform, build_pretrain_transform, open_image
from .wds_config import WebDatasetConfig

log = logging.getLogger(__name__)

SHARD_FORMS = ("expected a directory of .tar shards (with its manifest.json), a brace pattern such as "
               "/data/train-{000000..000099}.tar, one .tar file, or a URL pattern webdataset opens "
               "(pipe:cat /data/train-{000000..000099}.tar, https://...)")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_INITIAL = 100  # samples buffered before the shuffle starts yielding (webdataset's default)

Sample = Dict[str, Any]
WorkerBatch = Tuple[Any, torch.Tensor, int]  # images (uint8 or EncodedBatch), labels, corrupt samples replaced
SampleItems = Union["CpuItems", DeviceJpegItems]


# ----------------------------------------------------------------------------- shard lists

@dataclass(frozen=True)
class ShardSet:
    """The shards of one split and, when known, how many samples each holds."""

    urls: Tuple[str, ...]
    counts: Optional[Tuple[int, ...]]
    root: str  # as configured, for error messages
    manifest: Optional[str] = None
    setting: str = "data.root"  # the config key `root` came from


def _local_path(url: str) -> Optional[Path]:
    """The local file `url` names, or None for what webdataset opens by its scheme (`pipe:`,
    `http:`, `s3:` ...). Decided as webdataset's gopen decides, by the URL's scheme, so that
    `pipe:cat /d/x.tar` is a command whether or not it contains `://`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def _scan_tar(path: str) -> Tuple[int, Optional[str]]:
    """(samples in the local tar `path`, why it cannot be trusted: unreadable, not a tar, cut short, or None)."""
    try:
        tar = tarfile.open(path, "r:*")
    except OSError as err:
        return 0, f"unreadable ({err.strerror or err})"
    except (tarfile.TarError, EOFError, zlib.error):
        return 0, "not a tar archive"
    samples, last_key = 0, None
    with tar:
        try:
            for member in tar:
                if not member.isreg() or Path(member.name).name.startswith("__"):
                    continue
                key, _ = wds.tariterators.base_plus_ext(member.name)  # webdataset's grouping into samples
                if key is not None and key != last_key:
                    samples, last_key = samples + 1, key
            if type(tar.fileobj) is io.BufferedReader:  # uncompressed: look for the end-of-archive block
                tar.fileobj.seek(tar.offset)
                end = tar.fileobj.read(tarfile.BLOCKSIZE)
                if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                    return samples, f"truncated after {samples} samples (no end-of-archive block at byte {tar.offset})"
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            detail = " ".join(str(err).split())
            return samples, f"truncated or corrupt after {samples} samples ({type(err).__name__}: {detail})"
    return samples, None


def count_tar_samples(path: str, setting: str = "data.root") -> int:
    """Samples in a local tar; UserError naming the shard if it is unreadable, not a tar or cut short."""
    samples, problem = _scan_tar(path)
    if problem is not None:
        raise UserError(f"{setting}: shard {path} is {problem}; expected complete tar shards: re-copy or "
                        "re-convert it, or list the shards' sample counts in a manifest.json next to them "
                        "(or in data.manifest)")
    return samples


def _read_manifest(path: Path, where: str) -> Dict[str, Any]:
    manifest, problem = load_manifest(path, complete=False)
    if manifest is None:
        raise ConfigError(f"{where}: {problem}; expected a {MANIFEST_FORMAT} manifest as the shard converters write it: "
                          '{"format": "scale-wds-v1", "shards": [{"name": "train-000000.tar", "num_samples": 1000}, ...]}')
    return manifest


def _check_exist(urls: Sequence[str], root: str, setting: str) -> None:
    local = [(u, p) for u in urls if (p := _local_path(u)) is not None and not p.is_file()]
    irregular = [(u, kind) for u, p in local if (kind := irregular_kind(p))]  # a folder, a device (or a link to one)
    if irregular:
        url, kind = irregular[0]
        raise ConfigError(f"{setting} {root!r}: {len(irregular)} of {len(urls)} shards are not regular files "
                          f"(first: {url}, {kind}); expected every shard to be a tar file")
    absent = [u for u, _ in local]
    if not absent:
        return
    if len(absent) == len(urls) == 1:
        if "{" in root or "}" in root:
            what = "not a valid brace pattern (webdataset left it unexpanded) and no such file"
        elif any(c in root for c in "*?["):
            what = "no such file (glob patterns are not expanded; use a directory or a brace pattern)"
        else:
            what = "no such directory or file"
        raise ConfigError(f"{setting} {root!r}: {what}; {SHARD_FORMS}")
    raise ConfigError(f"{setting} {root!r}: {len(absent)} of {len(urls)} shards do not exist (first: {absent[0]}); "
                      "expected every shard that it names, or that its manifest lists, to exist")


def _check_first_is_tar(urls: Sequence[str], root: str, setting: str) -> None:
    """A cheap guard against a root that names the wrong kind of file (an image, a manifest)."""
    first = _local_path(urls[0])
    if first is not None and not tarfile.is_tarfile(first):
        raise ConfigError(f"{setting} {root!r}: {first} is not a tar shard; {SHARD_FORMS}")


def resolve_shards(root: str, manifest: str = "", setting: str = "data.root", scan: bool = True) -> ShardSet:
    """Expand a shard pattern or directory and attach per-shard sample counts.

    Counts come from the manifest (`manifest`, else manifest.json next to the shards);
    without one, local shards are counted by scanning their tar headers if `scan`.
    Every mistake (no such root, no shards, an invalid manifest, a truncated shard met
    while counting) is a UserError naming the setting or the file.
    """
    if not root:
        raise ConfigError(f"{setting} is empty; {SHARD_FORMS}")
    local_root = _local_path(root)
    manifest_path: Optional[Path] = Path(manifest) if manifest else None
    where = f"data.manifest {manifest!r}" if manifest else ""
    if manifest_path is not None and not manifest_path.is_file():
        raise ConfigError(f"data.manifest {manifest!r}: no such file; expected the {MANIFEST_NAME} of the shards "
                          f"({MANIFEST_FORMAT}), or empty to use the one next to them")
    counts: Optional[List[int]] = None
    if local_root is not None and local_root.is_dir():
        manifest_path = manifest_path or local_root / MANIFEST_NAME
        if manifest_path.is_file():
            shards = _read_manifest(manifest_path, where or f"{setting} {root!r}: {manifest_path}")["shards"]
            urls = [str(local_root / s["name"]) for s in shards]
            counts = [s["num_samples"] for s in shards]
        else:
            urls = sorted(str(p) for p in local_root.glob("*.tar"))
        if not urls:
            raise ConfigError(f"{setting} {root!r}: a directory without .tar shards or a {MANIFEST_NAME}; {SHARD_FORMS}")
        _check_exist(urls, root, setting)
    else:
        urls = wds.shardlists.expand_urls(root)
        _check_exist(urls, root, setting)
        first = _local_path(urls[0])
        if manifest_path is None and first is not None:
            manifest_path = first.parent / MANIFEST_NAME
        if manifest_path is not None and manifest_path.is_file():
            shards = _read_manifest(manifest_path, where or f"{setting} {root!r}: {manifest_path}")["shards"]
            by_name = {s["name"]: s["num_samples"] for s in shards}
            missing = [u for u in urls if u.rsplit("/", 1)[-1] not in by_name]
            if missing:
                raise ConfigError(f"{setting} {root!r}: {len(missing)} shards are not in manifest {manifest_path} "
                                  f"(first: {missing[0]}); expected the manifest of this split (data.manifest)")
            counts = [by_name[u.rsplit("/", 1)[-1]] for u in urls]
    _check_first_is_tar(urls, root, setting)
    found = manifest_path if manifest_path is not None and manifest_path.is_file() else None
    shards = ShardSet(tuple(urls), None if counts is None else tuple(counts), root,
                      None if found is None else str(found), setting)
    return count_by_scanning(shards) if scan else shards


def count_by_scanning(shards: ShardSet) -> ShardSet:
    """`shards` with counts from scanning their tar headers, when no manifest gave them and every
    shard is a local file."""
    if shards.counts is not None or not all(_local_path(u) is not None for u in shards.urls):
        return shards
    log.warning("%s %r has no manifest; counting samples by scanning %d shards", shards.setting, shards.root,
                len(shards.urls))
    counts = tuple(count_tar_samples(str(_local_path(u)), shards.setting) for u in shards.urls)
    return dataclasses.replace(shards, counts=counts)


# ----------------------------------------------------------------------------- epoch plan

@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: batch b has `sizes[b]` samples and is built by worker `order[b]`.

    torch's DataLoader takes batches from its workers round robin and skips workers that
    are done, so `order` is that round robin over each worker's batch count.
    """

    workers: int
    order: Tuple[int, ...]
    sizes: Tuple[int, ...]

    @classmethod
    def round_robin(cls, worker_sizes: Sequence[Sequence[int]]) -> "EpochPlan":
        queues = [list(reversed(sizes)) for sizes in worker_sizes]
        order: List[int] = []
        sizes: List[int] = []
        while any(queues):
            for worker, queue in enumerate(queues):
                if queue:
                    order.append(worker)
                    sizes.append(queue.pop())
        return cls(len(queues), tuple(order), tuple(sizes))

    @property
    def num_batches(self) -> int:
        return len(self.order)

    def worker_share(self, worker: int, start_batch: int) -> Tuple[int, List[int]]:
        """(samples the worker's batches before `start_batch` used, sizes of its later batches)."""
        mine = [b for b, w in enumerate(self.order) if w == worker]
        return (sum(self.sizes[b] for b in mine if b < start_batch),
                [self.sizes[b] for b in mine if b >= start_batch])

    def next_worker(self, start_batch: int) -> int:
        """The worker that builds batch `start_batch` (any, once the epoch is over)."""
        return self.order[start_batch] if start_batch < self.num_batches else 0


def _split_into_batches(samples: int, batch_size: int, drop_last: bool) -> List[int]:
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def deal_order(counts: Sequence[int], seed: int, epoch: int) -> List[int]:
    """The epoch's shard order (indices into `counts`); slot s reads order[s::slots].

    Shards are shuffled by (seed, epoch), then full-size shards (the largest count) are
    dealt before the shorter ones: each slot then holds a known number of full shards,
    so a short last shard lowers only the bound of the slot that may get it.
    """
    order = list(range(len(counts)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    full = max(counts)
    return [i for i in order if counts[i] == full] + [i for i in order if counts[i] != full]


def slot_sample_bounds(counts: Sequence[int], slots: int) -> List[int]:
    """For each slot, the fewest samples `deal_order` can give it in any epoch."""
    full = max(counts)
    n_full = sum(1 for c in counts if c == full)
    shortest_first = [0] + list(itertools.accumulate(sorted(c for c in counts if c != full)))
    bounds = []
    for slot in range(slots):
        full_shards = len(range(slot, n_full, slots))
        short_shards = len(range(slot, len(counts), slots)) - full_shards
        bounds.append(full_shards * full + shortest_first[short_shards])
    return bounds


def guaranteed_rank_samples(counts: Sequence[int], world_size: int, workers: int, batch_size: int) -> int:
    """Samples every rank can serve in any epoch with round-robin worker batches.

    Worker w of a rank holds at least cap_w samples (`slot_sample_bounds`), so it can fill
    c_w = cap_w // batch_size batches, and the rank can serve B = min_w(c_w * workers + w)
    full batches (batch B would be the (c_w+1)-th batch of that binding worker) plus the
    binding worker's leftover samples. The result is the minimum over ranks.
    """
    bounds = slot_sample_bounds(counts, world_size * workers)
    best: Optional[int] = None
    for rank in range(world_size):
        caps = [bounds[rank + world_size * w] for w in range(workers)]
        full = min((cap // batch_size) * workers + w for w, cap in enumerate(caps))
        binding = full % workers
        samples = full * batch_size + caps[binding] - (full // workers) * batch_size
        best = samples if best is None else min(best, samples)
    return best or 0


# ----------------------------------------------------------------------------- the source

class CorruptSample(ValueError):
    pass


def decode_sample(sample: Sample, items: SampleItems, seed: int) -> Tuple[Any, int]:
    """(what the batch holds for the sample, its label); raises on a corrupt sample. Both readers,
    the stream and the indexed one (scale/data/indexed_shards.py), decode with it."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample("no image (" + "/".join(IMAGE_KEYS) + ")")
    if "cls" not in sample:
        raise CorruptSample("missing .cls")
    label = int(bytes(sample["cls"]).decode("ascii").strip())
    return items(sample[key], seed), label


def _read_error_text(exn: Exception) -> str:
    """A shard read error for a message: webdataset appends the stream object and the URL to
    its arguments; the object's repr is an address, so only the cause and the URL are kept."""
    words = [str(arg) for arg in exn.args if isinstance(arg, (str, int))]
    return " ".join(f"{type(exn).__name__}: {', '.join(words)}".split())


class WebDatasetData(PretrainData):
    names_samples = False  # a shard stream cannot say which sample it read: its indices are -1
    order = STREAM  # its order depends on world_size x num_workers (the slots shards are dealt to): not elastic

    def __init__(self, shards: ShardSet, items: SampleItems, device_input: DeviceInput, *,
                 resampled: bool = False, epoch_samples: Optional[int] = None, shuffle_buffer: int = 1000):
        """`items`: what a worker makes of a sample's image bytes and augmentation seed, and how
        it batches them (`CpuItems`: finished uint8 images; `DeviceJpegItems`: JPEG bytes and
        crops for the device). `epoch_samples`: samples per resampled epoch (default: the
        manifest's count)."""
        super().__init__(device_input)
        if not resampled and shards.counts is None:
            ways = ("a manifest.json next to the shards (or set data.manifest), or set data.resampled"
                    if shards.setting == "data.root" else  # the held-out split is always read finitely
                    f"local shards with their {MANIFEST_NAME} next to them (a URL or pipe: split is not counted)")
            raise ConfigError(f"{shards.setting} {shards.root!r}: finite mode needs per-shard sample counts; "
                              f"expected {ways}")
        self.shards, self.items = shards, items
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        if epoch_samples is None:
            if shards.counts is None:
                raise ConfigError(f"{shards.setting} {shards.root!r}: no manifest, so resampled mode needs data.num_samples")
            epoch_samples = sum(shards.counts)
        if epoch_samples < 1:
            raise ConfigError(f"{shards.setting} {shards.root!r}: an epoch needs at least one sample, got {epoch_samples}")
        self._epoch_samples = epoch_samples
        self._skipped = 0  # main-process total, fed by the batches' counts
        self._warn_corrupt = RateLimitedWarning("skipping corrupt sample", log)
        self._warn_unreadable = RateLimitedWarning("skipping unreadable shard data", log)
        self._read_errors_in_a_row = 0

    # -- sizes

    @property
    def num_samples(self) -> int:
        return self._epoch_samples if self.resampled else sum(self.shards.counts or ())

    def plan(self, spec: LoaderSpec, epoch: int = 0) -> EpochPlan:
        workers = max(1, spec.num_workers)
        slots = spec.world_size * workers
        if not self.resampled and len(self.shards.urls) < slots:
            raise ConfigError(
                f"{self.shards.setting} {self.shards.root!r} has {len(self.shards.urls)} shards, fewer than "
                f"world_size x num_workers = {spec.world_size} x {workers} = {slots}; every DataLoader "
                "worker of every rank needs its own shard: lower data.num_workers, write more (smaller) "
                "shards, or set data.resampled")
        if not self.resampled and not spec.drop_last:
            # Every sample of the rank's shards once: each worker ends on a partial batch.
            order = deal_order(self.shards.counts, spec.seed, epoch)
            return EpochPlan.round_robin([
                _split_into_batches(sum(self.shards.counts[i] for i in order[spec.rank + spec.world_size * w::slots]),
                                    spec.batch_size, drop_last=False)
                for w in range(workers)])
        if self.resampled:
            rank_samples = self.num_samples // spec.world_size
        else:
            rank_samples = guaranteed_rank_samples(self.shards.counts, spec.world_size, workers, spec.batch_size)
        sizes = _split_into_batches(rank_samples, spec.batch_size, spec.drop_last)
        if not sizes:
            raise ConfigError(f"{self.shards.setting} {self.shards.root!r}: each rank is only guaranteed {rank_samples} "
                             f"samples per epoch, less than one batch of {spec.batch_size}")
        return EpochPlan.round_robin([sizes[w::workers] for w in range(workers)])

    def batches_per_epoch(self, spec: LoaderSpec) -> int:
        """Batches per rank and epoch: the same on every rank and in every epoch, except in
        finite mode with drop_last=False, where it is epoch 0's count for this rank."""
        return self.plan(spec).num_batches

    def skipped_samples(self) -> int:
        return self._skipped + self.device_input.replaced

    # -- iteration (main process)

    def loader(self, spec: LoaderSpec, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        plan = self.plan(spec, epoch)
        if not 0 <= start_batch <= plan.num_batches:
            raise ValueError(f"start_batch {start_batch} outside epoch of {plan.num_batches} batches")
        stream = _RankStream(self, spec, epoch, start_batch, plan)
        batches = DataLoader(stream, batch_size=None, shuffle=False, num_workers=spec.num_workers,
                             pin_memory=spec.pin_memory, persistent_workers=False,
                             worker_init_fn=ignore_stop_signals,
                             generator=loader_generator(self._stream_seed(spec, epoch, "loader", spec.rank)))
        return self._count_skips(start_workers(batches))

    def _count_skips(self, batches: Iterator[Any]) -> Iterator[Batch]:
        for images, labels, skipped in batches:
            self._skipped += int(skipped)
            yield images, labels, torch.full((len(labels),), -1, dtype=torch.int64)

    # -- iteration (inside a worker)

    def worker_batches(self, spec: LoaderSpec, epoch: int, plan: EpochPlan, worker: int,
                       start_batch: int) -> Iterator[WorkerBatch]:
        skip, sizes = plan.worker_share(worker, start_batch)
        raw = itertools.islice(enumerate(self._raw_samples(spec, epoch, plan.workers, worker)), skip, None)
        for size in sizes:
            chunk = list(itertools.islice(raw, size))
            yield self._decode_batch(chunk, spec, epoch, plan.workers, worker)

    def _stream_seed(self, spec: LoaderSpec, epoch: int, *parts: Any) -> int:
        # String seeds hash with sha512 in `random`, so they are stable across processes and runs.
        # Worker count 0 and 1 both mean one reader and give the same stream.
        key = ":".join(str(p) for p in (spec.seed, epoch, spec.world_size, max(1, spec.num_workers)) + parts)
        return random.Random(key).getrandbits(63)

    def _raw_samples(self, spec: LoaderSpec, epoch: int, workers: int, worker: int) -> Iterator[Sample]:
        """The worker's samples as raw bytes, shuffled, in a fixed order; endless."""
        slot = spec.rank + spec.world_size * worker
        if self.resampled:
            shard_seed = self._stream_seed(spec, epoch, "resampled") & 0x7FFFFFFF
            yield from self._read(wds.ResampledShards(list(self.shards.urls), seed=shard_seed,
                                                      worker_seed=lambda: slot, deterministic=True),
                                  self._stream_seed(spec, epoch, "buffer", slot))
            return
        order = deal_order(self.shards.counts, spec.seed, epoch)  # the same on every rank and worker
        urls = [self.shards.urls[i] for i in order[slot::spec.world_size * workers]]
        for pass_ in itertools.count():
            if pass_ > 0:  # only when shards held fewer readable samples than the manifest says
                log.warning("rank %d worker %d read all its %d shards of epoch %d; reading them again (pass %d)",
                            spec.rank, worker, len(urls), epoch, pass_)
                random.Random(self._stream_seed(spec, epoch, "pass", slot, pass_)).shuffle(urls)
            got = 0
            for sample in self._read(wds.SimpleShardList(urls), self._stream_seed(spec, epoch, "buffer", slot, pass_)):
                got += 1
                yield sample
            if got == 0:
                raise UserError(f"{self.shards.setting} {self.shards.root!r}: no readable sample in shards {urls[:3]}...; "
                                "expected tar shards of samples (scale-verify-shards (python -m data_prep.verify_shards) "
                                "checks them)")

    def _read(self, shard_list: IterableDataset, buffer_seed: int) -> Iterator[Sample]:
        stages: List[Any] = [shard_list, wds.tarfile_to_samples(handler=self._on_read_error)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(SHUFFLE_INITIAL, self.shuffle_buffer),
                                      rng=random.Random(buffer_seed)))
        for sample in wds.DataPipeline(*stages):
            self._read_errors_in_a_row = 0
            yield sample

    def _on_read_error(self, exn: Exception) -> bool:
        self._warn_unreadable(repr(exn)[:300])
        self._read_errors_in_a_row += 1
        # A resampled stream would otherwise spin forever on a split whose shards all fail.
        if self._read_errors_in_a_row > 2 * len(self.shards.urls) + 10:
            raise UserError(f"{self.shards.setting} {self.shards.root!r}: {self._read_errors_in_a_row} shard read "
                            f"errors in a row, last: {_read_error_text(exn)}; expected readable tar shards (check "
                            "them with scale-verify-shards (python -m data_prep.verify_shards))")
        return True  # go on with the next shard

    def _decode_batch(self, chunk: List[Tuple[int, Sample]], spec: LoaderSpec, epoch: int,
                      workers: int, worker: int) -> WorkerBatch:
        # Unique per (rank, worker, position): the worker's stream is fixed, so is the seed.
        seeds = [sample_seed(spec.seed, epoch, (position * spec.world_size + spec.rank) * workers + worker)
                 for position, _ in chunk]
        made: List[Optional[Tuple[Any, int]]] = []
        first_problem = ""
        for (_, sample), seed in zip(chunk, seeds):
            try:
                made.append(decode_sample(sample, self.items, seed))
            except Exception as err:  # any undecodable sample; it must not end the run
                problem = f"{sample.get('__url__')} key {sample.get('__key__')}: {err!r}"[:300]
                first_problem = first_problem or problem
                self._warn_corrupt(problem)
                made.append(None)
        good = [i for i, m in enumerate(made) if m is not None]
        if not good:  # nothing to stand in: training on blank images would go on silently
            raise UserError(f"{self.shards.setting} {self.shards.root!r}: every sample of a batch of {len(chunk)} is "
                            f"corrupt (first: {' '.join(first_problem.split())}); expected samples with a decodable "
                            f"image ({'/'.join(IMAGE_KEYS)}) and a .cls label (check the shards with "
                            "scale-verify-shards (python -m data_prep.verify_shards))")
        items, labels = [], []
        for i, (_, sample) in enumerate(chunk):
            if made[i] is None:  # the next good sample of the batch (else the first) under the corrupt one's seed
                made[i] = decode_sample(chunk[next((j for j in good if j > i), good[0])][1], self.items, seeds[i])
            items.append(made[i][0])
            labels.append(made[i][1])
        # Collating stacks straight into shared memory inside a worker, which saves the copy
        # that sending a plain tensor to the main process would make.
        return self.items.collate(items), torch.tensor(labels, dtype=torch.long), len(chunk) - len(good)


class CpuItems:
    """`data.decode: cpu`: sample bytes + seed -> the finished uint8 image (crop-aware decode)."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        return self.transform(open_image(io.BytesIO(data)), seed)

    def collate(self, items: List[Any]) -> Any:
        return default_collate(items)


class _RankStream(IterableDataset):
    """What one DataLoader worker iterates: its share of the rank's remaining batches."""

    def __init__(self, data: WebDatasetData, spec: LoaderSpec, epoch: int, start_batch: int, plan: EpochPlan):
        super().__init__()
        self.data, self.spec, self.epoch, self.start_batch, self.plan = data, spec, epoch, start_batch, plan

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        loader_worker = 0 if info is None else info.id
        # The DataLoader asks its worker 0 first, which must be the one that builds batch
        # start_batch; the rest of the round robin follows from there.
        worker = (self.plan.next_worker(self.start_batch) + loader_worker) % self.plan.workers
        return self.data.worker_batches(self.spec, self.epoch, self.plan, worker, self.start_batch)


@DATASETS.register("webdataset", config=WebDatasetConfig)  # lazily: scale/data/__init__.py
def build_webdataset(cfg: WebDatasetConfig | DataConfig, img_size: int, in_chans: int, train: bool) -> PretrainData:
    # The held-out split is always read finitely, and uses the manifest next to its shards.
    root, setting = (cfg.root, "data.root") if train else (cfg.val_root, "data.val_root")
    resampled = cfg.resampled and train
    shards = resolve_shards(root, cfg.manifest if train else "", setting, scan=False)
    transform = build_pretrain_transform(cfg, img_size, in_chans)
    # Here, not at the top: indexed_shards builds on this module's reader parts.
    from .indexed_shards import IndexedShardData, IndexedShards, shard_indexes
    items = DeviceJpegItems(transform) if cfg.decode == "gpu" else CpuItems(transform)
    indexes, streamed_because = (None, "data.resampled is true") if resampled else shard_indexes(shards)
    if indexes is not None:
        log.info("%s %r: %d indexed shards, read by sample: the order does not depend on the world size or "
                 "data.num_workers (a run resumes on any allocation)", setting, root, len(indexes))
        return IndexedShardData(IndexedShards([_local_path(u) for u in shards.urls], indexes), items,
                                DeviceInput(cfg.mean, cfg.std), shuffle_buffer=cfg.shuffle_buffer, shards=shards)
    # Local shards without an index are the case a user can change, so it is a warning (what reaches stderr,
    # since scale configures no logging); a URL root or resampling is chosen, so it is info.
    can_index = not resampled and all(_local_path(u) is not None for u in shards.urls)
    log.log(logging.WARNING if can_index else logging.INFO,
            "%s %r: shards read as a stream, because %s: the order depends on the world size x data.num_workers, "
            "so a resume must keep both", setting, root, streamed_because)
    if not resampled:
        shards = count_by_scanning(shards)
    # Resampled epochs: the manifest's sample count, else data.num_samples.
    epoch_samples = cfg.num_samples if resampled and shards.counts is None else None
    return WebDatasetData(shards, items, DeviceInput(cfg.mean, cfg.std), resampled=resampled,
                          epoch_samples=epoch_samples, shuffle_buffer=cfg.shuffle_buffer)
