"""Check a converted shard folder against its manifest.json: every shard present, its sha256 and sample
count as recorded, the total as recorded, keys unique, and every sample complete and decodable
(`.cls` an in-range class index, `.json` an object, exactly one image that Pillow can fully decode).

Exits 0 with one summary line when all is well; otherwise prints each problem naming its shard and
exits 1. A folder that cannot be verified at all (not a directory, no or an invalid manifest.json) is
a user error: one line on stderr, exit status 2.

    scale-verify-shards /data/wds/train
    python -m data_prep.verify_shards /data/wds/train --workers 8   # the same, from a checkout

A shard's member-offset index (`NAME.tar.idx.json`, scale/shards/shard_index.py), when there is one, is
checked too: it must be the index `--index` builds from the tar (keys, byte spans, shard size). `--index`
writes these indexes instead, from the tar headers, for shards written by other tools (webdataset's
TarWriter, tar): with them the loader reads samples by offset, in an order that does not depend on the
number of ranks or workers. A shard that is not a regular file (a folder, a device, a link to one) is a
FAIL, and so is a folder whose shards hold no sample at all.

    scale-verify-shards --index /data/other-shards     # every .tar in it, or those its manifest lists
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image
from tqdm import tqdm

from ..atomic_files import irregular_kind, sha256_of_file
from ..errors import CommandParser, run_command
from . import DataPrepError
from .manifest import MANIFEST_NAME, load_manifest, read_manifest
from .shard_index import ShardIndex, index_path, load_index, scan_index, split_member_name, write_index

T = TypeVar("T")
R = TypeVar("R")
IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff"}



@dataclass(frozen=True)
class ShardCheck:
    path: str
    expected_samples: int
    expected_sha256: str
    num_classes: int


@dataclass
class ShardReport:
    name: str
    num_samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def iter_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key."""
    current_key: str | None = None
    files: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, extension = split_member_name(member.name)
        if key != current_key:
            if current_key is not None:
                yield current_key, files
            current_key, files = key, {}
        extracted = tar.extractfile(member)
        assert extracted is not None  # regular files always extract
        files[extension] = extracted.read()
    if current_key is not None:
        yield current_key, files


def sample_problems(key: str, files: dict[str, bytes], num_classes: int) -> list[str]:
    problems = []
    if "cls" not in files:
        problems.append(f"sample {key}: no .cls")
    else:
        try:
            class_index = int(files["cls"].decode("ascii").strip())
            if not 0 <= class_index < num_classes:
                problems.append(f"sample {key}: class index {class_index} outside 0..{num_classes - 1}")
        except (UnicodeDecodeError, ValueError):
            problems.append(f"sample {key}: .cls is not an integer: {files['cls'][:20]!r}")
    if "json" not in files:
        problems.append(f"sample {key}: no .json")
    else:
        try:
            if not isinstance(json.loads(files["json"]), dict):
                problems.append(f"sample {key}: .json is not an object")
        except ValueError as err:
            problems.append(f"sample {key}: .json does not parse: {err}")
    images = sorted(extension for extension in files if extension.lower() in IMAGE_EXTENSIONS)
    if len(images) != 1:
        problems.append(f"sample {key}: expected exactly one image, found {images or 'none'}")
    for extension in images:
        try:
            with Image.open(io.BytesIO(files[extension])) as image:
                image.load()
        except Exception as err:  # Pillow raises many types for broken data
            problems.append(f"sample {key}: undecodable .{extension}: {type(err).__name__}: {err}")
    return problems


def index_mismatch(index: ShardIndex, tar: ShardIndex) -> str | None:
    """How a shard's index differs from the one its tar's headers give (`scan_index`), or None."""
    if index.shard_bytes != tar.shard_bytes:
        return f"was made for a shard of {index.shard_bytes} bytes, the shard has {tar.shard_bytes}"
    if index.keys != tar.keys:
        return f"lists other samples than the shard holds ({len(index.keys)} in the index, {len(tar.keys)} in the tar)"
    for i, (key, offset, size, tar_offset, tar_size) in enumerate(
            zip(index.keys, index.offsets, index.sizes, tar.offsets, tar.sizes)):
        if (offset, size) != (tar_offset, tar_size):
            return (f"has other byte spans than the shard's members: sample {i} ({key}) is bytes "
                    f"{offset}..{offset + size} in the index, {tar_offset}..{tar_offset + tar_size} in the tar")
    return None


def check_index(path: Path) -> str | None:
    """What is wrong with the index of the shard `path` (one is there), or None: it must be the index
    `--index` builds from the tar, keys, spans and size, or the loader reads the wrong bytes."""
    rebuild = f"rebuild it with scale-verify-shards --index {path.parent}"
    index, problem = load_index(path)
    if index is None:
        return f"{problem}; {rebuild}"
    try:
        tar = scan_index(path)
    except (OSError, tarfile.TarError, EOFError):
        return None  # the tar itself is reported unreadable
    mismatch = index_mismatch(index, tar)
    return f"index {index_path(path).name} {mismatch}; {rebuild}" if mismatch else None


def check_shard(check: ShardCheck) -> ShardReport:
    path = Path(check.path)
    report = ShardReport(path.name)
    kind = irregular_kind(path)
    if kind is not None:
        report.problems.append(f"not a regular file ({kind}); expected a tar file")
        return report
    if not path.is_file():
        report.problems.append("missing")
        return report
    try:
        actual_sha256 = sha256_of_file(path)
    except OSError as err:
        report.problems.append(f"unreadable: {err.strerror or err}")
        return report
    if actual_sha256 != check.expected_sha256:
        report.problems.append(f"sha256 mismatch: manifest {check.expected_sha256}, file {actual_sha256}")
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, files in iter_samples(tar):
                report.num_samples += 1
                report.keys.append(key)
                report.problems.extend(sample_problems(key, files, check.num_classes))
    except (tarfile.TarError, OSError, EOFError) as err:
        report.problems.append(f"not a readable tar after {report.num_samples} samples: {err}")
    if report.num_samples != check.expected_samples:
        report.problems.append(f"sample count {report.num_samples}, manifest says {check.expected_samples}")
    if index_path(path).exists():  # a stale or damaged index would make the loader read the wrong bytes
        problem = check_index(path)
        if problem:
            report.problems.append(problem)
    return report


def run_in_processes(function: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`map(function, items)`, in up to `workers` processes, in order."""
    if workers <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        yield from pool.imap(function, items)


def run_checks(checks: Sequence[ShardCheck], workers: int) -> Iterator[ShardReport]:
    return run_in_processes(check_shard, checks, workers)


def index_shard(path: str) -> tuple[int, str | None]:
    """Write the member-offset index of one shard: (its samples, None), or (0, why it cannot be indexed)."""
    kind = irregular_kind(Path(path))
    if kind is not None:
        return 0, f"shard {Path(path).name}: not a regular file ({kind}); expected a tar file"
    try:
        index = scan_index(Path(path))
        write_index(Path(path), index)
    except (OSError, tarfile.TarError, EOFError) as err:
        return 0, f"shard {Path(path).name}: cannot be indexed: {type(err).__name__}: {err}"
    return len(index.keys), None


def build_indexes(shard_dir: Path, workers: int) -> tuple[int, int, list[str]]:
    """Index the shards of `shard_dir` (those its manifest lists, else every .tar in it), as written by
    any tool: (shards, samples, problems). A manifest's sample counts are checked against the tars."""
    manifest_path = shard_dir / MANIFEST_NAME
    manifest, problem = load_manifest(manifest_path, complete=False) if manifest_path.is_file() else (None, None)
    if problem:
        raise DataPrepError(f"{manifest_path}: {problem}")
    if manifest is not None:
        names, expected = [s["name"] for s in manifest["shards"]], [s["num_samples"] for s in manifest["shards"]]
    else:
        names = sorted(p.name for p in shard_dir.glob("*.tar"))
        expected = [None] * len(names)
    if not names:
        raise DataPrepError(f"DIR {shard_dir}: no .tar shards to index")
    problems: list[str] = []
    total = 0
    results = run_in_processes(index_shard, [str(shard_dir / name) for name in names], workers)
    for name, count, (samples, problem) in zip(names, expected, results):
        if problem:
            problems.append(problem)
        elif count is not None and samples != count:
            problems.append(f"shard {name}: {samples} samples, manifest says {count}")
        total += samples
    if total == 0:
        problems.append(f"DIR {shard_dir}: 0 samples in {len(names)} shard(s); expected tar shards holding samples")
    return len(names), total, problems


def verify(shard_dir: Path, workers: int) -> list[str]:
    """All problems found, each naming its shard (or the manifest); empty when the folder is sound."""
    manifest = read_manifest(shard_dir)
    num_classes = len(manifest["classes"])
    checks = [
        ShardCheck(str(shard_dir / shard["name"]), shard["num_samples"], shard["sha256"], num_classes)
        for shard in manifest["shards"]
    ]
    problems: list[str] = []
    recorded_sum = sum(check.expected_samples for check in checks)
    if recorded_sum != manifest["total_samples"]:
        problems.append(f"manifest: total_samples {manifest['total_samples']} but its shards add up to {recorded_sum}")
    first_shard_of_key: dict[str, str] = {}
    total_found = 0
    with tqdm(total=len(checks), unit="shard", desc="verify", disable=None) as bar:
        for report in run_checks(checks, workers):
            problems.extend(f"shard {report.name}: {problem}" for problem in report.problems)
            total_found += report.num_samples
            for key in report.keys:
                earlier = first_shard_of_key.setdefault(key, report.name)
                if earlier != report.name:
                    problems.append(f"shard {report.name}: sample key {key} already used in shard {earlier}")
            bar.update(1)
    if total_found != manifest["total_samples"]:
        problems.append(f"total: found {total_found} samples, manifest says {manifest['total_samples']}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="verify_shards", description="Verify WebDataset shards against their manifest.json."
    )
    parser.add_argument("shard_dir", type=Path, metavar="DIR", help="folder holding manifest.json and the shards")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--index", action="store_true",
                        help="instead of verifying, write each shard's member-offset index (NAME.tar.idx.json) from "
                             "its tar headers, for shards written by other tools; no manifest needed")
    args = parser.parse_args(argv)
    if not args.shard_dir.is_dir():
        parser.error(f"DIR {args.shard_dir}: not a directory")
    if args.workers < 1:
        parser.error(f"--workers: expected a positive integer, got {args.workers}")
    started = time.monotonic()

    def index() -> int:
        shards, samples, problems = build_indexes(args.shard_dir, args.workers)
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        if problems:
            print(f"verify_shards: {args.shard_dir}: {len(problems)} problem(s) found", file=sys.stderr)
            return 1
        print(f"OK {args.shard_dir}: indexed {shards} shards, {samples} samples in {time.monotonic() - started:.1f}s; "
              "data.name webdataset now reads them by sample (elastic order)")
        return 0

    def body() -> int:
        problems = verify(args.shard_dir, args.workers)
        if problems:
            for problem in problems:
                print(f"FAIL {problem}", file=sys.stderr)
            print(f"verify_shards: {args.shard_dir}: {len(problems)} problem(s) found", file=sys.stderr)
            return 1
        manifest = read_manifest(args.shard_dir)
        print(
            f"OK {args.shard_dir}: {len(manifest['shards'])} shards, {manifest['total_samples']} samples; "
            f"checksums, counts and decoding verified in {time.monotonic() - started:.1f}s"
        )
        return 0
    return run_command("verify_shards", index if args.index else body)


if __name__ == "__main__":
    sys.exit(main())
