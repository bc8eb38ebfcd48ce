"""The webdataset source: shard resolution, deterministic/resumable order, rank balance, corrupt data."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from scale.config import DataConfig
from scale.data import LoaderSpec, build_dataset
from scale.data import wds_stream
from scale.data.transforms import RateLimitedWarning
from scale.data.wds_stream import (EpochPlan, WebDatasetData, deal_order, guaranteed_rank_samples,
                                   slot_sample_bounds)
from scale.errors import UserError

IMG = 16  # model input size in these tests


def jpeg_bytes(label: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(label).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, sizes: Sequence[int], prefix: str = "train", manifest: bool = True,
                 broken: Optional[Dict[int, str]] = None) -> List[Path]:
    """Shards of tiny JPEGs whose .cls is a unique running index (so labels identify samples).

    `broken` maps a sample index to how it is broken: "garbage" (bytes that are no image),
    "truncated" (a cut JPEG) or "no_cls".
    """
    broken = broken or {}
    directory.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for s, n in enumerate(sizes):
        path = directory / f"{prefix}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                key = f"{prefix}-{s:06d}-{i:06d}"
                image = jpeg_bytes(index)
                if broken.get(index) == "garbage":
                    image = b"this is not an image" * 10
                elif broken.get(index) == "truncated":
                    image = image[: len(image) // 2]
                _add(tar, f"{key}.jpg", image)
                if broken.get(index) != "no_cls":
                    _add(tar, f"{key}.cls", str(index).encode())
                _add(tar, f"{key}.json", json.dumps({"index": index}).encode())
                index += 1
        paths.append(path)
    if manifest:
        (directory / "manifest.json").write_text(json.dumps({
            "format": "scale-wds-v1", "split": prefix, "total_samples": sum(sizes),
            "shards": [{"name": p.name, "num_samples": n, "sha256": ""} for p, n in zip(paths, sizes)],
            "classes": {}, "options": {}, "skipped": []}))
    return paths


def build(root: str, train: bool = True, **overrides) -> WebDatasetData:
    fields = dict(name="webdataset", root=root, num_workers=0, shuffle_buffer=16)
    fields.update(overrides)
    data = build_dataset(DataConfig(**fields), IMG, 3, train)
    assert isinstance(data, WebDatasetData)
    return data


def collect(data: WebDatasetData, spec: LoaderSpec, epoch: int, start: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y, _ in data.loader(spec, epoch, start)]


def labels_of(batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> List[int]:
    return [int(x) for _, labels in batches for x in labels]


def assert_same(a: List[Tuple[torch.Tensor, torch.Tensor]], b: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


# ----------------------------------------------------------------------------- sources

def test_pattern_and_directory_resolve_the_same_shards(tmp_path: Path) -> None:
    paths = write_shards(tmp_path / "d", [5, 6, 7, 8])
    by_dir = build(str(tmp_path / "d"))
    by_pattern = build(str(tmp_path / "d" / "train-{000000..000003}.tar"))
    subset = build(str(tmp_path / "d" / "train-{000001..000002}.tar"))
    assert by_dir.shards.urls == by_pattern.shards.urls == tuple(str(p) for p in paths)
    assert by_dir.num_samples == by_pattern.num_samples == 26
    assert subset.num_samples == 13


def test_without_manifest_samples_are_counted_from_the_tars(tmp_path: Path) -> None:
    write_shards(tmp_path, [5, 6, 7], manifest=False)
    assert build(str(tmp_path)).num_samples == 18
    assert build(str(tmp_path / "train-{000000..000001}.tar")).num_samples == 11


def test_shards_missing_from_the_manifest_or_disk_are_errors(tmp_path: Path) -> None:
    write_shards(tmp_path, [4, 4])
    write_shards(tmp_path / "other", [4], prefix="val", manifest=False)
    with pytest.raises(ValueError, match="not in manifest"):
        build(str(tmp_path / "other" / "val-000000.tar"), manifest=str(tmp_path / "manifest.json"))
    with pytest.raises(UserError, match="do not exist"):
        build(str(tmp_path / "train-{000000..000002}.tar"))


def test_fewer_shards_than_ranks_times_workers_names_the_numbers(tmp_path: Path) -> None:
    write_shards(tmp_path, [8, 8, 8])
    data = build(str(tmp_path / "train-{000000..000002}.tar"))
    spec = LoaderSpec(batch_size=2, seed=0, rank=0, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match=r"has 3 shards.*2 x 2 = 4") as err:
        data.batches_per_epoch(spec)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="3 shards"):
        data.loader(spec, 0)


def test_val_split_reads_val_root(tmp_path: Path) -> None:
    write_shards(tmp_path / "train", [4, 4])
    write_shards(tmp_path / "val", [3, 3], prefix="val")
    data = build(str(tmp_path / "train"), train=False, val_root=str(tmp_path / "val"), resampled=True)
    assert not data.resampled and data.num_samples == 6  # held-out data is always read once per epoch
    with pytest.raises(ValueError, match="data.val_root is empty"):
        build(str(tmp_path / "train"), train=False)


# ----------------------------------------------------------------------------- balance

def plan_for(samples: int, batch: int, workers: int) -> EpochPlan:
    sizes = [batch] * (samples // batch) + ([samples % batch] if samples % batch else [])
    return EpochPlan.round_robin([sizes[w::workers] for w in range(workers)])


@pytest.mark.parametrize("trial", range(40))
def test_guaranteed_rank_samples_holds_for_every_epochs_deal(trial: int) -> None:
    rng = random.Random(trial)
    world, workers, batch = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 5)
    sizes = [rng.randint(1, 12) for _ in range(rng.randint(world * workers, 3 * world * workers + 2))]
    if trial % 2:  # data_prep's layout: equal shards and a short last one
        sizes = [12] * (len(sizes) - 1) + [sizes[-1]]
    samples = guaranteed_rank_samples(sizes, world, workers, batch)
    plan, slots = plan_for(samples, batch, workers), world * workers
    for epoch in range(20):
        order = deal_order(sizes, seed=trial, epoch=epoch)
        for rank in range(world):
            for w in range(workers):
                assert sum(plan.worker_share(w, 0)[1]) <= sum(sizes[i] for i in order[rank + world * w::slots])
    # And it is the largest such count: one more sample overfills some slot in its worst epoch.
    bigger, bounds = plan_for(samples + 1, batch, workers), slot_sample_bounds(sizes, slots)
    assert any(sum(bigger.worker_share(w, 0)[1]) > bounds[rank + world * w]
               for rank in range(world) for w in range(workers))


def test_a_short_last_shard_costs_only_its_shortfall() -> None:
    # 4 workers, 8 shards of 10 and one of 2: each worker surely has two full shards.
    assert guaranteed_rank_samples([10] * 8 + [2], world_size=1, workers=4, batch_size=1) == 81
    # 20 full batches of 4, then batch 20 (worker 0's sixth) can hold its 2 extra samples.
    assert guaranteed_rank_samples([10] * 8 + [2], world_size=1, workers=4, batch_size=4) == 82


def test_ranks_get_equal_disjoint_epochs_from_uneven_shards(tmp_path: Path) -> None:
    write_shards(tmp_path, [3, 20, 7, 12, 9, 15, 4, 11])
    data = build(str(tmp_path))
    for workers in (0, 2):
        specs = [LoaderSpec(batch_size=3, seed=5, rank=r, world_size=2, num_workers=workers) for r in (0, 1)]
        n_batches = data.batches_per_epoch(specs[0])
        assert n_batches == data.batches_per_epoch(specs[1]) > 0
        for epoch in (0, 1):
            seen = [labels_of(collect(data, spec, epoch)) for spec in specs]
            for labels in seen:
                assert len(labels) == 3 * n_batches
                assert len(set(labels)) == len(labels)  # no sample twice: nothing was re-read
            assert not set(seen[0]) & set(seen[1])


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_drop_last_false_yields_every_sample_once_and_resumes(tmp_path: Path, world: int) -> None:
    write_shards(tmp_path, [12, 1, 1, 1, 1, 1])  # one worker has far more batches than the others
    data = build(str(tmp_path))
    seen: List[int] = []
    for rank in range(world):
        spec = LoaderSpec(batch_size=4, seed=0, rank=rank, world_size=world, num_workers=2, drop_last=False)
        plan = data.plan(spec, epoch=1)
        if rank == 0:  # holds the big shard: the DataLoader must skip a finished worker
            assert len({plan.order.count(w) for w in range(2)}) == 2
        full = collect(data, spec, 1)
        assert [len(y) for _, y in full] == list(plan.sizes)
        seen += labels_of(full)
        for start in range(1, len(full)):
            assert_same(collect(data, spec, 1, start), full[start:])
    assert sorted(seen) == list(range(17))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_resume_after_a_middle_worker_finished(tmp_path: Path) -> None:
    # Three workers, the middle one done first: only then does the round robin after a
    # resume depend on which worker builds the next batch, not just on start_batch % 3.
    write_shards(tmp_path, [6, 2, 5])
    data = build(str(tmp_path), shuffle_buffer=0)
    spec = LoaderSpec(batch_size=2, seed=0, num_workers=3, drop_last=False)
    epoch = next(e for e in range(20) if data.plan(spec, e).order == (0, 1, 2, 0, 2, 0, 2))
    full = collect(data, spec, epoch)
    for start in (4, 5):
        assert_same(collect(data, spec, epoch, start), full[start:])


def test_round_robin_plan_matches_the_dataloader_with_uneven_workers() -> None:
    plan = EpochPlan.round_robin([[4, 4, 1], [4], [4, 2]])
    assert plan.order == (0, 1, 2, 0, 2, 0) and plan.sizes == (4, 4, 4, 4, 2, 1)
    assert plan.worker_share(0, 4) == (8, [1]) and plan.next_worker(4) == 2


# ----------------------------------------------------------------------------- determinism and resume

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest_of_the_epoch(tmp_path: Path, workers: int) -> None:
    write_shards(tmp_path, [10, 9, 11, 8])
    data = build(str(tmp_path))
    spec = LoaderSpec(batch_size=4, seed=3, num_workers=workers)
    full = collect(data, spec, epoch=2)
    # One reader: all 38 samples; two: each worker is sure of only its 2 smallest shards (17).
    assert len(full) == data.batches_per_epoch(spec) == {0: 9, 2: 8}[workers]
    for start in (1, 3, 6, len(full)):
        assert_same(collect(data, spec, 2, start), full[start:])
    with pytest.raises(ValueError, match="outside epoch"):
        data.loader(spec, 2, start_batch=len(full) + 1)


def test_one_worker_process_matches_loading_in_the_main_process(tmp_path: Path) -> None:
    write_shards(tmp_path, [6, 7])
    data = build(str(tmp_path))
    assert_same(collect(data, LoaderSpec(batch_size=4, seed=0, num_workers=1), 0),
                collect(data, LoaderSpec(batch_size=4, seed=0, num_workers=0), 0))


def test_order_and_augmentation_change_with_the_epoch_and_seed(tmp_path: Path) -> None:
    write_shards(tmp_path, [12, 12])
    data = build(str(tmp_path))
    spec = LoaderSpec(batch_size=4, seed=0)
    e0, e1 = collect(data, spec, 0), collect(data, spec, 1)
    other_seed = collect(data, LoaderSpec(batch_size=4, seed=1), 0)
    assert labels_of(e0) != labels_of(e1) and labels_of(e0) != labels_of(other_seed)
    assert sorted(labels_of(e0)) == sorted(labels_of(e1)) == list(range(24))
    images = [{int(y): x for xs, ys in run for x, y in zip(xs, ys)} for run in (e0, e1)]
    assert not any(torch.equal(images[0][k], images[1][k]) for k in images[0])  # fresh crops each epoch


def test_shards_are_reshuffled_across_ranks_each_epoch(tmp_path: Path) -> None:
    write_shards(tmp_path, [5, 5, 5, 5])
    data = build(str(tmp_path), shuffle_buffer=0)
    spec = LoaderSpec(batch_size=5, seed=0, rank=0, world_size=2)
    shards_per_epoch = {frozenset(y // 5 for y in labels_of(collect(data, spec, e))) for e in range(6)}
    assert len(shards_per_epoch) > 1


def test_crops_change_with_the_epoch_even_when_the_order_does_not(tmp_path: Path) -> None:
    write_shards(tmp_path, [8])  # one shard and no buffer: the same order every epoch
    data = build(str(tmp_path), shuffle_buffer=0)
    spec = LoaderSpec(batch_size=4, seed=0)
    e0, e1 = collect(data, spec, 0), collect(data, spec, 1)
    assert labels_of(e0) == labels_of(e1)
    assert not any(torch.equal(a, b) for (xa, _), (xb, _) in zip(e0, e1) for a, b in zip(xa, xb))


def test_resampled_epochs_have_a_fixed_length_and_resume(tmp_path: Path) -> None:
    write_shards(tmp_path, [6, 6, 6])
    data = build(str(tmp_path), resampled=True)
    spec = LoaderSpec(batch_size=4, seed=0, num_workers=2)
    assert data.num_samples == 18 and data.batches_per_epoch(spec) == 4
    full = collect(data, spec, 1)
    assert len(full) == 4
    assert_same(collect(data, spec, 1, 3), full[3:])
    assert labels_of(collect(data, spec, 2)) != labels_of(full)
    (tmp_path / "manifest.json").unlink()
    pattern = str(tmp_path / "train-{000000..000002}.tar")
    assert build(pattern, resampled=True, num_samples=40).batches_per_epoch(LoaderSpec(batch_size=4, seed=0)) == 10


def test_transform_none_resizes_without_augmenting(tmp_path: Path) -> None:
    write_shards(tmp_path, [6, 6])
    data = build(str(tmp_path), transform="none")
    spec = LoaderSpec(batch_size=3, seed=0)
    runs = [{int(y): x for xs, ys in collect(data, spec, e) for x, y in zip(xs, ys)} for e in (0, 1)]
    assert all(x.shape == (3, IMG, IMG) for x in runs[0].values())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_decoding_runs_in_the_workers(tmp_path: Path) -> None:
    write_shards(tmp_path, [4, 4])
    data = build(str(tmp_path))
    data.items.transform = lambda image, seed: torch.full((1,), float(os.getpid()))
    pids = {int(x) for xs, _ in collect(data, LoaderSpec(batch_size=2, seed=0, num_workers=2), 0) for x in xs}
    assert len(pids) == 2 and os.getpid() not in pids


def test_pin_memory_follows_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shards(tmp_path, [4])
    data = build(str(tmp_path))
    seen: List[bool] = []
    real = wds_stream.DataLoader

    def recording(*args, **kwargs):  # pinning itself needs an accelerator, so check what is asked
        seen.append(kwargs["pin_memory"])
        return real(*args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(wds_stream, "DataLoader", recording)
    for pin in (True, False):
        collect(data, LoaderSpec(batch_size=2, seed=0, pin_memory=pin), 0)
    assert seen == [True, False]


# ----------------------------------------------------------------------------- corrupt data

def test_corrupt_samples_are_replaced_counted_and_resumable(tmp_path: Path) -> None:
    broken = {3: "garbage", 12: "truncated", 21: "no_cls"}
    write_shards(tmp_path, [8, 8, 8, 8], broken=broken)  # 32 samples, every one read in an epoch
    data = build(str(tmp_path))
    spec = LoaderSpec(batch_size=4, seed=0, num_workers=2)
    full = collect(data, spec, 0)
    assert len(full) == data.batches_per_epoch(spec) == 8
    assert all(len(y) == 4 for _, y in full)
    labels = labels_of(full)
    assert not set(broken) & set(labels) and set(labels) == set(range(32)) - set(broken)
    assert data.skipped_samples() == 3  # counted in the workers, summed in the main process
    assert_same(collect(data, spec, 0, 5), full[5:])


def test_corrupt_samples_log_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, [4, 4], broken={1: "garbage"})
    data = build(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="scale.data.wds_stream"):
        batches = collect(data, LoaderSpec(batch_size=4, seed=0), 0)
    assert len(batches) == 2 and data.skipped_samples() == 1
    assert "skipping corrupt sample" in caplog.text and "train-000000-000001" in caplog.text


def test_truncated_shard_is_topped_up_instead_of_ending_the_epoch_early(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, [8, 8])
    paths[1].write_bytes(paths[1].read_bytes()[:5000])  # the manifest still promises 8 samples
    data = build(str(tmp_path), shuffle_buffer=0)
    spec = LoaderSpec(batch_size=4, seed=0)
    batches = collect(data, spec, 0)
    assert len(batches) == data.batches_per_epoch(spec) == 4 and all(len(y) == 4 for _, y in batches)
    assert_same(collect(data, spec, 0, 3), batches[3:])


def test_corrupt_sample_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    warn = RateLimitedWarning("skipping corrupt sample", wds_stream.log, first=5, every=1000)
    with caplog.at_level(logging.WARNING, logger="scale.data.wds_stream"):
        for i in range(2500):
            warn(f"sample {i}")
    assert len(caplog.records) == 5 + 2 and warn.count == 2500
