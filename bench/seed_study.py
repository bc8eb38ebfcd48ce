"""Several methods x several seeds at one equal training budget, on Fashion-MNIST: mean and spread.

Each (method, seed) is one `bench/quality_fashion_mnist.py` run in its own process (its timing run,
a training run cut at `--budget` minutes of training wall-clock, then kNN and linear-probe evaluation
of that checkpoint); this script only chooses the runs and summarises their JSON. A study is a list of
(name, recipe, overrides); `--study asl` is issue 15's: MAE vs ASL, plus the ablations AEE without
alignment and cosine alignment.

    python bench/seed_study.py --study asl --seeds 0 1 2 --budget 3 --out-dir runs/study_asl
    python bench/seed_study.py --study asl --only "MAE" "ASL (AEE, L1)" --seeds 0   # a subset

Runs already done (their quality.json exists) are not repeated, so an interrupted study continues.
Prints a markdown table: per method, n seeds, kNN top-1 and linear-probe top-1 as mean +- sample std
(min..max), steps reached; and writes OUT_DIR/study.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
QUALITY = REPO / "bench/quality_fashion_mnist.py"

Method = Tuple[str, str, Tuple[str, ...]]  # (name, recipe, recipe overrides)
STUDIES: Dict[str, List[Method]] = {
    "asl": [
        ("MAE", "mae_fashion_mnist_cpu", ()),
        ("ASL (AEE, L1)", "asl_fashion_mnist_cpu", ()),
        ("AEE without alignment", "asl_fashion_mnist_cpu", ("objective.asl.align_weight=0",)),
        ("ASL (AEE, cosine)", "asl_fashion_mnist_cpu", ("objective.asl.align_loss=cosine",)),
    ],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_one(name: str, recipe: str, overrides: Sequence[str], seed: int, args: argparse.Namespace) -> Dict:
    out = Path(args.out_dir) / f"{slug(name)}_seed{seed}"
    result = out / "quality.json"
    if not result.is_file():
        cmd = [sys.executable, str(QUALITY), "--recipe", recipe, "--budgets", str(args.budget), "--skip-baselines",
               "--no-progress", "--out-dir", str(out), "--data-dir", args.data_dir,
               "--max-train-samples", str(args.max_train_samples), *overrides, f"train.seed={seed}"]
        print(f"# {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"{name} seed {seed}: quality_fashion_mnist.py exited {done.returncode}")
    row = json.loads(result.read_text())["rows"][-1]
    return {"method": name, "seed": seed, "knn_top1": row["knn_top1"], "linear_top1": row["linear_top1"],
            "step": row["step"], "trained_min": row["trained_min"]}


def spread(values: List[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {std:.2f} ({min(values):.2f}..{max(values):.2f})"


def table(rows: List[Dict], budget: float, bank: int) -> str:
    lines = [f"| method ({budget:g} min of training each) | seeds | kNN top-1 (k=20, {bank} bank) | "
             "linear probe top-1 | steps |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        steps = sorted(r["step"] for r in mine)
        lines.append(f"| {name} | {len(mine)} | {spread([r['knn_top1'] for r in mine])} | "
                     f"{spread([r['linear_top1'] for r in mine])} | {steps[0]}..{steps[-1]} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="a subset of the study's methods, by name")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=3.0, help="minutes of training per run")
    parser.add_argument("--max-train-samples", type=int, default=20000, help="kNN bank / probe training set")
    parser.add_argument("--data-dir", default=str(REPO / "data/fashion-mnist-wds"))
    parser.add_argument("--out-dir", default=str(REPO / "runs/seed_study"))
    args = parser.parse_args(argv)
    methods = STUDIES[args.study]
    if args.only:
        unknown = set(args.only) - {m[0] for m in methods}
        if unknown:
            parser.error(f"--only {', '.join(sorted(unknown))}: not in study {args.study!r} "
                         f"({', '.join(m[0] for m in methods)})")
        methods = [m for m in methods if m[0] in args.only]
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be > 0 minutes")
    rows = [run_one(name, recipe, overrides, seed, args) for seed in args.seeds for name, recipe, overrides in methods]
    text = table(rows, args.budget, args.max_train_samples or 60000)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "study.json").write_text(json.dumps({"budget_min": args.budget, "rows": rows,
                                                               "table": text}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
