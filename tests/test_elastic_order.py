"""Runs that do not depend on their allocation (issue 27, points 1 and 3): global batch k holds the
same samples, images and masks on any world size and worker count, and data.record_samples shows
every sample of an epoch used exactly once across resumes on other world sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import REPO, TINY_OVERRIDES
from test_distributed import check, clean_env
from test_mae import MAE_TINY
from test_webdataset_loader import write_shards
from scale.config import ConfigError, DataConfig, MaskConfig
from scale.data import LoaderSpec, build_dataset
from scale.data.base import epoch_permutation
from scale.errors import UserError
from scale.masking import MaskContext, build_mask_generator, step_generator
from scale.trainer.sample_record import SampleRecord, record_path

GLOBAL_BATCH = 12  # splits over 1, 2, 3 and 4 ranks


def global_batches(data, world_size: int, epoch: int, workers: int = 0, start: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Each global batch of the epoch, put together from every rank's loader in rank order."""
    per_rank = [list(data.loader(LoaderSpec(batch_size=GLOBAL_BATCH // world_size, seed=7, rank=rank,
                                            world_size=world_size, num_workers=workers), epoch, start))
                for rank in range(world_size)]
    return [{"images": torch.cat([b[0] for b in ranks]), "labels": torch.cat([b[1] for b in ranks]),
             "samples": torch.cat([b[2] for b in ranks])} for ranks in zip(*per_rank)]


def test_global_batch_k_is_the_same_on_any_world_size_and_worker_count():
    data = build_dataset(DataConfig(num_samples=100, num_classes=4, mean=(0.5,), std=(0.25,)), 28, 1)
    one = global_batches(data, 1, epoch=1)
    assert len(one) == 100 // GLOBAL_BATCH  # the 4 samples past the last whole global batch sit out
    perm = epoch_permutation(100, 7, 1)
    for k, batch in enumerate(one):  # world size 1 is the plain order: perm[k*G:(k+1)*G]
        assert batch["samples"].tolist() == perm[k * GLOBAL_BATCH:(k + 1) * GLOBAL_BATCH].tolist()
    for world_size, workers in ((2, 0), (3, 0), (4, 0), (2, 2)):
        other = global_batches(data, world_size, epoch=1, workers=workers)
        assert len(other) == len(one), world_size
        for k, (a, b) in enumerate(zip(one, other)):
            assert torch.equal(a["samples"], b["samples"]), (world_size, workers, k)
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"]), (world_size, k)


def test_a_resume_at_batch_k_on_another_world_size_yields_the_rest_of_the_epoch():
    data = build_dataset(DataConfig(num_samples=96, num_classes=4, mean=(0.5,), std=(0.25,)), 28, 1)
    whole = global_batches(data, 2, epoch=0)
    for world_size, start in ((1, 3), (3, 5), (4, 8)):
        resumed = global_batches(data, world_size, epoch=0, start=start)
        assert len(resumed) == len(whole) - start
        for a, b in zip(whole[start:], resumed):
            assert torch.equal(a["samples"], b["samples"]) and torch.equal(a["images"], b["images"])
    used = torch.cat([b["samples"] for b in whole[:3]] + [b["samples"] for b in global_batches(data, 3, 0, start=3)])
    assert sorted(used.tolist()) == list(range(96))  # every sample of the epoch once


def test_a_rank_takes_its_slices_of_the_epoch_as_one_tensor_in_the_list_built_order():
    """rank_samples slices the epoch's order as tensors (a rank holds its share, not Python lists of the
    epoch; the seeds are computed per sample in the worker) and gives what the list-built loader did,
    the remainder of a run without drop_last and a resume included."""
    data = build_dataset(DataConfig(num_samples=101, num_classes=4, mean=(0.5,), std=(0.25,)), 28, 1)

    def listed(spec, start):  # the loader's former list-built order, as reference
        perm = epoch_permutation(101, spec.seed, 2).tolist()
        usable, step = 101 // spec.world_size * spec.world_size, spec.batch_size * spec.world_size
        batches = []
        for first in range(0, data.batches_per_epoch(spec) * step, step):
            batch = perm[first:min(first + step, usable)]
            share = len(batch) // spec.world_size
            batches.append(batch[spec.rank * share:(spec.rank + 1) * share])
        return batches[start:]

    for world_size, drop_last in ((1, True), (4, True), (4, False), (3, False)):
        spec_batches = data.batches_per_epoch(LoaderSpec(batch_size=GLOBAL_BATCH // world_size, seed=7,
                                                         world_size=world_size, drop_last=drop_last))
        for rank in range(world_size):
            spec = LoaderSpec(batch_size=GLOBAL_BATCH // world_size, seed=7, rank=rank, world_size=world_size,
                              drop_last=drop_last)
            for start in (0, 3, spec_batches - 1, spec_batches):
                samples, sizes = data.rank_samples(spec, 2, start)
                assert isinstance(samples, torch.Tensor) and samples.dtype == torch.int64
                expected = listed(spec, start)
                assert sizes == [len(batch) for batch in expected], (world_size, drop_last, rank, start)
                assert samples.tolist() == [i for batch in expected for i in batch], (world_size, rank, start)


def fake_attention(images: torch.Tensor) -> torch.Tensor:
    """A deterministic per-image (B, 1 + N, 1 + N) attention for EHM, from per-image scores."""
    return images.softmax(dim=-1)


@pytest.mark.parametrize("name", ["random", "random_two_group", "grid", "ehm", "ehm_two_group", "ehm_drop_two_group"])
def test_a_ranks_masks_are_its_rows_of_the_global_batchs_masks(name):
    grid, batch = 4, GLOBAL_BATCH
    cfg = MaskConfig(name=name, ratio=0.5).switched(name)
    if name.startswith("ehm"):
        cfg.ehm.depth, cfg.ehm.fixed_depth, cfg.ehm.signal_batch = "fixed", 0.5, 5
    generator = build_mask_generator(cfg, grid)
    scores = torch.randn(batch, 1 + grid * grid, 1 + grid * grid, generator=torch.Generator().manual_seed(0))

    def draw(rows: slice, global_batch=None):
        images = scores[rows]
        context = MaskContext(step_generator(3, 5, 0, torch.device("cpu")), torch.device("cpu"), step=5,
                              images=images, model_signal=fake_attention, global_batch=global_batch, rows=rows)
        return generator(len(images), context)

    whole = draw(slice(0, batch))
    for world_size in (2, 3, 4):
        per_rank = batch // world_size
        for rank in range(world_size):
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            masks = draw(rows, batch)
            assert torch.equal(masks.group_ids, whole.group_ids[rows]), (world_size, rank)
            if whole.masked_ids is not None:
                assert torch.equal(masks.masked_ids, whole.masked_ids[rows]), (world_size, rank)


def test_rows_that_are_not_the_batch_are_a_bug_not_silent_masks():
    generator = build_mask_generator(MaskConfig(name="random", ratio=0.5), 4)
    context = MaskContext(torch.Generator().manual_seed(0), torch.device("cpu"), global_batch=8, rows=slice(0, 4))
    with pytest.raises(ValueError, match="not the 3"):
        generator(3, context)


# ----------------------------------------------------------------------------- data.record_samples

def test_record_samples_refuses_a_stream_that_cannot_name_its_samples(tmp_path):
    paths = write_shards(tmp_path / "shards", [6, 6])
    stream = build_dataset(DataConfig(name="webdataset", root=f"pipe:cat {tmp_path}/shards/train-{{000000..000001}}.tar",
                                      manifest=str(tmp_path / "shards" / "manifest.json"), num_workers=0,
                                      mean=(0.5,) * 3, std=(0.25,) * 3), 16, 3)
    assert len(paths) == 2 and not stream.names_samples
    assert all((s == -1).all() for _, _, s in stream.loader(LoaderSpec(batch_size=4, seed=0), 0))
    with pytest.raises(ConfigError, match=r"^data.record_samples: data.name=webdataset .*data.record_samples=false"):
        SampleRecord.for_run(stream, "webdataset", tmp_path, 0)
    synthetic = build_dataset(DataConfig(num_samples=16, num_classes=2, mean=(0.5,), std=(0.25,)), 28, 1)
    assert SampleRecord.for_run(synthetic, "synthetic", tmp_path, 0).path == record_path(tmp_path, 0)


def test_a_resume_forgets_the_recorded_steps_after_its_checkpoint(tmp_path):
    for rank, steps in ((0, range(1, 6)), (1, range(1, 6)), (2, range(1, 3))):  # rank 2: a larger allocation before
        record_path(tmp_path, rank).parent.mkdir(parents=True, exist_ok=True)
        record_path(tmp_path, rank).write_text("".join(json.dumps({"step": s, "epoch": 0, "batch": s - 1,
                                                                   "samples": [rank, s]}) + "\n" for s in steps)
                                               + ('{"step": 6, "epo' if rank == 0 else ""))  # a write cut by a kill
    barriers = []
    record = SampleRecord(tmp_path, 1)
    record.start(3, is_main=True, barrier=lambda: barriers.append(1))
    record.write(4, 0, 3, torch.tensor([7, 8]))
    record.close()
    steps = {rank: [json.loads(line)["step"] for line in record_path(tmp_path, rank).read_text().splitlines()]
             for rank in (0, 1, 2)}
    assert steps == {0: [1, 2, 3], 1: [1, 2, 3, 4], 2: [1, 2]} and barriers == [1]
    assert json.loads(record_path(tmp_path, 1).read_text().splitlines()[-1])["samples"] == [7, 8]
    record_path(tmp_path, 0).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"rank_0.jsonl line 2 is not a line of the sample record \(data.record_samples\)"):
        SampleRecord(tmp_path, 0).start(1, is_main=True, barrier=lambda: None)


# ----------------------------------------------------------------------------- whole runs on several world sizes

def launch(world_size: int, out: Path, *overrides: str) -> None:
    """scale.train on `world_size` gloo ranks (torchrun; one plain process for 1) into `out`."""
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
                if world_size > 1 else [])
    cmd = [sys.executable, *launcher, "-m", "scale.train", *TINY_OVERRIDES, "data.record_samples=true",
           "train.ckpt_every=1000", f"train.output_dir={out}", *overrides]
    check(subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600))


def recorded_steps(out: Path) -> Dict[int, List[dict]]:
    """step -> every rank's line of it, in rank order."""
    steps: Dict[int, List[dict]] = {}
    for path in sorted((out / "samples").glob("rank_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).append(record)
    return steps


def global_batch_of(lines: List[dict]) -> List[int]:
    return [i for line in lines for i in line["samples"]]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", [(), pytest.param(MAE_TINY, marks=pytest.mark.long)], ids=["ocl", "mae"])
def test_four_and_two_ranks_train_on_the_same_global_batches_to_the_same_losses(tmp_path, method):
    runs = {}
    for world_size in (4, 2):
        out = tmp_path / f"ranks_{world_size}"
        launch(world_size, out, *method, "train.global_batch=16", "train.max_steps=10")  # drop path is off (0.0)
        runs[world_size] = (recorded_steps(out), [json.loads(line)["loss"] for line in
                                                  (out / "metrics.jsonl").read_text().splitlines()])
    (four, four_losses), (two, two_losses) = runs[4], runs[2]
    assert sorted(four) == sorted(two) == list(range(1, 11))
    for step in four:
        assert len(four[step]) == 4 and len(two[step]) == 2
        assert global_batch_of(four[step]) == global_batch_of(two[step]), step  # the same samples, the same rows
        assert len(set(global_batch_of(four[step]))) == 16
    assert len(four_losses) == len(two_losses) == 10
    for step, (a, b) in enumerate(zip(four_losses, two_losses), 1):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_epoch_resumed_on_4_then_2_then_3_ranks_uses_every_sample_exactly_once(tmp_path):
    out = tmp_path / "run"
    common = ("data.num_samples=96", "train.epochs=1", "train.global_batch=12")  # 8 global batches
    launch(4, out, *common, "train.max_steps=3")
    launch(2, out, *common, "train.max_steps=5", "train.resume=auto")
    # A step recorded after the last checkpoint (what a kill between the two leaves): the resume forgets it.
    (out / "samples" / "rank_0.jsonl").open("a").write(json.dumps({"step": 6, "epoch": 0, "batch": 5,
                                                                    "samples": [0]}) + "\n")
    launch(3, out, *common, "train.resume=auto")
    steps = recorded_steps(out)
    assert sorted(steps) == list(range(1, 9))
    assert [len(steps[s]) for s in range(1, 9)] == [4, 4, 4, 2, 2, 3, 3, 3]  # each step split over its run's ranks
    assert [line["batch"] for s in range(1, 9) for line in steps[s][:1]] == list(range(8))
    used = [i for s in range(1, 9) for i in global_batch_of(steps[s])]
    assert sorted(used) == list(range(96))  # every sample of the epoch, none twice
    assert used == epoch_permutation(96, 0, 0).tolist()  # in the order of one uninterrupted run
