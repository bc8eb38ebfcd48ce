"""Throughput of the pre-training data path, per core, for every way of feeding the model.

Writes shard sets of natural-looking (smooth noise) JPEGs: pre-resized (short side 256,
like most ImageNet pre-processing), full-size (500x375, about ImageNet's average) and, with
`--kinds large`, phone photos (2048x1536). Then, in one run, it times one DataLoader
worker (one core) reading each set through each path, RandomResizedCrop(224, (0.2, 1),
bicubic) + flip in all of them:

* `plain_webdataset`: the pipeline open_clip builds (`wds.DataPipeline`: shard list, split by
  worker, tar reading, shuffle, `decode("pil")`, torchvision Compose(RandomResizedCrop,
  RandomHorizontalFlip, ToTensor, Normalize), batched), in a `wds.WebLoader`;
* `previous`: scale's loader as it was before uint8 batches: full decode (PIL draft only
  when the smallest crop allowed it), crop + resize in PIL, float conversion and
  normalisation in the worker, float batches;
* `cpu`: scale's loader now: crop-aware decode (the smallest DCT scale that covers the crop
  at 224), resize in uint8, uint8 batches; normalisation is on the device (its CPU cost in
  the main process is reported apart, `device_input_ms`);
* `indexed`: the same CPU decode over indexed shards (each shard's member-offset index built by
  `scale-verify-shards --index`, in a sibling folder of links so that `cpu` keeps streaming): one
  positioned read per sample, in the elastic order (scale/data/indexed_shards.py), whose batches do
  not depend on the ranks or workers; it must stay at least 1.3x `plain_webdataset`;
* `gpu_workers`: `data.decode: gpu`'s workers alone (they read tar and headers, draw crops and
  batch the JPEG bytes; nothing decodes them): the most a worker core can feed a GPU that
  decodes, runs on any machine;
* `gpu` (CUDA only): `data.decode: gpu` end to end: nvJPEG decodes, crops and flips on the
  device (img/s is then bounded by the worker, the GPU or the copy, whichever is slowest:
  it is reported per worker core like the others).

Images/s per core counts from the first batch on (worker start-up excluded); images per
worker-CPU-second is what contention barely moves. Each path runs `--repeats` times
interleaved, the best counts. It then turns img/s per core into the **cores per GPU** that
OCL and MAE need at ViT-B/16 and ViT-L/16: the GPU's images/s is the train step's FLOP/s
(a FLOP ratio to a bf16 GEMM times that GEMM's FLOP/s) over the model's FLOPs per image;
these ratios come from `bench/gpu_check.py`'s flop_ratio check: on a GPU machine this bench
runs that check first (~2 minutes; gpu_check's own `decode` check uses the ratios its run
measured minutes before); elsewhere it reads the ones measured on an H200
(docs/results/gpu_check_h200.json) and says so. A case not measured (MAE ViT-L) is estimated from the same method's ratio at
the other size, and says so.

    python -m bench.loader_throughput --out docs/results/loader_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as tv1
from torchvision.transforms import InterpolationMode, v2

from bench.common import JPEG_SIZES, REPO, smooth_noise_image
from scale.config import DataConfig, load_config
from scale.data import LoaderSpec, build_dataset
from scale.data.device_input import DeviceInput
from scale.data.gpu_decode import EncodedBatch, gpu_decode_problem
from scale.data.indexed_shards import IndexedShardData
from scale.data.transforms import PretrainTransform, dct_scale, draft_request, open_image
from scale.data.wds_stream import WebDatasetData
from scale.shards.shard_index import index_path
from scale.shards.verify import build_indexes
from scale.trainer import step_plan

IMG_SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GPU_RESULTS = REPO / "docs/results/gpu_check_h200.json"
PATHS = ("plain_webdataset", "previous", "cpu", "indexed", "gpu_workers", "gpu")
MODEL_CASES = (("OCL", "ocl_vitb16"), ("OCL", "ocl_vitl16"), ("MAE", "mae_vitb16"), ("MAE", "mae_vitl16"))


# ----------------------------------------------------------------------------- shards

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


# ----------------------------------------------------------------------------- the paths

def plain_webdataset(root: Path, workers: int, batch_size: int) -> Iterator[Any]:
    """open_clip's training pipeline (open_clip/src/training/data.py, get_wds_dataset), finite."""
    transform = tv1.Compose([tv1.RandomResizedCrop(IMG_SIZE, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
                             tv1.RandomHorizontalFlip(), tv1.ToTensor(), tv1.Normalize(MEAN, STD)])
    urls = sorted(str(p) for p in root.glob("*.tar"))
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                                wds.shuffle(1000, initial=100), wds.decode("pil"), wds.to_tuple("jpg", "cls"),
                                wds.map_tuple(transform, lambda c: int(c)), wds.batched(batch_size, partial=False))
    return iter(wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers))


class PreviousItems:
    """scale's worker transform before uint8 batches, for comparison: full-image decode (with
    a draft only where the *smallest* allowed crop still had 224 pixels), crop + resize in PIL
    (v2.RandomResizedCrop), float conversion and normalisation in the worker."""

    def __init__(self) -> None:
        self.draft = math.ceil(IMG_SIZE / math.sqrt(0.2 * 3 / 4))
        self.spatial = v2.Compose([v2.RandomResizedCrop(IMG_SIZE, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC,
                                                        antialias=True), v2.RandomHorizontalFlip()])
        self.normalize = v2.Normalize(list(MEAN), list(STD))

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (self.draft, self.draft))
        image.load()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            image = self.spatial(image.convert("RGB"))
        return self.normalize(v2.functional.pil_to_tensor(image).float().div_(255.0))

    def collate(self, items: List[torch.Tensor]) -> torch.Tensor:
        return torch.utils.data.default_collate(items)


def scale_loader(root: Path, decode: str, previous: bool = False) -> WebDatasetData:
    cfg = DataConfig(name="webdataset", root=str(root), shuffle_buffer=1000, decode=decode)
    data = build_dataset(cfg, IMG_SIZE, 3, True)
    assert isinstance(data, WebDatasetData)
    if previous:
        data.items = PreviousItems()
    return data


def indexed_loader(root: Path) -> IndexedShardData:
    """The shards of `root` read by sample: linked into `<root>_indexed` and indexed there (once), so that
    `root` itself keeps no index and the other paths stream it."""
    twin = root.with_name(root.name + "_indexed")
    twin.mkdir(exist_ok=True)
    for path in root.iterdir():
        if not (twin / path.name).exists():
            (twin / path.name).symlink_to(path.resolve())
    if not all(index_path(shard).is_file() for shard in twin.glob("*.tar")):
        build_indexes(twin, workers=1)
    data = build_dataset(DataConfig(name="webdataset", root=str(twin), shuffle_buffer=1000, decode="cpu"), IMG_SIZE, 3,
                         True)
    assert isinstance(data, IndexedShardData)
    return data


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def host_bytes(batch: Any) -> int:
    """Bytes a batch carries from the worker to the main process (and the device)."""
    if isinstance(batch, EncodedBatch):
        return batch.data.numel() + batch.pixels.numel() + batch.crops.numel() * 8
    return batch.numel() * batch.element_size()


def time_path(path: str, root: Path, workers: int, batch_size: int, device: torch.device) -> Dict[str, Any]:
    """One epoch through one path: steady img/s (from the first batch on) and img per worker-CPU-second."""
    if path == "plain_webdataset":
        batches = plain_webdataset(root, workers, batch_size)
        prepare: Callable[[Any], Any] = lambda x: x
    else:
        data = (indexed_loader(root) if path == "indexed" else
                scale_loader(root, "gpu" if path.startswith("gpu") else "cpu", previous=path == "previous"))
        batches = (x for x, _, _ in data.loader(LoaderSpec(batch_size=batch_size, seed=0, num_workers=workers,
                                                        pin_memory=device.type == "cuda"), epoch=0))
        prepare = (lambda x: data.prepare(x, device)) if path == "gpu" else (lambda x: x)
    cpu_before = children_cpu_s()
    start = time.perf_counter()
    first_at, images, first_images, nbytes = start, 0, 0, 0
    for batch in batches:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        nbytes += host_bytes(batch)
        images += len(prepare(batch))
        if first_images == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_at, first_images = time.perf_counter(), images
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    cpu = children_cpu_s() - cpu_before
    steady = (images - first_images) / max(end - first_at, 1e-9)
    return {"path": path, "workers": workers, "images": images, "img_per_s": steady,
            "img_per_s_per_core": steady / workers, "img_per_worker_cpu_s": images / max(cpu, 1e-9),
            "host_bytes_per_image": nbytes / max(images, 1)}


def decode_scales(root: Path, limit: int = 256) -> Dict[str, float]:
    """How often the crop-aware decode could use each DCT scale (same crops as the loader draws)."""
    data = scale_loader(root, "cpu")
    transform: PretrainTransform = data.items.transform
    counts: Dict[int, int] = {}
    spec = LoaderSpec(batch_size=64, seed=0)
    raw = data._raw_samples(spec, 0, 1, 0)
    for i in range(limit):
        image = open_image(io.BytesIO(next(raw)["jpg"]))
        width, height = image.size
        crop = transform.params(width, height, i)
        image.draft("RGB", draft_request(width, height, crop, IMG_SIZE))
        k = dct_scale(width, height, image.size)
        counts[k] = counts.get(k, 0) + 1
    return {f"1/{k}": counts.get(k, 0) / limit for k in (1, 2, 4, 8)}


def device_input_ms(batch_size: int, repeats: int = 5) -> float:
    """Milliseconds per image of uint8 -> normalised float on this CPU (on a GPU it is ~free)."""
    x = torch.randint(0, 256, (batch_size, 3, IMG_SIZE, IMG_SIZE), dtype=torch.uint8)
    convert = DeviceInput(MEAN, STD)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        convert(x, torch.device("cpu"))
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / batch_size


# ----------------------------------------------------------------------------- cores per GPU

def flops_per_image(recipe: str) -> Tuple[float, str]:
    """(train-step FLOPs per image of the recipe's method, model name), from the library's step plan."""
    cfg = load_config(recipe)
    return step_plan(cfg).flops_per_image, cfg.model.name


def gpu_images_per_s(record_path: Path, measured_here: bool = False) -> List[Dict[str, Any]]:
    """Images/s one GPU trains at, per (method, model), from the train-step FLOP ratios of a
    bench/gpu_check.py report (its flop_ratio check); a case it did not measure is estimated
    from the same method at the other size (FLOP ratios move little with width), and says so."""
    if not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    measured = {row["case"].split(":")[0]: {"ratio": row["ratio"], "gemm_flops_per_s": row["matmul_flops_per_s"]}
                for row in record.get("checks", {}).get("flop_ratio", {}).get("rows", [])
                if row.get("status") == "ok" and "ratio" in row}
    gpu = record.get("env", {}).get("gpu", "GPU")
    source = (f"measured in this run on an {gpu}" if measured_here else
              f"measured by bench/gpu_check.py on an {gpu} on {str(record.get('started', '?'))[:10]} "
              f"({record_path.name}), not in this run")
    rows = []
    for method, recipe in MODEL_CASES:
        got, how = measured.get(recipe), source
        if got is None:
            other = next((m for meth, m in MODEL_CASES if meth == method and m != recipe and m in measured), None)
            if other is None:
                continue
            got, how = measured[other], f"estimated with {other}'s ratio, {source}"
        flops, model = flops_per_image(recipe)
        rows.append({"method": method, "recipe": recipe, "model": model, "train_flops_per_image": flops,
                     "flop_ratio": got["ratio"], "gemm_flops_per_s": got["gemm_flops_per_s"],
                     "gpu_img_per_s": got["ratio"] * got["gemm_flops_per_s"] / flops, "source": how})
    return rows


def measure_flop_ratios() -> Path:
    """bench/gpu_check.py's flop_ratio check on this GPU (OCL ViT-B/L, MAE ViT-B); its JSON's path."""
    out = Path(tempfile.mkdtemp()) / "flop_ratio.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_check", "--only", "flop_ratio", "--budget-s", "240",
                    "--json", str(out)], cwd=REPO, check=False)
    return out


def cores_per_gpu_table(rows: List[Dict[str, Any]], per_core: Dict[str, Dict[str, float]]) -> List[str]:
    """Markdown: per (method, model), the cores per GPU each CPU path needs; fills row["cores_per_gpu"]."""
    columns = [(kind, path) for kind in per_core for path in ("previous", "cpu", "indexed", "gpu_workers", "gpu")
               if path in per_core[kind]]
    lines = ["| method | model | train GFLOP / image | FLOP ratio | GPU img/s | " +
             " | ".join(f"cores/GPU, {kind}, {path}" for kind, path in columns) + " | source |",
             "|---|---|---|---|---|" + "---|" * len(columns) + "---|"]
    for row in rows:
        row["cores_per_gpu"] = {kind: {path: row["gpu_img_per_s"] / v for path, v in paths.items()}
                                for kind, paths in per_core.items()}
        lines.append(f"| {row['method']} | {row['model']} | {row['train_flops_per_image'] / 1e9:.1f} | "
                     f"{row['flop_ratio']:.3f} | {row['gpu_img_per_s']:.0f} | " +
                     " | ".join(f"{row['cores_per_gpu'][kind][path]:.1f}" for kind, path in columns) +
                     f" | {row['source']} |")
    return lines


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="images per shard set")
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (cores) per path")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per path; the best counts")
    parser.add_argument("--kinds", default="pre_resized,full_size", help=f"shard sets, from {','.join(JPEG_SIZES)}")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--no-gpu-table", action="store_true", help="skip the cores-per-GPU table")
    parser.add_argument("--gpu-results", type=Path, default=GPU_RESULTS,
                        help="a bench/gpu_check.py JSON whose flop_ratio rows give the GPU's train-step speed")
    parser.add_argument("--gpu-results-from-this-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help="where to write shards (default: a temporary directory)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kinds.split(",") if k not in JPEG_SIZES] + \
        [p for p in args.paths.split(",") if p not in PATHS]
    if unknown:
        parser.error(f"unknown --kinds / --paths value(s) {', '.join(unknown)}; kinds: {', '.join(JPEG_SIZES)}; "
                     f"paths: {', '.join(PATHS)}")
    if not args.no_gpu_table and not args.gpu_results.is_file():
        parser.error(f"--gpu-results {args.gpu_results}: no such file; expected a bench/gpu_check.py JSON "
                     "(or --no-gpu-table)")
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; so does the main process here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = gpu_decode_problem(device)
    paths = [p for p in args.paths.split(",") if p != "gpu" or problem is None]
    results: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                               "batch_size": args.batch_size, "img_size": IMG_SIZE, "workers": args.workers,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "kinds": {},
                               "gpu_decode": "run" if "gpu" in paths else f"skipped: {problem}",
                               "device_input_ms_per_image_cpu": device_input_ms(args.batch_size)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.dir or tmp)
        for seed, kind in enumerate(args.kinds.split(",")):
            size = JPEG_SIZES[kind]
            root = base / kind
            t = time.perf_counter()
            nbytes = write_shards(root, args.images, size, args.per_shard, seed, unique=16 if kind == "large" else 64)
            print(f"{kind}: wrote {args.images} images {size[0]}x{size[1]} ({nbytes / args.images / 1024:.0f} KiB "
                  f"each) in {time.perf_counter() - t:.1f}s", flush=True)
            runs: Dict[str, List[Dict[str, Any]]] = {p: [] for p in paths}
            for _ in range(args.repeats):
                for path in paths:
                    runs[path].append(time_path(path, root, args.workers, args.batch_size, device))
            best = {}
            for path, rs in runs.items():
                top = max(rs, key=lambda r: r["img_per_s"])
                best[path] = {**top, "img_per_worker_cpu_s": max(r["img_per_worker_cpu_s"] for r in rs),
                              "img_per_s_all_runs": [r["img_per_s"] for r in rs]}
            for path, r in best.items():
                r["vs_previous"] = r["img_per_s"] / best["previous"]["img_per_s"] if "previous" in best else None
                r["vs_plain_webdataset"] = (r["img_per_s"] / best["plain_webdataset"]["img_per_s"]
                                            if "plain_webdataset" in best else None)
            results["kinds"][kind] = {"size": size, "kib_per_image": nbytes / args.images / 1024, "paths": best,
                                      "dct_scales": decode_scales(root)}

    lines = ["\n| shards | path | img/s per core | img / worker-CPU-s | vs previous | vs plain webdataset | "
             "host bytes / image |", "|---|---|---|---|---|---|---|"]
    for kind, r in results["kinds"].items():
        for path, p in r["paths"].items():
            vs = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
            lines.append(f"| {kind} {r['size'][0]}x{r['size'][1]} | {path} | {p['img_per_s_per_core']:.0f} | "
                         f"{p['img_per_worker_cpu_s']:.0f} | {vs(p['vs_previous'])} | {vs(p['vs_plain_webdataset'])} | "
                         f"{p['host_bytes_per_image'] / 1024:.0f} KiB |")
        lines.append(f"| {kind} | DCT scale used by `cpu` | " + ", ".join(
            f"{k}: {v:.0%}" for k, v in r["dct_scales"].items()) + " | | | | |")
    print("\n".join(lines))
    print(f"\nuint8 -> normalised float on this CPU: {results['device_input_ms_per_image_cpu']:.3f} ms per image "
          "(on the device inside the step; not in the worker numbers above)")

    if not args.no_gpu_table:
        record, measured_here = args.gpu_results, args.gpu_results_from_this_run
        if device.type == "cuda" and not measured_here:  # measure the train-step FLOP ratios on this GPU
            record, measured_here = measure_flop_ratios(), True
        rows = gpu_images_per_s(record, measured_here=measured_here)
        per_core = {kind: {path: p["img_per_s_per_core"] for path, p in r["paths"].items()}
                    for kind, r in results["kinds"].items()}
        print("\n" + "\n".join(cores_per_gpu_table(rows, per_core)) if rows else
              f"\nno cores-per-GPU table: {args.gpu_results} holds no train-step FLOP ratios")
        results["cores_per_gpu"] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
