"""Indexed WebDataset shards: the converter's member-offset index, `scale-verify-shards --index` for shards
written elsewhere, and the map-style reader whose global batches do not depend on ranks or workers."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path
from unittest import mock
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import webdataset as wds

from scale.config import DataConfig
from scale.data import LoaderSpec, PretrainData, build_dataset
from scale.data.base import sample_seed
from scale.data.gpu_decode import EncodedBatch
from scale.data.indexed_shards import IndexedShardData
from scale.data.wds_stream import WebDatasetData
from scale.errors import UserError, one_line
from scale.shards import verify
from scale.shards.shard_index import index_path, load_index, span_members
from test_data_prep import convert, make_class_tree
from test_webdataset_loader import jpeg_bytes, write_shards

IMG = 16
SIZES = (8, 8, 8, 8, 8, 6)  # 46 samples, a short last shard


def build(root: Path, **overrides) -> PretrainData:
    fields = dict(name="webdataset", root=str(root), num_workers=0, shuffle_buffer=8)
    fields.update(overrides)
    return build_dataset(DataConfig(**fields), IMG, 3, True)


def indexed_shards(directory: Path, sizes=SIZES, **broken) -> Path:
    """`write_shards`' tiny JPEG shards (label = running sample number), indexed by scale-verify-shards."""
    write_shards(directory, sizes, **broken)
    assert verify.main([str(directory), "--index", "--workers", "1"]) == 0
    return directory


def streamed_samples(paths: List[Path]) -> List[Dict[str, bytes]]:
    """Every sample of the shards, in order, as webdataset's own tar reader groups them."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples())
    return [{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"} for sample in pipeline]


def indexed_samples(data: IndexedShardData) -> List[Dict[str, bytes]]:
    return [{k: v for k, v in data.source[i].items() if k != "__url__"} for i in range(len(data.source))]


def global_batches(data: PretrainData, world: int, workers: int, global_batch: int, start: int = 0,
                   epoch: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, sample indices) of each global batch from `start` on: every rank's rows, stacked."""
    per_rank = [list(data.loader(LoaderSpec(batch_size=global_batch // world, seed=3, rank=rank, world_size=world,
                                            num_workers=workers), epoch, start))
                for rank in range(world)]
    return [(torch.cat([batch[0] for batch in ranks]), torch.cat([batch[2] for batch in ranks]))
            for ranks in zip(*per_rank)]


# ----------------------------------------------------------------------------- writing and building the index

def test_the_converter_writes_an_index_and_indexed_reads_give_the_streamed_samples(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert("--src", make_class_tree(tmp_path / "src"), "--out", out, "--shard-size", "5") == 0
    shards = sorted(out.glob("*.tar"))
    assert all(index_path(shard).is_file() for shard in shards)
    data = build(out)
    assert isinstance(data, IndexedShardData) and data.num_samples == 21
    assert indexed_samples(data) == streamed_samples(shards)
    assert verify.main([str(out), "--workers", "1"]) == 0  # the verifier checks the index against the tar


@pytest.mark.parametrize("writer", ["webdataset", "tarfile"])
def test_verify_index_indexes_shards_written_by_other_tools(tmp_path: Path, writer: str) -> None:
    paths = []
    for s in range(3):
        paths.append(tmp_path / f"part-{s}.tar")
        samples = [{"__key__": f"s{s}/{'k' * 120}{i}", "jpg": jpeg_bytes(10 * s + i), "cls": b"%d" % i} for i in range(4)]
        if writer == "webdataset":
            with wds.TarWriter(str(paths[-1])) as sink:
                for sample in samples:
                    sink.write(sample)
        else:  # plain tar with a directory member and pax long names (keys over 100 bytes)
            with tarfile.open(paths[-1], "w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_directory(f"s{s}"))
                for sample in samples:
                    for ext in ("cls", "jpg"):
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size = len(sample[ext])
                        tar.addfile(info, io.BytesIO(sample[ext]))
    assert not index_path(paths[0]).exists()
    assert isinstance(build(tmp_path / "part-{0..2}.tar"), WebDatasetData)  # no index yet: streamed
    assert verify.main([str(tmp_path), "--index", "--workers", "1"]) == 0
    data = build(tmp_path / "part-{0..2}.tar")  # a brace pattern without a manifest: counts come from the index
    assert isinstance(data, IndexedShardData) and data.num_samples == 12
    assert indexed_samples(data) == streamed_samples(paths)


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_verify_names_a_stale_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert convert("--src", make_class_tree(tmp_path / "src"), "--out", out, "--shard-size", "5") == 0
    index = json.loads(index_path(out / "train-000001.tar").read_text())
    index["keys"][0] = "someone-else"
    index_path(out / "train-000001.tar").write_text(json.dumps(index))
    assert verify.main([str(out), "--workers", "1"]) == 1
    assert "train-000001.tar.idx.json lists other samples than the shard holds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- order: independent of the allocation

def test_global_batch_k_is_the_same_for_any_world_size_and_workers(tmp_path: Path) -> None:
    data = build(indexed_shards(tmp_path / "shards"))
    assert isinstance(data, IndexedShardData) and data.elastic
    reference = global_batches(data, world=1, workers=0, global_batch=8)
    assert len(reference) == 46 // 8
    for world, workers in ((2, 0), (2, 2), (4, 1)):
        batches = global_batches(data, world, workers, global_batch=8)
        assert len(batches) == len(reference)
        for (images, indices), (want_images, want_indices) in zip(batches, reference):
            assert torch.equal(indices, want_indices) and torch.equal(images, want_images), (world, workers)
    # Labels are the running sample number: index i is sample i of the shard set.
    seen = torch.cat([indices for _, indices in reference])
    assert len(set(seen.tolist())) == len(seen) == 40


def test_resume_mid_epoch_on_another_world_size_gives_the_rest_exactly_once(tmp_path: Path) -> None:
    data = build(indexed_shards(tmp_path / "shards"))
    uninterrupted = global_batches(data, world=4, workers=0, global_batch=8)
    first = global_batches(data, world=4, workers=0, global_batch=8)[:2]
    rest = global_batches(data, world=2, workers=1, global_batch=8, start=2)
    resumed = first + rest
    assert [i.tolist() for _, i in resumed] == [i.tolist() for _, i in uninterrupted]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, uninterrupted))  # same crops: per-sample seeds
    used = [i for _, indices in resumed for i in indices.tolist()]
    assert len(used) == len(set(used)) == 40


def test_the_order_keeps_reads_local_and_changes_with_the_epoch(tmp_path: Path) -> None:
    data = build(indexed_shards(tmp_path / "shards"), shuffle_buffer=4)
    assert isinstance(data, IndexedShardData)
    order = data.epoch_order(3, 0).tolist()
    assert sorted(order) == list(range(46))
    # Windows of 4 samples of the shards laid end to end (in a permuted order), shuffled: one or two shards each.
    windows = [order[start:start + 4] for start in range(0, 46, 4)]
    assert all(len({i // 8 for i in window}) <= 2 for window in windows), windows
    assert any(window != sorted(window) for window in windows)
    assert order != data.epoch_order(3, 1).tolist() and order != data.epoch_order(4, 0).tolist()
    unshuffled = build(tmp_path / "shards", shuffle_buffer=0).epoch_order(3, 0).tolist()
    assert sorted(unshuffled) == list(range(46)) and unshuffled != order
    assert all(b == a + 1 for a, b in zip(unshuffled, unshuffled[1:]) if a // 8 == b // 8)  # shards read in order
    assert unshuffled != sorted(unshuffled)  # but the shards are permuted


def test_a_corrupt_sample_is_replaced_and_counted(tmp_path: Path) -> None:
    data = build(indexed_shards(tmp_path / "shards", broken={5: "garbage", 17: "no_cls"}))
    batches = list(data.loader(LoaderSpec(batch_size=8, seed=0), 0))
    assert data.skipped_samples() == sum(int(((i == 5) | (i == 17)).sum()) for _, _, i in batches) >= 1
    for _, labels, indices in batches:
        assert (labels[(indices != 5) & (indices != 17)] == indices[(indices != 5) & (indices != 17)]).all()


# ----------------------------------------------------------------------------- a hostile index

def _hostile(change: Callable[[dict, int], None]) -> Callable[[Path], None]:
    def apply(shard: Path) -> None:
        index = json.loads(index_path(shard).read_text())
        change(index, shard.stat().st_size)
        index_path(shard).write_text(json.dumps(index))
    return apply


HOSTILE = {
    "offset past the end": (_hostile(lambda ix, n: ix["offsets"].__setitem__(-1, n + 512)), "end outside the shard"),
    "negative offset": (_hostile(lambda ix, n: ix["offsets"].__setitem__(0, -512)), "must be a multiple of 512"),
    "offset off a block": (_hostile(lambda ix, n: ix["offsets"].__setitem__(1, ix["offsets"][1] + 3)), "multiple of 512"),
    "overlapping spans": (_hostile(lambda ix, n: ix["offsets"].__setitem__(2, ix["offsets"][1])), "after the end of"),
    "string offset": (_hostile(lambda ix, n: ix["offsets"].__setitem__(0, "0")), "integers"),
    "boolean size": (_hostile(lambda ix, n: ix["sizes"].__setitem__(0, True)), "integers"),
    "members outside the tar": (_hostile(lambda ix, n: ix["sizes"].__setitem__(-1, n)), "end outside the shard"),
    "lists of two lengths": (_hostile(lambda ix, n: ix["sizes"].pop()), "lists of one length"),
    "another shard's size": (_hostile(lambda ix, n: ix.__setitem__("shard_bytes", n - 10240)), "stale"),
    "another format": (_hostile(lambda ix, n: ix.__setitem__("format", "pickle")), "not a scale-wds-index-v1"),
    "not json": (lambda shard: index_path(shard).write_bytes(b"\x80\x04K\x01."), "unreadable index"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_index_is_a_one_line_user_error(tmp_path: Path, case: str) -> None:
    root = indexed_shards(tmp_path / "shards")
    spoil, says = HOSTILE[case]
    spoil(root / "train-000002.tar")
    with pytest.raises(UserError) as caught:
        build(root)
    message = str(caught.value)
    assert one_line(caught.value) == message and "\n" not in message
    assert says in message and "train-000002.tar.idx.json" in message and "scale-verify-shards --index" in message


def test_an_index_whose_count_the_manifest_does_not_have_is_refused(tmp_path: Path) -> None:
    root = indexed_shards(tmp_path / "shards")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 7
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"index .*train-000000.tar.idx.json lists 8 samples, manifest .* says 7"):
        build(root)


def test_a_tar_member_running_past_its_span_is_a_replaced_sample(tmp_path: Path) -> None:
    """The index fits the file but the tar header inside a span claims more bytes than the span holds."""
    root = indexed_shards(tmp_path / "shards", sizes=(8, 8))
    shard = root / "train-000000.tar"
    index, _ = load_index(shard)
    raw = bytearray(shard.read_bytes())
    header = tarfile.TarInfo.frombuf(bytes(raw[index.offsets[3]:index.offsets[3] + 512]), "utf-8", "strict")
    header.size = 10 * len(raw)
    raw[index.offsets[3]:index.offsets[3] + 512] = header.tobuf(tarfile.USTAR_FORMAT)
    shard.write_bytes(bytes(raw))
    data = build(root)
    batches = list(data.loader(LoaderSpec(batch_size=16, seed=0), 0))
    assert data.skipped_samples() == 1 and len(batches[0][0]) == 16


# ----------------------------------------------------------------------------- which path a split takes

def test_a_streamed_split_is_not_elastic_and_an_indexed_one_is(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path / "plain", SIZES)
    streamed = build(tmp_path / "plain")
    assert isinstance(streamed, WebDatasetData) and streamed.elastic is False
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("read as a stream" in m and f"scale-verify-shards --index {tmp_path / 'plain'}" in m for m in warned)
    piped = build(f"pipe:cat {tmp_path / 'plain'}/train-{{000000..000005}}.tar", manifest=str(tmp_path / "plain/manifest.json"))
    assert isinstance(piped, WebDatasetData) and piped.elastic is False
    assert build(indexed_shards(tmp_path / "indexed")).elastic is True
    assert build(tmp_path / "indexed", resampled=True).elastic is False  # resampled streams stay streams


# ----------------------------------------------------------------------------- data.decode: gpu over indexed shards

CPU = torch.device("cpu")


def encoded_rows(batch: EncodedBatch) -> List[Tuple[bytes, List[int], List[int], int]]:
    """Each row of an encoded batch as the device gets it: (JPEG bytes, crop, original size, seed)."""
    return [(batch.jpeg(row), batch.crops[row].tolist(), batch.sizes[row].tolist(), int(batch.seeds[row]))
            for row in range(len(batch))]


def encoded_global_batches(data: PretrainData, world: int, workers: int, global_batch: int,
                           epoch: int = 0) -> List[Tuple[list, torch.Tensor, torch.Tensor]]:
    """(encoded rows, pixels decoded on the CPU, sample indices) of each global batch: every rank's rows."""
    per_rank = [list(data.loader(LoaderSpec(batch_size=global_batch // world, seed=3, rank=rank, world_size=world,
                                            num_workers=workers), epoch))
                for rank in range(world)]
    batches = []
    for ranks in zip(*per_rank):
        assert all(isinstance(images, EncodedBatch) for images, _, _ in ranks)
        batches.append(([row for images, _, _ in ranks for row in encoded_rows(images)],
                        torch.cat([images.decode(CPU)[0] for images, _, _ in ranks]),
                        torch.cat([indices for _, _, indices in ranks])))
    return batches


def test_decode_gpu_reads_indexed_shards_by_sample_in_the_elastic_order(tmp_path: Path) -> None:
    data = build(indexed_shards(tmp_path / "shards"), decode="gpu")
    assert isinstance(data, IndexedShardData) and data.elastic
    reference = encoded_global_batches(data, world=1, workers=0, global_batch=8, epoch=1)
    assert len(reference) == 46 // 8
    for world, workers in ((2, 0), (2, 2)):
        batches = encoded_global_batches(data, world, workers, global_batch=8, epoch=1)
        assert len(batches) == len(reference)
        for (rows, pixels, indices), (want_rows, want_pixels, want_indices) in zip(batches, reference):
            assert torch.equal(indices, want_indices) and rows == want_rows, (world, workers)
            assert torch.equal(pixels, want_pixels), (world, workers)
    # Global batch k is MapStyleData's slice of the epoch order, each crop drawn from its sample's own seed.
    order = data.epoch_order(3, 1)
    transform = data.items.transform
    for k, (rows, _, indices) in enumerate(reference):
        assert torch.equal(indices, order[8 * k:8 * (k + 1)])
        for (_, crop, size, seed), index in zip(rows, indices.tolist()):
            assert seed == sample_seed(3, 1, index)
            assert crop == transform.params(*size, seed).as_list()
    assert build(tmp_path / "shards", decode="gpu", resampled=True).elastic is False  # resampled stays a stream


def test_decode_gpu_indexed_batches_are_what_the_streaming_gpu_path_makes_of_the_same_samples(tmp_path: Path) -> None:
    """The same shards streamed (no index) and indexed: each row of the stream's encoded batch, rebuilt by the
    indexed source from that sample under the stream's seed for it, is the same bytes, crop, size and pixels."""
    write_shards(tmp_path / "plain", SIZES)
    streamed = build(tmp_path / "plain", decode="gpu")
    indexed = build(indexed_shards(tmp_path / "indexed"), decode="gpu")
    assert isinstance(streamed, WebDatasetData) and isinstance(indexed, IndexedShardData)
    for images, labels, _ in itertools.islice(streamed.loader(LoaderSpec(batch_size=8, seed=3), 0), 3):
        # Labels are the running sample number, so label i is sample i of the shard set.
        samples = [indexed.load_sample(int(index), int(seed)) for index, seed in zip(labels, images.seeds)]
        rebuilt, rebuilt_labels, replaced = indexed.collate(samples)
        assert isinstance(rebuilt, EncodedBatch) and torch.equal(rebuilt_labels, labels) and not replaced.any()
        assert encoded_rows(rebuilt) == encoded_rows(images)
        assert torch.equal(rebuilt.decode(CPU)[0], images.decode(CPU)[0])


def test_decode_gpu_indexed_shards_replace_and_count_corrupt_samples_in_the_worker_and_on_the_device(
        tmp_path: Path) -> None:
    """Sample 5 is no image: the worker replaces it, as on the CPU path. Sample 9 is a JPEG cut short after
    its header: only the device finds out, and replaces it there, keeping its label. Both are counted."""
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(2):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for i in range(8 * s, 8 * s + 8):
                image = b"this is not an image" * 10 if i == 5 else jpeg_bytes(i)
                image = image[:len(image) * 7 // 10] if i == 9 else image
                sink.write({"__key__": f"{i:06d}", "jpg": image, "cls": b"%d" % i})
    assert verify.main([str(root), "--index", "--workers", "1"]) == 0
    data = build(root, decode="gpu")
    assert isinstance(data, IndexedShardData)
    batches = list(data.loader(LoaderSpec(batch_size=8, seed=0), 0))
    assert sorted(torch.cat([indices for _, _, indices in batches]).tolist()) == list(range(16))
    for images, labels, indices in batches:
        assert data.prepare(images, CPU).shape == (8, 3, IMG, IMG)
        assert (labels[indices != 5] == indices[indices != 5]).all()  # a stand-in's label only where the worker replaced
    assert data.device_input.replaced == 1 and data.skipped_samples() == 2


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_a_samples_members_are_read_as_tarfile_reads_them(tar_format):
    """span_members reads plain headers itself and leaves the rest to tarfile: the same members either way."""
    names = ["000001.jpg", "000001.cls", "folder/000002.json", "d" * 90 + "/" + "e" * 80 + ".txt", "empty.txt",
             "caf\u00e9.txt"]
    if tar_format != tarfile.USTAR_FORMAT:  # ustar cannot hold a 120-character name without a folder
        names.append("f" * 120 + ".png")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for number, name in enumerate(names):
            data = bytes([number]) * (0 if name == "empty.txt" else 700 * number + 3)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    span = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert span_members(span) == expected and len(expected) == len(names)
    if tar_format != tarfile.GNU_FORMAT:  # GNU's long names (a 'L' member) are tarfile's to read
        with mock.patch.object(tarfile, "open", side_effect=AssertionError("read by tarfile")):
            assert span_members(span) == expected  # plain and pax headers are read without tarfile

    # A header whose checksum does not add up goes to tarfile, which decides: the first header damaged is
    # no tar; a later one ends the members there (what tarfile.open per sample gave before).
    first, later = bytearray(span), bytearray(span)
    first[40] ^= 0xFF
    later[600] ^= 0xFF  # the name of the first file's header
    with pytest.raises(tarfile.TarError):
        span_members(bytes(first))
    assert span_members(bytes(later)) == []


def test_webdatasets_own_shards_are_read_without_tarfile():
    """TarWriter puts a pax header before every member: the indexed reader's fast path reads it."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        writer.write({"__key__": "sample7", "jpg": bytes(range(256)) * 40, "cls": b"3"})
    with mock.patch.object(tarfile, "open", side_effect=AssertionError("read by tarfile")):
        assert span_members(buffer.getvalue()) == [("sample7.cls", b"3"), ("sample7.jpg", bytes(range(256)) * 40)]
