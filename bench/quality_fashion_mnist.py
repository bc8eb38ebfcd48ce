"""Does OCL (or MAE, --recipe) learn on real images, on this machine's CPU, in minutes? Fashion-MNIST quality check.

Pre-trains OCL with recipes/ocl_fashion_mnist_cpu.yaml (MAE: --recipe recipes/mae_fashion_mnist_cpu.yaml) on the Fashion-MNIST train shards and
keeps checkpoints at about 5, 15 and 30 minutes of training wall-clock (`--budgets`). The run
is one cosine schedule sized for the largest budget (a short timing run measures s/step first),
cut into segments that resume exactly (`train.resume=auto`); each segment's step count is
recomputed from the time the previous segments really took, so a busy machine still stops
near the budget. Evaluation happens after all training, so it never competes with it.

Every checkpoint, and two baselines, are evaluated on the test split (10k) with the train
split (60k) as bank / probe training set, all un-augmented:

- kNN: weighted k-NN, k = 20, T = 0.07, on L2-normalised CLS features (scale.eval.knn);
- linear probe: BN + linear, LARS (recipes/linprobe_fashion_mnist_cpu.yaml) on cached features;
- baselines: raw pixels ([0, 1], flattened; the probe's BatchNorm standardises them) and the
  randomly initialised encoder (the very init the run starts from).

Prints a markdown table and writes JSON.

    python -m bench.quality_fashion_mnist                        # 5 / 15 / 30 min: ~35 min in all
    python -m bench.quality_fashion_mnist --budgets 0.5 1 --max-train-samples 10000   # a smoke run
    python -m bench.quality_fashion_mnist mask.ratio=0.5 optim.blr=3e-3               # recipe overrides
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional, Sequence

import torch

from bench.common import REPO, log
from scale.config import ConfigError, RunConfig, load_config, to_dict
from scale.eval.baselines import PixelEncoder, random_init_encoder
from scale.engine import plan_batch
from scale.eval.config import LinearProbeRecipe, load_recipe
from scale.eval.features import Features, build_split, encoder_from_checkpoint, extract_features
from scale.eval.knn import build_monitors, knn_accuracy
from scale.eval.linear_probe import cached_batches, train_probe_head
from scale.models import model_spec
from scale.trainer import Trainer, plan_run, train_until

RECIPE = REPO / "recipes/ocl_fashion_mnist_cpu.yaml"
PROBE_RECIPE = REPO / "recipes/linprobe_fashion_mnist_cpu.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TIMING_WARMUP_STEPS = 2  # the timing run's first steps start the loader and allocate: not the pace


def ensure_shards(data_dir: Path) -> None:
    if (data_dir / "train" / "manifest.json").is_file() and (data_dir / "test" / "manifest.json").is_file():
        return
    if not FASHION_MNIST.is_dir():
        sys.exit(f"no shards in {data_dir} and no {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    log(f"converting Fashion-MNIST to WebDataset shards in {data_dir}")
    subprocess.run([sys.executable, "-m", "data_prep.fashion_mnist_to_wds", "--src", str(FASHION_MNIST),
                    "--out", str(data_dir)], check=True, cwd=REPO)


# ----------------------------------------------------------------------------- training

def method_name(args: argparse.Namespace) -> str:
    """The run's objective (ocl, mae, ...): names its run folder and its table rows."""
    return load_config(args.recipe, args.overrides).objective.name


def run_config(args: argparse.Namespace, output_dir: Path, *extra: str) -> RunConfig:
    data = Path(args.data_dir).resolve()
    return load_config(args.recipe, [f"data.root={data / 'train'}", f"data.val_root={data / 'test'}",
                                f"train.output_dir={output_dir}", "train.ckpt_every=1000000000",
                                "train.device=cpu",
                                *args.overrides, *extra])


def monitors(cfg: RunConfig) -> list:
    """The monitors `python -m scale.train` gives the trainer (eval.knn_every_epochs, e.g. from an
    override; the recipe sets none)."""
    return build_monitors(cfg, model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans))


def seconds_per_step(args: argparse.Namespace) -> float:
    """Median wall time of a step (data wait included) over a short throwaway run."""
    out = Path(args.out_dir) / "timing"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends: start clean
    cfg = run_config(args, out, f"train.max_steps={args.timing_steps}", "train.log_every=1")
    Trainer(cfg, monitors=monitors(cfg)).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batch = plan_batch(cfg.train, 1).global_batch
    per_step = [batch / r["img_per_s"] for r in records if "img_per_s" in r][TIMING_WARMUP_STEPS:]
    if not per_step:
        sys.exit(f"the timing run logged no step past the warm-up ({out / 'metrics.jsonl'})")
    return median(per_step)


def pretrain(args: argparse.Namespace) -> Dict[str, Any]:
    run_dir = Path(args.out_dir) / method_name(args)
    load_before = os.getloadavg()[0]  # anything else running shortens the schedule and the step counts
    log(f"load average before training: {load_before:.2f} on {os.cpu_count()} cores")
    sec = timing_sec = seconds_per_step(args)
    probe = run_config(args, run_dir)
    steps_per_epoch = plan_run(probe).length.steps_per_epoch
    planned_steps = max(args.budgets) * 60 / sec
    epochs = max(1, math.ceil(planned_steps / steps_per_epoch))
    log(f"timing: {sec:.2f} s/step -> {max(args.budgets)} min is ~{planned_steps:.0f} steps; schedule: "
        f"{epochs} epochs of {steps_per_epoch} steps")
    trained_s, step, checkpoints, latest = 0.0, 0, [], None
    total_steps = epochs * steps_per_epoch
    for budget in sorted(args.budgets):
        # Segments of at most --replan-min minutes, each planned from the speed the last one measured,
        # so a machine that slows down (or speeds up) mid-budget still stops near the budget.
        # Resuming is exact, so the segments add up to one uninterrupted run.
        summary = None
        while step < total_steps:
            remaining = budget * 60 - trained_s
            if remaining < 0.5 * sec and step > 0:
                break
            steps = max(1, round(min(remaining, args.replan_min * 60) / sec))
            cfg = run_config(args, run_dir, f"train.epochs={epochs}", "train.log_every=20", "train.keep_last=2")
            segment = train_until(cfg, step + steps, monitors(cfg))  # its set-up is not training time
            segment.trainer.engine.close()
            summary = segment.summary
            if summary.steps_done:
                sec = segment.seconds / summary.steps_done
            trained_s += segment.seconds
            step, latest = summary.final_step, summary.last_checkpoint
        # Keep the budget's checkpoint out of the rotating checkpoints/ directory.
        kept = run_dir / f"budget_{budget:g}min"
        shutil.copytree(latest, kept)
        checkpoints.append({"budget_min": budget, "trained_min": trained_s / 60, "step": step,
                            "epoch": step / steps_per_epoch, "checkpoint": str(kept),
                            "last_loss": summary.losses[-1] if summary and summary.losses else None})
        log(f"budget {budget:g} min: step {step} after {trained_s / 60:.2f} min of training -> {kept}")
    return {"load_average_before": load_before, "seconds_per_step_timing": timing_sec,
            "seconds_per_step_last": sec, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "checkpoints": checkpoints,
            "config": to_dict(run_config(args, run_dir, f"train.epochs={epochs}"))}


# ----------------------------------------------------------------------------- evaluation

def score(name: str, train: Features, test: Features, probe: LinearProbeRecipe, extra: Dict[str, Any]) -> Dict:
    started = time.perf_counter()
    knn = knn_accuracy(train, test, k=20, temperature=0.07)
    batches, steps = cached_batches(train, probe.probe.global_batch, probe.probe.seed)
    linear = train_probe_head(batches, steps, train[0].shape[1], test, probe.probe, torch.device("cpu"),
                              progress=False, desc=f"probe {name}", log=lambda m: None, single_thread=True)
    row = {"name": name, **extra, "knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": linear["top1"],
           "linear_top5": linear["top5"], "linear_history": linear["history"],
           "eval_seconds": time.perf_counter() - started}
    log(f"{name}: kNN top-1 {knn['top1']:.2f}% | linear top-1 {linear['top1']:.2f}%")
    return row


def evaluate(args: argparse.Namespace, training: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    cfg = run_config(args, Path(args.out_dir) / method_name(args))
    data = Path(args.data_dir).resolve()
    probe = load_recipe(LinearProbeRecipe, PROBE_RECIPE, [f"data.root={data / 'train'}",
                                                          f"data.val_root={data / 'test'}", *args.probe_overrides])
    random_encoder = random_init_encoder(cfg)  # the Trainer's init: the random baseline is where the run starts
    spec = random_encoder.spec
    train_split, test_split = build_split(cfg.data, spec, train=True), build_split(cfg.data, spec, train=False)
    cpu = torch.device("cpu")
    n = args.max_train_samples

    def encode(encoder) -> tuple:
        common = dict(device=cpu, batch_size=512, num_workers=cfg.data.num_workers, progress=not args.no_progress)
        return (extract_features(encoder, train_split, max_samples=n, desc="train features", **common),
                extract_features(encoder, test_split, desc="test features", **common))

    rows = []
    if not args.skip_baselines:
        rows.append(score("raw pixels", *encode(PixelEncoder(cfg.data.mean, cfg.data.std)),
                          probe, {"trained_min": None, "step": None}))
        rows.append(score("random init", *encode(random_encoder), probe, {"trained_min": 0.0, "step": 0}))
    for ckpt in (training or {}).get("checkpoints", []):
        encoder, _ = encoder_from_checkpoint(ckpt["checkpoint"], cfg.model, cpu, "auto")
        rows.append(score(f"{method_name(args).upper()} {ckpt['budget_min']:g} min", *encode(encoder), probe,
                          {"trained_min": ckpt["trained_min"], "step": ckpt["step"], "epoch": ckpt["epoch"]}))
    return rows


def markdown(rows: List[Dict[str, Any]], bank: int) -> str:
    lines = [f"| encoder | training (min) | step | kNN top-1 (k=20, {bank} bank) | linear probe top-1 |",
             "|---|---|---|---|---|"]
    for r in rows:
        minutes = "-" if r["trained_min"] is None else f"{r['trained_min']:.1f}"
        step = "-" if r["step"] is None else str(r["step"])
        lines.append(f"| {r['name']} | {minutes} | {step} | {r['knn_top1']:.2f}% | {r['linear_top1']:.2f}% |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", type=Path, default=RECIPE,
                        help="pre-training recipe (default: OCL's; recipes/mae_fashion_mnist_cpu.yaml for MAE)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 15.0, 30.0],
                        help="minutes of training at which to keep a checkpoint (default: 5 15 30)")
    parser.add_argument("--data-dir", default=str(REPO / "data/fashion-mnist-wds"))
    parser.add_argument("--out-dir", default=str(REPO / "runs/quality_fashion_mnist"))
    parser.add_argument("--json", default=None, help="results JSON (default: OUT_DIR/quality.json)")
    parser.add_argument("--timing-steps", type=int, default=24,
                        help="steps of the throwaway run that sizes the schedule; the median of the steps "
                             f"after the first {TIMING_WARMUP_STEPS} is used, so a few seconds of load "
                             "elsewhere do not shorten the schedule")
    parser.add_argument("--replan-min", type=float, default=2.0,
                        help="longest training segment between speed re-measurements (minutes)")
    parser.add_argument("--max-train-samples", type=int, default=0,
                        help="kNN bank / probe training set size (0: all 60k)")
    parser.add_argument("--probe", dest="probe_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="linear-probe recipe override, e.g. --probe probe.epochs=10")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--skip-training", action="store_true", help="evaluate the baselines only")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="evaluate the OCL checkpoints only (for sweeps over recipe overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pre-training recipe overrides")
    args = parser.parse_args(argv)
    try:  # the recipe and overrides, checked before any work (a missing or broken recipe is one line)
        method_name(args)
    except ConfigError as err:
        parser.error(f"--recipe {args.recipe}: {err}")
    try:
        load_recipe(LinearProbeRecipe, PROBE_RECIPE, args.probe_overrides)
    except ConfigError as err:
        parser.error(f"--probe {' '.join(args.probe_overrides)}: {err}")
    if args.skip_training and args.skip_baselines:
        parser.error("--skip-training and --skip-baselines together leave nothing to evaluate")
    if args.timing_steps <= TIMING_WARMUP_STEPS:
        parser.error(f"--timing-steps {args.timing_steps}: the first {TIMING_WARMUP_STEPS} steps are warm-up; "
                     f"use {TIMING_WARMUP_STEPS + 1} or more (default 24)")
    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", os.cpu_count() or 1)))
    ensure_shards(Path(args.data_dir))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if (Path(args.out_dir) / method_name(args) / "checkpoints").exists() and not args.skip_training:
        sys.exit(f"{args.out_dir}/{method_name(args)} already holds a run; pick another --out-dir "
                 "(budgets count from step 0)")

    started = time.perf_counter()
    training = None if args.skip_training else pretrain(args)
    rows = evaluate(args, training)
    bank = args.max_train_samples or 60000
    table = markdown(rows, bank)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "budgets_min": args.budgets, "training": training, "rows": rows,
              "probe_recipe": to_dict(load_recipe(LinearProbeRecipe, PROBE_RECIPE, args.probe_overrides)),
              "total_seconds": time.perf_counter() - started, "table": table}
    out = Path(args.json) if args.json else Path(args.out_dir) / "quality.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table + "\n")
    print(f"results: {out} ({result['total_seconds'] / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
