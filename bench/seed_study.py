"""Several methods x several seeds at one equal training budget, on Fashion-MNIST: mean and spread.

The budget is a number of epochs (`--epochs`), the same for every method, as the papers compare
(ASL vs MAE at equal epochs): on a shared 2-core machine a wall-clock budget would measure the
neighbours' load as much as the method (the wall-clock budget of one method at a time is
bench/quality_fashion_mnist.py's). Each run's training minutes are reported beside its accuracy,
so the cost is visible. Each (method, seed) trains in this process (`Trainer.fit`), then its final
encoder is scored exactly as bench/quality_fashion_mnist.py scores a checkpoint: weighted kNN
(k = 20) and the linear probe (recipes/linprobe_fashion_mnist_cpu.yaml) on the test split, with
`--max-train-samples` training images as bank / probe set. A study is a list of (name, recipe,
overrides); `--study asl` is issue 15's: MAE vs ASL, plus the ablations AEE without alignment and
cosine alignment. Seeds are the outer loop, so every method sees the machine's same moods.

    python -m bench.seed_study --study asl --seeds 0 1 2 --epochs 2 --out-dir runs/study_asl
    python -m bench.seed_study --study asl --only "MAE" "ASL (AEE, L1)" --seeds 0   # a subset
    python -m bench.seed_study --study ehm --seeds 0 1 2 --epochs 1 --train-shards 'train-{000000..000003}.tar' \
        --out-dir runs/study_ehm   # issue 16: EHM vs random / grid / fixed-depth masks (MAE), EHM for OCL
    python -m bench.seed_study --study methods --epochs 2 --train-shards 'train-{000000..000003}.tar' \
        --out-dir runs/study_methods   # issue 18's methods (bench/methods_fashion_mnist.py: + curves, fine-tunes, cost)

Runs already done (their result.json exists) are not repeated, so an interrupted study continues,
and the table covers every finished run of the study in OUT_DIR. Prints a markdown table: per
method, n seeds, kNN top-1 and linear-probe top-1 as mean +- sample std (min..max), minutes of
training; and writes OUT_DIR/study.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from bench import quality_fashion_mnist
from bench.common import REPO
from scale.config import ConfigError, RunConfig, load_config
from scale.errors import run_command
from scale.eval.config import LinearProbeRecipe, load_recipe
from scale.eval.features import Features, build_split, extract_features
from scale.models import ViTSpec
from scale.trainer import Trainer

Method = Tuple[str, str, Tuple[str, ...]]  # (name, recipe, recipe overrides)
# EHM's depth from the step fraction: runs here are one or two epochs, and with the paper's epoch
# fraction d would stay 1. OCL's two views capped at 0.8 H (near the root only 2-5 parts remain).
EHM_BY_STEP = "mask.ehm.progress=step"
OCL_EHM = (EHM_BY_STEP, "mask.ehm.max_depth=0.8")
STUDIES: Dict[str, List[Method]] = {
    "asl": [
        ("MAE", "mae_fashion_mnist_cpu", ()),
        ("ASL (AEE, L1)", "asl_fashion_mnist_cpu", ()),
        ("AEE without alignment", "asl_fashion_mnist_cpu", ("objective.asl.align_weight=0",)),
        ("ASL (AEE, cosine)", "asl_fashion_mnist_cpu", ("objective.asl.align_loss=cosine",)),
    ],
    # Issue 16: EHM vs static masks with MAE, and EHM's two OCL layouts vs OCL's random split. Patch 4
    # (49 patches, a tree worth cutting); depth from the step fraction, as runs here are one or two epochs.
    "ehm": [
        ("MAE random r=0.75", "mae_fashion_mnist_cpu", ("mask.name=random",)),
        ("MAE EHM r=0.75", "mae_fashion_mnist_cpu", ("mask.name=ehm", EHM_BY_STEP)),
        ("MAE random r=0.25", "mae_fashion_mnist_cpu", ("mask.name=random", "mask.ratio=0.25")),
        ("MAE EHM r=0.25", "mae_fashion_mnist_cpu", ("mask.name=ehm", "mask.ratio=0.25", EHM_BY_STEP)),
        ("MAE EHM fixed shallow (0.2 H)", "mae_fashion_mnist_cpu",
         ("mask.name=ehm", "mask.ehm.depth=fixed", "mask.ehm.fixed_depth=0.2")),
        ("MAE grid-like", "mae_fashion_mnist_cpu", ("mask.name=grid",)),
        ("OCL random", "ocl_fashion_mnist_cpu", ("mask.name=random_two_group",)),
        ("OCL EHM two-group (cap 0.8 H)", "ocl_fashion_mnist_cpu", ("mask.name=ehm_two_group", *OCL_EHM)),
        ("OCL EHM drop + random split (cap 0.8 H)", "ocl_fashion_mnist_cpu",
         ("mask.name=ehm_drop_two_group", *OCL_EHM)),
        # Not in the paper: trees from attention-row similarity (symmetrised attention chains, docs/methods.md).
        ("MAE EHM r=0.75, attention-row similarity", "mae_fashion_mnist_cpu",
         ("mask.name=ehm", EHM_BY_STEP, "mask.ehm.similarity=attention_rows")),
    ],
    # Issue 18: every method at equal steps on one encoder (bench/methods_fashion_mnist.py runs it with
    # intermediate kNN points, fine-tunes and costs; here it runs at equal epochs like the others).
    "methods": [
        ("OCL", "ocl_fashion_mnist_cpu", ("mask.name=random_two_group",)),
        ("OCL + EHM two-group", "ocl_fashion_mnist_cpu", ("mask.name=ehm_two_group", *OCL_EHM)),
        ("OCL + EHM drop + random split", "ocl_fashion_mnist_cpu", ("mask.name=ehm_drop_two_group", *OCL_EHM)),
        ("MAE", "mae_fashion_mnist_cpu", ("mask.name=random",)),
        ("MAE + EHM", "mae_fashion_mnist_cpu", ("mask.name=ehm", EHM_BY_STEP)),
        ("ASL (AEE)", "asl_fashion_mnist_cpu", ("mask.name=random",)),
        ("ASL (AEE) + EHM", "asl_fashion_mnist_cpu", ("mask.name=ehm", EHM_BY_STEP)),
        # The EHM paper's largest gain is at low mask ratios (Table 3: 77.19 -> 78.96 at r = 0.25).
        ("MAE r=0.25", "mae_fashion_mnist_cpu", ("mask.name=random", "mask.ratio=0.25")),
        ("MAE + EHM r=0.25", "mae_fashion_mnist_cpu", ("mask.name=ehm", "mask.ratio=0.25", EHM_BY_STEP)),
    ],
}
# Overrides every run of a study shares (its protocol), before the method's own.
STUDY_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "asl": (),
    "ehm": ("model.name=vit_tiny_patch4_28", "optim.warmup_epochs=0.2"),
    "methods": ("model.name=vit_tiny_patch4_28",),  # patch 4: 49 patches, a tree worth cutting
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def train_root(args: argparse.Namespace) -> Path:
    """DATA_DIR/train, or the `--train-shards` pattern inside it."""
    data = Path(args.data_dir).resolve()
    return data / "train" / args.train_shards if args.train_shards else data / "train"


def run_config(args: argparse.Namespace, recipe: str, output_dir: Path, *overrides: str) -> RunConfig:
    """A study run's config: the training shards, the test split, CPU, no periodic checkpoints, then `overrides`."""
    test_root = Path(args.data_dir).resolve() / "test"
    return load_config(recipe, [f"data.root={train_root(args)}", f"data.val_root={test_root}",
                                f"train.output_dir={output_dir}", "train.device=cpu", "train.log_every=50",
                                "train.ckpt_every=1000000000", *overrides])


def encode_splits(encoder: torch.nn.Module, cfg: RunConfig, bank: int, queries: int = 0,
                  spec: Optional[ViTSpec] = None) -> Tuple[Features, Features]:
    """Un-augmented CLS features of the first `bank` training images (the kNN bank / probe training
    set; 0: all) and of the first `queries` test images (0: all), as the quality bench encodes them.
    `spec`: the images' geometry, for an encoder without one (raw pixels); default the encoder's."""
    spec = spec or encoder.spec
    common = dict(device=torch.device("cpu"), batch_size=512, num_workers=cfg.data.num_workers, progress=False)
    return (extract_features(encoder, build_split(cfg.data, spec, train=True), max_samples=bank,
                             desc="train features", **common),
            extract_features(encoder, build_split(cfg.data, spec, train=False), max_samples=queries,
                             desc="test features", **common))


def probe_recipe(args: argparse.Namespace) -> LinearProbeRecipe:
    """The quality bench's linear probe on DATA_DIR, with `args.probe` overrides when a bench has them."""
    data = Path(args.data_dir).resolve()
    return load_recipe(LinearProbeRecipe, quality_fashion_mnist.PROBE_RECIPE,
                       [f"data.root={data / 'train'}", f"data.val_root={data / 'test'}", *getattr(args, "probe", ())])


def run_one(name: str, recipe: str, overrides: Sequence[str], seed: int, args: argparse.Namespace) -> Dict:
    out = Path(args.out_dir) / f"{slug(name)}_seed{seed}"
    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    overrides = [*STUDY_SETTINGS[args.study], *overrides]
    cfg = run_config(args, recipe, out / "run", f"train.epochs={args.epochs}", *overrides, f"train.seed={seed}")
    print(f"# {name} seed {seed}: {recipe} {' '.join(overrides)}, {args.epochs} epochs", flush=True)
    trainer = Trainer(cfg)
    started = time.perf_counter()
    summary = trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    encoder = trainer.encoder_for_eval()
    trainer.engine.close()
    row = quality_fashion_mnist.score(f"{name} seed {seed}", *encode_splits(encoder, cfg, args.max_train_samples),
                                probe_recipe(args), {})
    record = {"method": name, "seed": seed, "recipe": recipe, "overrides": list(overrides), "epochs": args.epochs,
              "train_shards": args.train_shards or "all",
              "step": summary.final_step, "trained_min": minutes, "final_loss": summary.losses[-1],
              "knn_top1": row["knn_top1"], "linear_top1": row["linear_top1"]}
    result.write_text(json.dumps(record, indent=1) + "\n")
    return record


def spread(values: List[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {std:.2f} ({min(values):.2f}..{max(values):.2f})"


def table(rows: List[Dict], budget: float, bank: int, shards: str = "") -> str:
    on = f" of {shards}" if shards else ""
    lines = [f"| method ({budget:g} epochs{on} each) | seeds | kNN top-1 (k=20, {bank} bank) | "
             "linear probe top-1 | training min (mean) |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        lines.append(f"| {name} | {len(mine)} | {spread([r['knn_top1'] for r in mine])} | "
                     f"{spread([r['linear_top1'] for r in mine])} | "
                     f"{statistics.fmean(r['trained_min'] for r in mine):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="a subset of the study's methods, by name")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of training per run (the equal budget)")
    parser.add_argument("--max-train-samples", type=int, default=20000, help="kNN bank / probe training set")
    parser.add_argument("--data-dir", default=str(REPO / "data/fashion-mnist-wds"))
    parser.add_argument("--train-shards", default="", metavar="PATTERN",
                        help="train on these shards of DATA_DIR/train only, e.g. 'train-{000000..000003}.tar' "
                             "(20,000 images); default all")
    parser.add_argument("--out-dir", default=str(REPO / "runs/seed_study"))
    args = parser.parse_args(argv)
    methods = STUDIES[args.study]
    if args.only:
        unknown = set(args.only) - {m[0] for m in methods}
        if unknown:
            parser.error(f"--only {', '.join(sorted(unknown))}: not in study {args.study!r} "
                         f"({', '.join(m[0] for m in methods)})")
        methods = [m for m in methods if m[0] in args.only]
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: must be >= 1")
    try:  # every recipe and override, before any training
        for _, recipe, overrides in methods:
            load_config(recipe, [*STUDY_SETTINGS[args.study], *overrides])
    except ConfigError as err:
        parser.error(str(err))
    return run_command("seed_study.py", lambda: study(args, methods))


def study(args: argparse.Namespace, methods: List[Method]) -> int:
    """Every (seed, method) run not done yet, then the table over every finished run."""
    for seed in args.seeds:
        for name, recipe, overrides in methods:
            run_one(name, recipe, overrides, seed, args)
    order = {m[0]: i for i, m in enumerate(STUDIES[args.study])}
    rows = sorted((json.loads(p.read_text()) for p in Path(args.out_dir).glob("*_seed*/result.json")),
                  key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    rows = [r for r in rows if r["epochs"] == args.epochs and r.get("train_shards", "all") == (args.train_shards or "all")]
    text = table(rows, args.epochs, args.max_train_samples or 60000, args.train_shards)
    (Path(args.out_dir) / "study.json").write_text(json.dumps({"epochs": args.epochs, "rows": rows,
                                                               "table": text}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
