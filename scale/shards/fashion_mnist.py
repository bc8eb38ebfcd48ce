"""Convert the Fashion-MNIST IDX files into WebDataset shards: OUT/train/ and OUT/test/, each with its
own manifest.json (format "scale-wds-v1", split "train" / "test").

Each sample is `{key}.png` (the 28x28 grayscale image, lossless), `{key}.cls` (class index, ASCII) and
`{key}.json` (source file, index in it, width, height, class name). Keys are the zero-padded index in
the IDX file, which keeps its original order (it is already class-mixed).

The source is Debian's `dataset-fashion-mnist` package (gzipped IDX files); uncompressed files work too.

    apt-get install dataset-fashion-mnist
    scale-prep-fashion-mnist --out /data/fashion-mnist-wds
    python -m data_prep.fashion_mnist_to_wds --out /data/fashion-mnist-wds   # the same, from a checkout

A missing or unreadable source, or an --out that already holds a conversion, is one line on stderr
and exit status 2.
"""
from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CommandParser, run_command
from . import DataPrepError, positive_int
from .manifest import MANIFEST_NAME, build_manifest, write_manifest
from .shard_writing import ResumableShardWriter, prepare_output_dir

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SHARD_SIZE = 5000  # 12 train shards: enough for 2 ranks x 2 workers (and more) to split
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# split -> file prefix of the upstream release
SPLIT_FILE_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_UBYTE_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_UBYTE_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_PNG_BATCH = 2500


def find_idx_file(src: Path, stem: str) -> Path:
    for candidate in (src / f"{stem}.gz", src / stem):
        if candidate.is_file():
            return candidate
    raise DataPrepError(
        f"--src {src}: Fashion-MNIST file {stem}[.gz] not found; install the data set with "
        "`apt-get install dataset-fashion-mnist` or point --src at a folder holding the IDX files"
    )


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes (gzipped or not), shaped as its header says."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataPrepError(f"{path}: cannot read: {err}") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != expected_magic:
        raise DataPrepError(f"{path}: not an IDX file of the expected kind (magic {expected_magic:#010x})")
    num_dims = expected_magic & 0xFF
    header_end = 4 + 4 * num_dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    if len(raw) != header_end + int(np.prod(shape)):
        raise DataPrepError(f"{path}: size does not match its header shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def encode_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # a 2-D uint8 array becomes mode "L"
    return out.getvalue()


def encode_png_batch(images: np.ndarray) -> list[bytes]:
    return [encode_png(pixels) for pixels in images]


def encoded_pngs(images: np.ndarray, start: int, workers: int) -> Iterator[bytes]:
    """PNG bytes of images[start:], in order; PNG encoding is most of the run time, so it is spread
    over `workers` processes in batches (large enough that pickling them costs little)."""
    batches = [images[first : first + _PNG_BATCH] for first in range(start, len(images), _PNG_BATCH)]
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield from encode_png_batch(batch)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(batches))) as pool:
        for pngs in pool.imap(encode_png_batch, batches):
            yield from pngs


def convert_split(
    src: Path, out_dir: Path, split: str, shard_size: int, overwrite: bool, workers: int
) -> dict[str, Any]:
    prefix = SPLIT_FILE_PREFIXES[split]
    images_path = find_idx_file(src, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(src, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, _IDX_UBYTE_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_UBYTE_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataPrepError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataPrepError(f"{labels_path}: label {int(labels.max())} is not a Fashion-MNIST class (0..9)")

    options = {
        "src": str(src.resolve()),
        "images": images_path.name,
        "labels": labels_path.name,
        "split": split,
        "shard_size": shard_size,
        "image_format": "png",
    }
    resume = prepare_output_dir(out_dir, split, overwrite, options)
    writer = ResumableShardWriter(out_dir, split, shard_size, None, options, resume)
    height, width = images.shape[1:]
    key_width = max(6, len(str(len(images))))
    pngs = encoded_pngs(images, resume.next_index, workers)
    for index, png in zip(range(resume.next_index, len(images)), pngs):
        class_index = int(labels[index])
        metadata = {
            "source": images_path.name,
            "index": index,
            "width": int(width),
            "height": int(height),
            "class_name": CLASS_NAMES[class_index],
        }
        writer.add_sample(
            index,
            f"{index:0{key_width}d}",
            {
                "png": png,
                "cls": str(class_index).encode("ascii"),
                "json": json.dumps(metadata, sort_keys=True).encode("utf-8"),
            },
        )
    writer.close()
    shards = [{"name": r.name, "num_samples": r.num_samples, "sha256": r.sha256} for r in writer.shards]
    classes = {name: index for index, name in enumerate(CLASS_NAMES)}
    manifest = build_manifest(split, shards, classes, options, skipped=[])
    write_manifest(out_dir, manifest)
    writer.discard_journal()
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="fashion_mnist_to_wds", description="Convert Fashion-MNIST IDX files into WebDataset shards."
    )
    parser.add_argument("--src", type=Path, default=DEFAULT_SOURCE, help=f"folder with the IDX files (default: {DEFAULT_SOURCE})")
    parser.add_argument("--out", type=Path, required=True, help="output folder; gets train/ and test/ shard sets")
    parser.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, help=f"samples per shard (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="PNG encoding processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing complete conversions in --out")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def body() -> int:
        if not args.src.is_dir():
            raise DataPrepError(
                f"--src {args.src}: not found; install the data set with "
                "`apt-get install dataset-fashion-mnist` or pass --src DIR"
            )
        # Check both splits' sources and outputs before writing anything, so a problem fails fast.
        for split, prefix in SPLIT_FILE_PREFIXES.items():
            find_idx_file(args.src, f"{prefix}-images-idx3-ubyte")
            find_idx_file(args.src, f"{prefix}-labels-idx1-ubyte")
            if (args.out / split / MANIFEST_NAME).exists() and not args.overwrite:
                raise DataPrepError(
                    f"--out {args.out}: {split}/{MANIFEST_NAME} already exists; pass --overwrite to replace it"
                )
        summaries = []
        for split in SPLIT_FILE_PREFIXES:
            manifest = convert_split(
                args.src, args.out / split, split, args.shard_size, args.overwrite, args.workers
            )
            summaries.append(f"{split}: {manifest['total_samples']} samples in {len(manifest['shards'])} shards")
        print(f"converted Fashion-MNIST -> {args.out} ({'; '.join(summaries)}) in {time.monotonic() - started:.1f}s")
        return 0
    return run_command("fashion_mnist_to_wds", body)

if __name__ == "__main__":
    sys.exit(main())
