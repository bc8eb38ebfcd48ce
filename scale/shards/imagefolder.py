"""Convert an ImageFolder tree (or a flat, labelled folder) into WebDataset tar shards plus manifest.json.

Layouts:
  * ImageNet train (default): SRC/<class>/**/<image>; classes are the sorted class folder names.
    Symlinked folders are followed, but every real folder and file is read once: symlink loops
    (of folders, or of file links such as a.jpg -> b.jpg -> a.jpg), repeated links and links to
    files already listed are left out and listed as skipped.
  * ImageNet val: a flat SRC plus `--val-labels FILE`, one class name per line for SRC's files in
    sorted file-name order.
  * `--labels CSV`: rows of `filename,label` (a `filename,label` header row is allowed), file names
    relative to SRC.
  `--classes FILE` pins the class -> index mapping (a train manifest.json, or one class name per line
  in index order), so that a val or subset conversion uses the train indices.

Each sample is `{key}.jpg` (the original bytes for an intact RGB JPEG that needs no resize, otherwise
re-encoded RGB at --quality), `{key}.cls` (class index, ASCII) and `{key}.json` (path relative to SRC,
stored width/height, class name). Keys are the zero-padded index in the seeded global shuffle.

Output is reproducible byte for byte and resumable after a kill: rerun the same command. See
scale/shards/shard_writing.py for how, and for the SCALE_DATA_PREP_TEST_SHARD_DELAY test hook.
A mistake in the input (a missing or unlistable --src, a bad labels file, an --out holding another
conversion) is one line on stderr and exit status 2; files that cannot be converted are skipped and
listed in the manifest instead.

    scale-prep-imagefolder --src /data/imagenet/train --out /data/wds/train
    python -m data_prep.imagefolder_to_wds --src val/ --val-labels val_labels.txt --split val \
        --classes /data/wds/train/manifest.json --out /data/wds/val --resize 256
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from ..atomic_files import read_json
from ..errors import CommandParser, run_command
from . import DataPrepError, positive_int
from .manifest import SPLIT_NAME_PATTERN, build_manifest, write_manifest
from .shard_writing import ResumableShardWriter, SkippedItem, prepare_output_dir
from .source_tree import unresolvable_reason, walk_files

DEFAULT_SHARD_SIZE = 1000
DEFAULT_QUALITY = 90
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA", "P"}


@dataclass(frozen=True, slots=True)
class SourceImage:
    rel_path: str  # relative to --src, with forward slashes
    label: str


@dataclass(frozen=True, slots=True)
class EncodeJob:
    index: int
    key: str
    path: str
    rel_path: str
    class_index: int
    class_name: str
    resize: int | None
    quality: int


@dataclass(frozen=True)
class EncodeResult:
    index: int
    key: str
    rel_path: str
    files: dict[str, bytes] | None  # None when skipped
    skip_reason: str = ""


# --------------------------------------------------------------------------------------------------
# Image decoding and encoding (runs in the worker processes)


def target_size(width: int, height: int, max_short_side: int | None) -> tuple[int, int] | None:
    """Size with the shorter side scaled down to `max_short_side`, or None when no resize is needed."""
    if max_short_side is None or min(width, height) <= max_short_side:
        return None
    scale = max_short_side / min(width, height)
    if width <= height:
        return max_short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_short_side


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any decoded image: transparency composited on white, 16-bit scaled (not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255; scale the 0..65535 range instead.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def to_rgb_jpeg(data: bytes, max_short_side: int | None, quality: int) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height); an intact RGB JPEG that needs no resize keeps its original bytes."""
    with Image.open(io.BytesIO(data)) as image:
        new_size = target_size(image.width, image.height, max_short_side)
        if new_size is None and image.format == "JPEG" and image.mode == "RGB":
            image.load()  # raises on a truncated or corrupt file
            return data, image.width, image.height
        if new_size is not None and image.format == "JPEG":
            image.draft(None, new_size)  # let libjpeg decode at a reduced scale: much faster, same every run
        image.load()
        rgb = to_rgb(image)
        if new_size is not None and rgb.size != new_size:
            rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return out.getvalue(), rgb.width, rgb.height


def encode_job(job: EncodeJob) -> EncodeResult:
    """Read, decode and re-encode one file; any failure becomes a skip reason instead of an exception."""
    try:
        with open(job.path, "rb") as stream:
            data = stream.read()
    except OSError as err:
        return EncodeResult(job.index, job.key, job.rel_path, None, f"unreadable: {err.strerror or err}")
    try:
        jpeg, width, height = to_rgb_jpeg(data, job.resize, job.quality)
    except Image.UnidentifiedImageError:
        return EncodeResult(job.index, job.key, job.rel_path, None, "not an image (unidentified format)")
    except Exception as err:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
        return EncodeResult(job.index, job.key, job.rel_path, None, f"undecodable: {type(err).__name__}: {err}")
    metadata = {"path": job.rel_path, "width": width, "height": height, "class_name": job.class_name}
    files = {
        "jpg": jpeg,
        "cls": str(job.class_index).encode("ascii"),
        "json": json.dumps(metadata, sort_keys=True).encode("utf-8"),
    }
    return EncodeResult(job.index, job.key, job.rel_path, files)


# --------------------------------------------------------------------------------------------------
# Listing the sources


def list_train_layout(src: Path) -> tuple[list[SourceImage], list[str], list[SkippedItem]]:
    """Files under SRC/<class>/ (recursively, each real file once: see scale/shards/source_tree.py),
    the class folder names, and what was left out (stray top-level files, repeated files and folders)."""
    try:
        top = sorted(os.scandir(src), key=lambda entry: entry.name)
    except OSError as err:
        raise DataPrepError(f"--src {src}: cannot list: {err.strerror or err}") from None
    class_names: list[str] = []
    stray: list[SkippedItem] = []
    for entry in top:
        try:
            is_folder = entry.is_dir()
        except OSError as err:  # a top-level symlink loop (ELOOP): neither a class nor a file
            stray.append(SkippedItem(-1, entry.name, unresolvable_reason(err)))
            continue
        if not is_folder:
            stray.append(SkippedItem(-1, entry.name, "not inside a class folder"))
        elif not entry.name.startswith("."):
            class_names.append(entry.name)
    if not class_names:
        raise DataPrepError(f"--src {src}: no class folders found (expected SRC/<class>/<image> files)")
    files, left_out = walk_files(src, class_names)
    sources = [SourceImage(rel_path, rel_path.split("/", 1)[0]) for rel_path in files]
    return sources, class_names, stray + [SkippedItem(-1, path, reason) for path, reason in left_out]


def list_val_layout(src: Path, labels_file: Path) -> list[SourceImage]:
    try:
        filenames = sorted(entry.name for entry in os.scandir(src) if not entry.is_dir())
    except OSError as err:
        raise DataPrepError(f"--src {src}: cannot list: {err.strerror or err}") from None
    labels = read_label_lines(labels_file, "--val-labels")
    if len(labels) != len(filenames):
        raise DataPrepError(
            f"--val-labels {labels_file}: has {len(labels)} labels but --src {src} has {len(filenames)} files; "
            "expected one label per file, in sorted file-name order"
        )
    return [SourceImage(filename, label) for filename, label in zip(filenames, labels)]


def list_csv_layout(src: Path, csv_file: Path) -> list[SourceImage]:
    sources = []
    seen: set[str] = set()
    try:
        with open(csv_file, newline="", encoding="utf-8") as stream:
            for line_number, row in enumerate(csv.reader(stream), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                cells = [cell.strip() for cell in row]
                if line_number == 1 and [cell.lower() for cell in cells] == ["filename", "label"]:
                    continue
                if len(cells) != 2 or not cells[0] or not cells[1]:
                    raise DataPrepError(f"--labels {csv_file}: line {line_number}: expected 'filename,label', got {row!r}")
                rel_path = Path(cells[0]).as_posix()
                if rel_path in seen:
                    raise DataPrepError(f"--labels {csv_file}: line {line_number}: {cells[0]!r} is listed twice")
                seen.add(rel_path)
                sources.append(SourceImage(rel_path, cells[1]))
    except (OSError, UnicodeDecodeError) as err:
        raise DataPrepError(f"--labels {csv_file}: cannot read: {err}") from None
    if not sources:
        raise DataPrepError(f"--labels {csv_file}: no rows")
    return sources


def read_label_lines(path: Path, option: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataPrepError(f"{option} {path}: cannot read: {err}") from None
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if not labels or any(not label for label in labels):
        raise DataPrepError(f"{option} {path}: expected one non-empty name per line")
    return labels


def read_class_mapping(path: Path) -> dict[str, int]:
    """`--classes`: a manifest.json's "classes", or one class name per line in index order."""
    if path.suffix == ".json":
        try:
            classes = read_json(path).get("classes")
        except (OSError, ValueError, AttributeError) as err:
            raise DataPrepError(f"--classes {path}: cannot read a manifest: {err}") from None
        if not isinstance(classes, dict) or not all(isinstance(index, int) for index in classes.values()):
            raise DataPrepError(f"--classes {path}: has no 'classes' object of name -> index")
        return dict(sorted(classes.items(), key=lambda item: item[1]))
    names = read_label_lines(path, "--classes")
    if len(set(names)) != len(names):
        raise DataPrepError(f"--classes {path}: a class name is listed twice")
    return {name: index for index, name in enumerate(names)}


def discover_sources(args: argparse.Namespace) -> tuple[list[SourceImage], dict[str, int], list[SkippedItem]]:
    """All source files with their labels, the class mapping, and files rejected while listing."""
    stray: list[SkippedItem] = []
    if args.val_labels is not None:
        sources = list_val_layout(args.src, args.val_labels)
        folder_classes: list[str] = []
    elif args.labels is not None:
        sources = list_csv_layout(args.src, args.labels)
        folder_classes = []
    else:
        sources, folder_classes, stray = list_train_layout(args.src)
    if args.classes is not None:
        classes = read_class_mapping(args.classes)
        unknown = sorted({source.label for source in sources} - set(classes))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataPrepError(f"--classes {args.classes}: does not list {len(unknown)} label(s) of the source: {shown}")
    else:
        names = folder_classes or sorted({source.label for source in sources})
        classes = {name: index for index, name in enumerate(names)}
    return sources, classes, stray


def shuffled_subset(sources: Sequence[SourceImage], seed: int, limit: int | None) -> list[SourceImage]:
    """Sort first so the result depends only on the file set and the seed, never on listing order."""
    ordered = sorted(sources, key=lambda source: source.rel_path)
    random.Random(seed).shuffle(ordered)
    return ordered[:limit] if limit is not None else ordered


# --------------------------------------------------------------------------------------------------
# The conversion


def run_jobs(jobs: Iterable[EncodeJob], num_jobs: int, workers: int) -> Iterator[EncodeResult]:
    """Results in job order (so shard contents never depend on worker timing). `jobs` may be lazy:
    the pool pulls them as its task pipe drains, so millions of jobs never sit in memory at once."""
    if workers <= 1 or num_jobs <= 1:
        yield from map(encode_job, jobs)
        return
    chunksize = max(1, min(16, num_jobs // (workers * 8)))
    # spawn: safe next to tqdm's monitor thread, and the same on every platform.
    with multiprocessing.get_context("spawn").Pool(min(workers, num_jobs)) as pool:
        yield from pool.imap(encode_job, jobs, chunksize=chunksize)


def source_list_digest(ordered: Sequence[SourceImage], classes: dict[str, int]) -> str:
    """Fingerprint of the ordered (path, label) list and class mapping, so resuming over a changed source fails."""
    digest = hashlib.sha256(json.dumps(classes, sort_keys=True).encode("utf-8"))
    for source in ordered:
        digest.update(f"{source.rel_path}\0{source.label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def conversion_options(args: argparse.Namespace, source_digest: str) -> dict[str, Any]:
    """Everything that decides the output bytes (workers and --overwrite do not), as recorded in the manifest."""
    def resolved(path: Path | None) -> str | None:
        return str(path.resolve()) if path is not None else None

    return {
        "src": resolved(args.src),
        "layout": "val-labels" if args.val_labels else "labels-csv" if args.labels else "class-folders",
        "val_labels": resolved(args.val_labels),
        "labels": resolved(args.labels),
        "classes": resolved(args.classes),
        "split": args.split,
        "seed": args.seed,
        "limit": args.limit,
        "shard_size": args.shard_size,
        "shard_bytes": args.shard_bytes,
        "resize": args.resize,
        "quality": args.quality,
        "pillow": PIL.__version__,  # JPEG bytes depend on the encoder; a resume must use the same one
        "source_files_sha256": source_digest,
    }


def format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def convert(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    sources, classes, stray = discover_sources(args)
    ordered = shuffled_subset(sources, args.seed, args.limit)
    options = conversion_options(args, source_list_digest(ordered, classes))
    resume = prepare_output_dir(args.out, args.split, args.overwrite, options)
    writer = ResumableShardWriter(args.out, args.split, args.shard_size, args.shard_bytes, options, resume)
    if resume.shards:
        print(f"resuming: keeping {len(resume.shards)} complete shard(s) in {args.out}", file=sys.stderr)

    key_width = max(9, len(str(len(ordered))))
    jobs = (
        EncodeJob(
            index=index,
            key=f"{index:0{key_width}d}",
            path=str(args.src / source.rel_path),
            rel_path=source.rel_path,
            class_index=classes[source.label],
            class_name=source.label,
            resize=args.resize,
            quality=args.quality,
        )
        for index, source in enumerate(ordered)
        if index >= resume.next_index
    )
    with tqdm(total=len(ordered), initial=resume.next_index, unit="file", desc=args.split, disable=None) as bar:
        for result in run_jobs(jobs, len(ordered) - resume.next_index, args.workers):
            if result.files is None:
                writer.add_skipped(result.index, result.rel_path, result.skip_reason)
            else:
                writer.add_sample(result.index, result.key, result.files)
            bar.update(1)
    writer.close()

    skipped = [{"path": item.path, "reason": item.reason} for item in stray + writer.skipped]
    for entry in skipped:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    if not writer.shards:
        raise DataPrepError(f"--src {args.src}: no image could be converted ({len(skipped)} file(s) skipped)")
    shards = [{"name": r.name, "num_samples": r.num_samples, "sha256": r.sha256} for r in writer.shards]
    manifest = build_manifest(args.split, shards, classes, options, skipped)
    manifest_path = write_manifest(args.out, manifest)
    writer.discard_journal()

    elapsed = time.monotonic() - started
    total_bytes = sum(record.num_bytes for record in writer.shards)
    print(
        f"converted {manifest['total_samples']} images, skipped {len(skipped)} files -> "
        f"{len(shards)} shards ({format_bytes(total_bytes)}) in {elapsed:.1f}s; manifest: {manifest_path}"
    )
    return manifest


# --------------------------------------------------------------------------------------------------
# Command line


def jpeg_quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality from 1 to 100, got {text!r}")
    return value


def split_name(text: str) -> str:
    if not SPLIT_NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '.' or '-', got {text!r}")
    return text


def available_cores() -> int:
    """Cores this process may use (a Slurm or container CPU mask can be smaller than the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="imagefolder_to_wds",
        description="Convert an ImageFolder tree (or a labelled flat folder) into WebDataset tar shards.",
    )
    parser.add_argument("--src", type=Path, required=True, help="ImageFolder root (or flat folder with --val-labels/--labels)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards and manifest.json")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--val-labels", type=Path, help="flat --src: one class name per line, in sorted file-name order")
    labels.add_argument("--labels", type=Path, help="flat --src: CSV of filename,label rows")
    parser.add_argument("--classes", type=Path, help="class -> index mapping to use: a manifest.json or one name per line")
    parser.add_argument("--split", type=split_name, default="train", help="shard name prefix and manifest split (default: train)")
    parser.add_argument("--shard-size", type=positive_int, help=f"samples per shard (default: {DEFAULT_SHARD_SIZE} unless --shard-bytes is given)")
    parser.add_argument("--shard-bytes", type=positive_int, help="maximum bytes per shard (a single larger sample still gets its own shard)")
    parser.add_argument("--resize", type=positive_int, help="scale down so the shorter side is at most N (default: keep sizes)")
    parser.add_argument("--quality", type=jpeg_quality, default=DEFAULT_QUALITY, help=f"JPEG quality when re-encoding (default: {DEFAULT_QUALITY})")
    parser.add_argument("--workers", type=positive_int, default=available_cores(), help="encoding processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    parser.add_argument("--limit", type=positive_int, help="convert only the first N files of the shuffled list")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete conversion already in --out")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"--src {args.src}: not a directory")
    for option, path in (("--val-labels", args.val_labels), ("--labels", args.labels), ("--classes", args.classes)):
        if path is not None and not path.is_file():
            parser.error(f"{option} {path}: no such file")
    src, out = args.src.resolve(), args.out.resolve()
    if out == src or src in out.parents:
        # The shards would be listed as source files (or a class folder) on the next run.
        parser.error(f"--out {args.out}: must not be inside --src {args.src}")
    if args.shard_size is None and args.shard_bytes is None:
        args.shard_size = DEFAULT_SHARD_SIZE
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        convert(args)
        return 0
    return run_command("imagefolder_to_wds", body)


if __name__ == "__main__":
    sys.exit(main())
