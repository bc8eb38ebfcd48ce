"""Throughput of the webdataset pre-training pipeline, per DataLoader worker process.

Writes two shard sets of natural-looking (smooth noise) JPEGs: pre-resized (short side
256, like most ImageNet pre-processing) and full-size (500x375, about ImageNet's
average), then times the real loader (`scale.data` "webdataset": tar reading, decode,
RandomResizedCrop 224 + flip + normalise, batching in the workers) at 1 and 2 workers,
and profiles one process to show where the time goes. Prints a table, writes JSON.

    python bench/loader_throughput.py --out bench_loader.json
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale.config import DataConfig  # noqa: E402
from scale.data import LoaderSpec, build_dataset  # noqa: E402
from scale.data.transforms import to_float_tensor  # noqa: E402
from scale.data.wds_stream import WebDatasetData  # noqa: E402

IMG_SIZE = 224


def smooth_noise_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Blobs at a few scales plus fine grain: compresses like a photo, unlike white noise."""
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 0.5), (12, 0.3), (48, 0.15)):
        coarse = rng.random((cells, max(2, cells * width // height), 3), dtype=np.float32)
        layer = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        canvas += weight * np.asarray(layer, np.float32)
    canvas += rng.normal(0, 4, canvas.shape).astype(np.float32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def write_shards(directory: Path, count: int, size: Tuple[int, int], per_shard: int, seed: int,
                 unique: int = 64) -> int:
    """JPEG shards + manifest; returns the total bytes written.

    Only `unique` images are generated (it is slow) and reused under new keys: decoding
    costs the same whether or not the bytes repeat.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(min(unique, count)):
        buf = io.BytesIO()
        smooth_noise_image(rng, *size).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    shards, total_bytes = [], 0
    for s in range(0, count, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        n = min(per_shard, count - s)
        with wds.TarWriter(str(directory / name)) as sink:
            for i in range(s, s + n):
                sink.write({"__key__": f"{i:08d}", "jpg": encoded[i % len(encoded)], "cls": str(i % 1000).encode(),
                            "json": json.dumps({"index": i}).encode()})
        shards.append({"name": name, "num_samples": n, "sha256": ""})
        total_bytes += (directory / name).stat().st_size
    (directory / "manifest.json").write_text(json.dumps({
        "format": "scale-wds-v1", "split": "train", "total_samples": count, "shards": shards,
        "classes": {}, "options": {"bench": True}, "skipped": []}))
    return total_bytes


def build(root: Path, workers: int) -> WebDatasetData:
    cfg = DataConfig(name="webdataset", root=str(root), num_workers=workers, shuffle_buffer=256)
    data = build_dataset(cfg, IMG_SIZE, 3, True)
    assert isinstance(data, WebDatasetData)
    return data


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_loader(root: Path, workers: int, batch_size: int) -> Dict[str, float]:
    """One epoch through the real loader.

    img_per_s counts from the first batch on (worker start-up excluded). Other jobs on a
    shared machine slow the wall clock, so it also reports images per CPU second spent in
    the worker processes (counted once they have exited), which contention barely moves.
    """
    data = build(root, workers)
    spec = LoaderSpec(batch_size=batch_size, seed=0, num_workers=workers)
    cpu_before = children_cpu_s()
    start = time.perf_counter()
    first_at, images, first_images = start, 0, 0
    for x, _ in data.loader(spec, epoch=0):  # runs to the end, so the workers are joined
        images += len(x)
        if first_images == 0:
            first_at, first_images = time.perf_counter(), images
    end = time.perf_counter()
    cpu = children_cpu_s() - cpu_before
    steady = (images - first_images) / (end - first_at)
    return {"workers": workers, "images": images, "wall_s": end - start, "img_per_s": steady,
            "img_per_s_per_worker": steady / workers, "worker_cpu_s": cpu, "img_per_worker_cpu_s": images / cpu}


def best_of(repeats: int, fn: Callable[[], Dict[str, float]]) -> Dict[str, float]:
    runs = [fn() for _ in range(repeats)]
    best = max(runs, key=lambda r: r["img_per_s"])
    return {**best, "img_per_worker_cpu_s": max(r["img_per_worker_cpu_s"] for r in runs),
            "img_per_s_all_runs": [r["img_per_s"] for r in runs]}


def profile_stages(root: Path, limit: int, batch_size: int, repeats: int = 3) -> Dict[str, float]:
    """Milliseconds per image of each stage, one thread (like a worker), best of `repeats`."""
    data = build(root, 0)
    spec = LoaderSpec(batch_size=batch_size, seed=0)
    cfg = DataConfig()
    crop = v2.RandomResizedCrop(IMG_SIZE, scale=tuple(cfg.crop_scale), interpolation=InterpolationMode.BICUBIC,
                                antialias=True)
    flip_normalize = v2.Compose([v2.RandomHorizontalFlip(), v2.Normalize(list(cfg.mean), list(cfg.std))])

    def per_image_ms(fn: Callable[[], Any]) -> Tuple[Any, float]:
        best, out = float("inf"), None
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return out, 1e3 * best / limit

    def read_raw() -> List[Dict[str, Any]]:
        raw = data._raw_samples(spec, 0, 1, 0)
        return [next(raw) for _ in range(limit)]

    samples, tar_ms = per_image_ms(read_raw)
    images, decode_ms = per_image_ms(lambda: [data._decode(s)[0] for s in samples])
    tensors, float_ms = per_image_ms(lambda: [to_float_tensor(im, 3) for im in images])
    crops, crop_ms = per_image_ms(lambda: [crop(x) for x in tensors])
    outs, flip_ms = per_image_ms(lambda: [flip_normalize(x) for x in crops])
    _, collate_ms = per_image_ms(lambda: [torch.stack(outs[i:i + batch_size]) for i in range(0, limit, batch_size)])
    batches = limit // batch_size
    _, pipeline_ms = per_image_ms(lambda: list(itertools.islice(data.worker_batches(
        spec, 0, data.plan(spec, 0), 0, 0), batches)))
    pipeline_ms *= limit / (batches * batch_size)
    result = {"tar_read": tar_ms, "decode": decode_ms, "to_float": float_ms, "resized_crop": crop_ms,
              "flip_normalize": flip_ms, "collate": collate_ms}
    result["sum_of_stages"] = sum(result.values())
    result["whole_worker_pipeline"] = pipeline_ms  # the stages as the loader runs them, with seeding

    # Alternatives (not used by the loader): crop + resize in PIL on uint8 before making a
    # float tensor (replaces to_float + resized_crop + flip_normalize), and JPEG draft
    # decoding at half size (replaces decode; only a win where the crop still has enough pixels).
    def pil_crop_first() -> None:
        for im in images:
            top, left, h, w = v2.RandomResizedCrop.get_params(im, list(cfg.crop_scale), [3 / 4, 4 / 3])
            small = im.resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC, box=(left, top, left + w, top + h))
            flip_normalize(to_float_tensor(small, 3))

    def draft_decode() -> None:
        for sample in samples:
            im = Image.open(io.BytesIO(sample["jpg"]))
            im.draft("RGB", (im.width // 2, im.height // 2))
            im.load()

    result["alt_pil_crop_first"] = per_image_ms(pil_crop_first)[1]
    result["alt_draft_half_decode"] = per_image_ms(draft_decode)[1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="images per shard set")
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=2, help="loader runs per setting; the best counts")
    parser.add_argument("--profile-images", type=int, default=256)
    parser.add_argument("--dir", default="", help="where to write shards (default: a temporary directory)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; the profile should too

    kinds = {"pre_resized_256": (341, 256), "full_size_500x375": (500, 375)}
    results: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cpus": os.cpu_count(), "batch_size": args.batch_size, "img_size": IMG_SIZE,
                               "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.dir or tmp)
        for seed, (kind, size) in enumerate(kinds.items()):
            root = base / kind
            t = time.perf_counter()
            nbytes = write_shards(root, args.images, size, args.per_shard, seed)
            print(f"{kind}: wrote {args.images} images {size[0]}x{size[1]} "
                  f"({nbytes / args.images / 1024:.0f} KiB each) in {time.perf_counter() - t:.1f}s", flush=True)
            runs = [best_of(args.repeats, lambda: time_loader(root, int(w), args.batch_size))
                    for w in args.workers.split(",")]
            profile = profile_stages(root, args.profile_images, args.batch_size)
            results["kinds"][kind] = {"size": size, "kib_per_image": nbytes / args.images / 1024,
                                      "runs": runs, "profile_ms_per_image": profile}

    print(f"\n{'shards':<20}{'workers':>8}{'img/s':>10}{'img/s/worker':>14}{'img/worker-CPU-s':>18}")
    for kind, r in results["kinds"].items():
        for run in r["runs"]:
            print(f"{kind:<20}{run['workers']:>8}{run['img_per_s']:>10.0f}{run['img_per_s_per_worker']:>14.0f}"
                  f"{run['img_per_worker_cpu_s']:>18.0f}")
    stages = list(next(iter(results["kinds"].values()))["profile_ms_per_image"])
    print(f"\n{'ms per image (1 thread)':<32}" + "".join(f"{k[:20]:>22}" for k in results["kinds"]))
    for stage in stages:
        print(f"{stage:<32}" + "".join(f"{r['profile_ms_per_image'][stage]:>22.3f}"
                                       for r in results["kinds"].values()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
