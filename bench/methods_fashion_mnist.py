"""Every method side by side at equal steps on Fashion-MNIST (issue 18): OCL, OCL + EHM (both layouts),
MAE, MAE + EHM, ASL (AEE), ASL + EHM; several seeds, kNN / linear probe / fine-tune, cost, a figure.

The methods are bench/seed_study.py's `methods` study: one encoder for all (ViT-Ti, patch 4: a 7 x 7 grid
of 49 patches), each method's CPU recipe (ocl_ / mae_ / asl_fashion_mnist_cpu.yaml) with its masks, EHM's
depth from the step fraction (OCL's two views capped at 0.8 H), as the issue-16 study ran them. The
budget is `--steps` optimizer steps of 256 images (the recipes' `train.micro_batch` on one process), the same for every method and
seed; the cosine schedule spans whole epochs of the training shards, so a budget of whole epochs (the
default: 2 epochs of 20,000 images, `--train-shards`) ends at lr 0 and at EHM's full depth. Equal steps,
not equal time: a step costs 1x (MAE) to ~3x (MAE + EHM at r = 0.25) another here, so each run's training minutes are
measured and the figure plots accuracy against them (a wall-clock budget on a shared 2-core machine would
measure the neighbours' load as much as the method: bench/seed_study.py). The equal-time table reads
every method off its own curve at the cheapest method's training minutes (linear between curve points).

Per (method, seed), in this process: training in `--curve-points` segments (thirds by default) that
resume exactly (`train.resume=auto`), and after each segment, not timed as training, a kNN point for the
figure (k = 20, T = 0.07; bank: the first `--curve-bank` training images, queries: the first
`--curve-test` test images; the same protocol at step 0, the untrained encoder). After the last segment,
the quality bench's protocol: weighted kNN (k = 20) and the linear probe
(recipes/linprobe_fashion_mnist_cpu.yaml) on the test split (`--max-test-samples`, default all 10k) with
the first `--max-train-samples` training images as bank / probe set; the figure's last point is read off
the same features. Then, once per study (each cached in OUT_DIR, so never redone):
- reference rows: raw pixels, and the untrained encoder of each init scheme (OCL's, MAE's: seed 0);
- fine-tune (scale/eval/finetune.py, recipes/finetune_fashion_mnist_cpu.yaml: one epoch of the
  pre-training shards with their labels, top-1 on the test split) of each method's best seed by linear
  probe, and of each untrained encoder (the from-scratch reference);
- cost per method: bench/train_step.py's measurement in a fresh process per method: img/s of
  `Trainer.train_step` on a fixed batch (no data loading), its FLOPs (EHM's signal forward included)
  over the best step time, divided by a GEMM's FLOP/s measured in the same process, and the peak
  resident memory; next to it the img/s the real runs reached (data loading and segment starts included).

Resuming: a (method, seed) whose result.json exists is never redone. An interrupted one continues from
its last checkpoint: SIGTERM (or SIGUSR1) makes the trainer save the step it reached and the study stop
(exit 130); Ctrl-C or a kill loses the steps since the end of the last finished segment, which is where
it continues. Training minutes count the segments whose steps the run kept. The budget and protocol are
kept in OUT_DIR/plan.json; another budget in the same OUT_DIR is refused (use another --out-dir). More
seeds or methods later run only the new runs (and redo a fine-tune whose best seed changed).

Writes `--out` (JSON: every run with its curve, the references, fine-tunes, costs, the tables),
`--figure` (PNG: kNN top-1 against training minutes per method, mean over seeds with the min..max band,
and the final linear probe, mean +- std) and prints the markdown tables for docs/results.md.

    python -m bench.methods_fashion_mnist                                   # the study: ~3 h on 2 cores
    python -m bench.methods_fashion_mnist --only MAE "MAE + EHM" --seeds 0  # a subset, same OUT_DIR
    python -m bench.methods_fashion_mnist --steps 12 --seeds 0 --skip-finetune --out-dir runs/methods_smoke \
        --out runs/methods_smoke/methods.json --figure runs/methods_smoke/methods.png   # a smoke run

Time, estimated from 1-thread measurements on this machine (2026-11-30, under another job's load, load
average ~3) divided by the 1.75x that 2 threads give (docs/throughput.md). Step of 256 (fixed batch,
1 thread): OCL 3.2 s, OCL + EHM 3.2 / 3.1 s (two-group / drop), MAE 1.2 s, MAE + EHM 2.5 s, ASL 2.0 s,
ASL + EHM 3.2 s: 18.5 s for one step of every method, ~10.5 s on 2 cores. A real 8-step run
(`--steps 8 --curve-points 2`) took ~200 s of evaluation per run at 1 thread (step 0: ~40 s, a curve
point: ~35 s, the final 30k-image encode + probe: ~130 s). Default run on 2 cores: training 156 steps x
10.5 s x 3 seeds ~ 82 min + segment starts ~5 min; evaluation 21 x ~140 s ~ 48 min; references ~4 min;
9 fine-tunes (7 best seeds, 2 from scratch) x ~2.5 min ~ 23 min; cost ~3 min: ~2.75 h for the first
seven methods on an idle machine, more on a busy one (`--steps 116 --train-shards 'train-{000000..000002}.tar'`,
two epochs of 15k images, saves ~25 min). Measured 2026-11-30 with the two r = 0.25 rows added (9
methods, 27 runs): 101 min of training (74 for the first seven), about 3 h in all with evaluation,
fine-tunes and cost.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench import quality_fashion_mnist, seed_study
from bench.common import REPO, fmt_bytes, log, write_json
from bench.seed_study import Method, encode_splits, probe_recipe, run_config, slug, spread, train_root
from bench.train_step import run_child
from scale.config import ConfigError, RunConfig, load_config
from scale.errors import UserError, report_user_error, run_command
from scale.eval.baselines import PixelEncoder, random_init_encoder
from scale.eval.config import FinetuneRecipe, load_recipe
from scale.eval.features import Features, encoder_from_checkpoint
from scale.eval.finetune import build_classifier, finetune_model, run_finetune
from scale.engine import plan_batch
from scale.eval.knn import knn_accuracy
from scale.trainer import plan_run, train_until

PROG = "methods_fashion_mnist.py"
METHODS: List[Method] = seed_study.STUDIES["methods"]
SETTINGS: Tuple[str, ...] = seed_study.STUDY_SETTINGS["methods"]
FINETUNE_RECIPE = REPO / "recipes/finetune_fashion_mnist_cpu.yaml"
DEFAULT_SHARDS = "train-{000000..000003}.tar"  # 20,000 images: 78 steps of 256 per epoch
PLAN_KEYS = ("steps", "curve_points", "train_shards", "max_train_samples", "max_test_samples", "curve_bank",
             "curve_test", "warmup_frac", "overrides", "probe")


def read_json(path: Path) -> Optional[Any]:
    """The study's own state file, None when absent; a damaged one is a user error naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a JSON file this study wrote ({err.__class__.__name__}); delete it to redo "
                        f"that part, or use another --out-dir") from None


# ----------------------------------------------------------------------------- one run

def curve_steps(steps: int, points: int) -> List[int]:
    """The steps after which a segment ends and a kNN point is taken: 0 (untrained), then `points`
    about equal segments ending at `steps`."""
    return [0, *sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})]


def method_overrides(overrides: Sequence[str], args: argparse.Namespace) -> List[str]:
    return [*SETTINGS, *args.overrides, *overrides]


def schedule(args: argparse.Namespace, recipe: str, overrides: Sequence[str], run_dir: Path) -> Tuple[str, ...]:
    """The overrides that fit the schedule to `--steps`: whole epochs of the training shards (the
    run's own count, from its plan) and a warm-up of `--warmup-frac` of the steps."""
    per_epoch = plan_run(run_config(args, recipe, run_dir, *overrides)).length.steps_per_epoch
    if args.steps % per_epoch:
        log(f"note: --steps {args.steps} is not whole epochs of {per_epoch} steps: the cosine schedule (and EHM's "
            f"depth) spans {math.ceil(args.steps / per_epoch) * per_epoch} steps and is cut at {args.steps}")
    return (f"train.epochs={math.ceil(args.steps / per_epoch)}",
            f"optim.warmup_epochs={args.warmup_frac * args.steps / per_epoch:.6g}")


def knn_point(train: Features, test: Features, bank: int, queries: int) -> float:
    """kNN top-1 (k = 20, T = 0.07) of the first `queries` test features against the first `bank`."""
    (bx, by), (qx, qy) = train, test
    bank = bank or len(bx)
    queries = queries or len(qx)
    return knn_accuracy((bx[:bank], by[:bank]), (qx[:queries], qy[:queries]), k=20, temperature=0.07)["top1"]


class Interrupted(Exception):
    """The trainer stopped on a signal and saved its step: the study stops, to be run again."""


def train_run(name: str, recipe: str, overrides: Sequence[str], seed: int, args: argparse.Namespace) -> Dict:
    """One (method, seed): resumable segments with a kNN point after each, then the final scores."""
    out = Path(args.out_dir) / f"{slug(name)}_seed{seed}"
    result = out / "result.json"
    if result.is_file():
        return read_json(result)
    overrides = method_overrides(overrides, args)
    fixed = (*schedule(args, recipe, overrides, out / "run"), *overrides, f"train.seed={seed}", "train.keep_last=1")
    progress = read_json(out / "progress.json") or {"trained_s": 0.0, "segments": 0, "curve": []}
    log(f"# {name} seed {seed}: {recipe} {' '.join(overrides)}, {args.steps} steps"
        + (f" (continuing: {len(progress['curve'])} curve points done)" if progress["curve"] else ""))
    done = {p["step"] for p in progress["curve"]}
    for target in curve_steps(args.steps, args.curve_points):
        if target in done:
            continue
        cfg = run_config(args, recipe, out / "run", *fixed)
        if target == 0:  # the untrained encoder, as the trainer initialises it
            segment, encoder = None, random_init_encoder(cfg)
        else:
            segment = train_until(cfg, target)
            if segment.summary.steps_done:  # a resume that found the segment done ran no step: no time to add
                progress["trained_s"] += segment.seconds
                progress["segments"] += 1
                progress["final_loss"] = segment.summary.losses[-1]
            write_json(out / "progress.json", progress)
            if segment.summary.preempted:
                segment.trainer.engine.close()
                raise Interrupted(f"{name} seed {seed} stopped at step {segment.summary.final_step} (checkpoint "
                                  f"saved); run the same command to continue")
            encoder = segment.trainer.encoder_for_eval()
        if target == args.steps:
            train, test = encode_splits(encoder, cfg, args.max_train_samples, args.max_test_samples)
            row = quality_fashion_mnist.score(f"{name} seed {seed}", train, test, probe_recipe(args), {})
            progress["final"] = {k: row[k] for k in ("knn_top1", "knn_top5", "linear_top1", "linear_top5")}
        else:
            train, test = encode_splits(encoder, cfg, args.curve_bank, args.curve_test)
        if segment is not None:
            segment.trainer.engine.close()
        progress["curve"].append({"step": target, "trained_min": progress["trained_s"] / 60,
                                  "knn_top1": knn_point(train, test, args.curve_bank, args.curve_test)})
        write_json(out / "progress.json", progress)
        log(f"{name} seed {seed}: step {target}, {progress['trained_s'] / 60:.2f} min of training, "
            f"curve kNN {progress['curve'][-1]['knn_top1']:.2f}%")
    batch = plan_batch(load_config(recipe, overrides).train, 1).global_batch
    record = {"method": name, "seed": seed, "recipe": recipe, "overrides": list(overrides), "steps": args.steps,
              "batch": batch, "train_shards": args.train_shards or "all", "trained_min": progress["trained_s"] / 60,
              "img_per_s": args.steps * batch / max(progress["trained_s"], 1e-9), "segments": progress["segments"],
              "final_loss": progress.get("final_loss"), **progress["final"], "curve": progress["curve"],
              "checkpoint": str(out / "run")}
    write_json(result, record)
    return record


# ----------------------------------------------------------------------------- once per study

def cached(path: Path, key: Dict[str, Any], compute: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """`compute()`'s result, kept in `path` with `key`; computed again only when the key changed."""
    kept = read_json(path)
    if kept is not None and kept.get("key") == key:
        return kept["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def finetune_recipe(args: argparse.Namespace) -> FinetuneRecipe:
    """recipes/finetune_fashion_mnist_cpu.yaml on the pre-training shards (now with labels) and the test split."""
    return load_recipe(FinetuneRecipe, FINETUNE_RECIPE, [
        f"data.root={train_root(args)}", f"data.val_root={Path(args.data_dir).resolve() / 'test'}", *args.finetune])


def finetune_summary(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: result[k] for k in ("top1", "top5", "steps", "lr", "seconds") if k in result}


def references(args: argparse.Namespace, methods: List[Method]) -> List[Dict[str, Any]]:
    """Raw pixels and the untrained encoder of each init scheme among `methods` (seed 0), scored as
    the runs are (kNN, linear probe, the figure's kNN), the untrained ones also fine-tuned (from scratch)."""
    unused = Path(args.out_dir) / "unused"
    configs = [(name, run_config(args, recipe, unused, *method_overrides(overrides, args), "train.seed=0"))
               for name, recipe, overrides in methods]
    key = {k: getattr(args, k) for k in PLAN_KEYS}

    def score(name: str, encoder: torch.nn.Module, cfg: RunConfig, spec: Any) -> Dict[str, Any]:
        train, test = encode_splits(encoder, cfg, args.max_train_samples, args.max_test_samples, spec)
        row = quality_fashion_mnist.score(name, train, test, probe_recipe(args), {})
        return {"name": name, "knn_top1": row["knn_top1"], "linear_top1": row["linear_top1"],
                "curve_knn_top1": knn_point(train, test, args.curve_bank, args.curve_test)}

    def untrained(method: str, cfg: RunConfig) -> Dict[str, Any]:
        encoder = random_init_encoder(cfg)
        row = score(f"random init ({cfg.model.init} init, as {method})", encoder, cfg, encoder.spec)
        log(f"fine-tuning the untrained encoder ({cfg.model.init} init) from scratch")
        recipe = finetune_recipe(args)
        model = build_classifier(encoder.state_dict(), encoder.spec, recipe.finetune)
        tuned = finetune_model(model, recipe, encoder.spec, torch.device(recipe.finetune.device), progress=False,
                               log=log)
        return {**row, "init": cfg.model.init, "finetune": finetune_summary(tuned)}

    cfg0 = configs[0][1]
    spec = random_init_encoder(cfg0).spec
    rows = [cached(Path(args.out_dir) / "reference_raw_pixels.json", key,
                   lambda: score("raw pixels", PixelEncoder(cfg0.data.mean, cfg0.data.std), cfg0, spec))]
    firsts: Dict[str, Tuple[str, RunConfig]] = {}
    for name, cfg in configs:
        firsts.setdefault(cfg.model.init, (name, cfg))  # the first method of each init scheme
    for init, (name, cfg) in firsts.items():
        rows.append(cached(Path(args.out_dir) / f"reference_random_init_{slug(init)}.json",
                           {**key, "finetune": args.finetune}, lambda n=name, c=cfg: untrained(n, c)))
    return rows


def best_seed_finetunes(args: argparse.Namespace, runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Fine-tune of each method's best seed by linear probe (cached per method and checkpoint)."""
    tuned = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        best = max((r for r in runs if r["method"] == name), key=lambda r: r["linear_top1"])

        def compute(best: Dict[str, Any] = best) -> Dict[str, Any]:
            log(f"fine-tuning {best['method']} seed {best['seed']} (best linear probe, {best['linear_top1']:.2f}%)")
            return finetune_summary(run_finetune(best["checkpoint"], finetune_recipe(args), progress=False))

        result = cached(Path(args.out_dir) / f"finetune_{slug(name)}.json",
                        {"checkpoint": best["checkpoint"], "finetune": args.finetune}, compute)
        spread_of = cached(Path(args.out_dir) / f"cls_std_{slug(name)}.json", {"checkpoint": best["checkpoint"]},
                           lambda best=best: {"cls_std": cls_spread(best, args)})
        tuned[name] = {"seed": best["seed"], **result, **spread_of}
    return tuned


def cls_spread(run: Dict[str, Any], args: argparse.Namespace, images: int = 512) -> float:
    """How much the fine-tune's input, the [CLS] after the final norm, varies across images: its std
    over the first `images` test images, averaged over the channels. A near-constant [CLS] gives a
    freshly initialised head almost no signal, whatever the features hold."""
    cfg = run_config(args, run["recipe"], Path(args.out_dir) / "unused", *run["overrides"])
    encoder, _ = encoder_from_checkpoint(run["checkpoint"], cfg.model, torch.device("cpu"))
    _, (features, _) = encode_splits(encoder.eval(), cfg, 1, images)
    return features.float().std(0).mean().item()


def costs(args: argparse.Namespace, methods: List[Method]) -> Dict[str, Dict[str, Any]]:
    """bench/train_step.py's case per method, each in a fresh process (cached per method)."""
    out = {}
    for name, recipe, overrides in methods:
        overrides = method_overrides(overrides, args)
        cfg = load_config(recipe, overrides)
        case = {"recipe": recipe, "model": cfg.model.name, "batch": plan_batch(cfg.train, 1).global_batch,
                "mask_ratio": cfg.mask.ratio, "device": "cpu", "precision": "auto", "attn": cfg.model.attn_backend,
                "ac": "none", "compile": False, "kind": cfg.objective.name, "adamw": "auto", "label": name,
                "steps": args.cost_steps, "warmup": 2, "threads": torch.get_num_threads(),
                "gemm_size": args.gemm_size, "gemm_repeats": 5, "extra": overrides}

        def compute(case: Dict[str, Any] = case) -> Dict[str, Any]:
            log(f"cost of {case['label']}: {case['steps']} timed steps of {case['batch']} in a fresh process")
            r = run_child(case, timeout=1800)
            if "error" in r:
                raise RuntimeError(f"cost of {case['label']}: {r['error']}")
            return {k: r[k] for k in ("img_per_s", "step_s_median", "step_s_best", "flops_per_step",
                                      "mask_signal_flops_per_step", "flops_per_s_best", "matmul_flops_per_s", "ratio",
                                      "ratio_median", "peak_mem_bytes", "step_mem_bytes", "mem_kind", "threads",
                                      "batch", "loadavg_end")}

        out[name] = cached(Path(args.out_dir) / f"cost_{slug(name)}.json", case, compute)
    return out


# ----------------------------------------------------------------------------- tables and figure

def accuracy_table(args: argparse.Namespace, runs: List[Dict], refs: List[Dict], tuned: Dict[str, Dict]) -> str:
    bank = args.max_train_samples or "all"
    lines = [f"| method ({args.steps} steps of {runs[0]['batch'] if runs else '-'}) | seeds | kNN top-1 (k=20, "
             f"{bank} bank) | linear probe top-1 | fine-tune top-1 (best seed) | training min |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        ft = tuned.get(name)
        finetuned = f"{ft['top1']:.2f} (seed {ft['seed']}; [CLS] std {ft['cls_std']:.3f})" if ft else "-"
        lines.append(f"| {name} | {len(mine)} | {spread([r['knn_top1'] for r in mine])} | "
                     f"{spread([r['linear_top1'] for r in mine])} | {finetuned} | "
                     f"{statistics.fmean(r['trained_min'] for r in mine):.1f} |")
    for ref in refs:
        ft = ref.get("finetune")
        finetuned = f"{ft['top1']:.2f} (from scratch)" if ft else "-"
        lines.append(f"| {ref['name']} | - | {ref['knn_top1']:.2f} | {ref['linear_top1']:.2f} | {finetuned} | - |")
    return "\n".join(lines)


def cost_table(runs: List[Dict], cost: Dict[str, Dict]) -> str:
    lines = ["| method | img/s (runs, data included) | img/s (fixed batch) | GFLOP/step | achieved GFLOP/s | "
             "GEMM GFLOP/s | ratio to GEMM | peak mem |", "|---|---|---|---|---|---|---|---|"]
    for name, c in cost.items():
        mine = [r["img_per_s"] for r in runs if r["method"] == name]
        seen = f"{statistics.fmean(mine):.0f}" if mine else "-"
        lines.append(f"| {name} | {seen} | {c['img_per_s']:.0f} | {c['flops_per_step'] / 1e9:.1f} | "
                     f"{c['flops_per_s_best'] / 1e9:.1f} | {c['matmul_flops_per_s'] / 1e9:.1f} | {c['ratio']:.3f} | "
                     f"{fmt_bytes(c['peak_mem_bytes'])} |")
    return "\n".join(lines)


def at_minutes(curve: List[Dict[str, float]], minutes: float) -> Tuple[float, float]:
    """(step, curve kNN) a run had reached after `minutes` of training, linear between its curve points
    (a run that finished earlier keeps its last point)."""
    for p0, p1 in zip(curve, curve[1:]):
        t0, t1 = p0["trained_min"], p1["trained_min"]
        if t0 <= minutes <= t1:
            w = (minutes - t0) / (t1 - t0) if t1 > t0 else 1.0
            return p0["step"] + w * (p1["step"] - p0["step"]), p0["knn_top1"] + w * (p1["knn_top1"] - p0["knn_top1"])
    return curve[-1]["step"], curve[-1]["knn_top1"]


def equal_time(runs: List[Dict]) -> Dict[str, Any]:
    """Every method read off its curves at one wall-clock budget: the training minutes of the
    cheapest method (mean over its seeds). Mid-schedule points: the slower methods' lr has not
    decayed there, as it would in a run scheduled for that budget, so this favours the cheap method."""
    names = list(dict.fromkeys(r["method"] for r in runs))
    budget = min(statistics.fmean(r["trained_min"] for r in runs if r["method"] == n) for n in names)
    rows = {}
    for name in names:
        read = [at_minutes(r["curve"], budget) for r in runs if r["method"] == name]
        knn = [k for _, k in read]
        rows[name] = {"steps": statistics.fmean(s for s, _ in read), "knn_mean": statistics.fmean(knn),
                      "knn_std": statistics.stdev(knn) if len(knn) > 1 else 0.0, "knn": knn}
    return {"minutes": budget, "methods": rows}


def equal_time_table(args: argparse.Namespace, runs: List[Dict], same: Dict[str, Any]) -> str:
    """`same`: equal_time(runs)."""
    lines = [f"| method | steps reached in {same['minutes']:.1f} training min | curve kNN top-1 at "
             f"{same['minutes']:.1f} min | curve kNN top-1 after {args.steps} steps |", "|---|---|---|---|"]
    for name, row in same["methods"].items():
        final = [r["curve"][-1]["knn_top1"] for r in runs if r["method"] == name]
        lines.append(f"| {name} | {row['steps']:.0f} | {spread(row['knn'])} | {spread(final)} |")
    return "\n".join(lines)


# The comparisons the conclusion reads, paired by seed (same initial weights and data order).
PAIRS: Tuple[Tuple[str, str], ...] = (
    ("OCL", "MAE"), ("ASL (AEE)", "MAE"), ("MAE + EHM", "MAE"), ("MAE + EHM r=0.25", "MAE r=0.25"),
    ("ASL (AEE) + EHM", "ASL (AEE)"), ("OCL + EHM two-group", "OCL"), ("OCL + EHM drop + random split", "OCL"))


def paired_table(runs: List[Dict]) -> str:
    """Per pair of PAIRS whose methods both ran: the per-seed differences, mean +- std."""
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = ["| paired by seed | seeds | kNN difference | linear probe difference |", "|---|---|---|---|"]
    for a, b in PAIRS:
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        if not seeds:
            continue
        cells = []
        for key in ("knn_top1", "linear_top1"):
            d = [by[a, s][key] - by[b, s][key] for s in seeds]
            std = statistics.stdev(d) if len(d) > 1 else 0.0
            cells.append(f"{statistics.fmean(d):+.2f} +- {std:.2f} ({', '.join(f'{x:+.2f}' for x in d)})")
        lines.append(f"| {a} - {b} | {len(seeds)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def curve_summary(runs: List[Dict]) -> Dict[str, List[Dict[str, float]]]:
    """Per method and curve point: mean minutes, kNN mean / std / min / max over the seeds."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r["curve"] for r in runs if r["method"] == name]
        points = []
        for i in range(min(len(c) for c in mine)):
            knn = [c[i]["knn_top1"] for c in mine]
            points.append({"step": mine[0][i]["step"],
                           "trained_min": statistics.fmean(c[i]["trained_min"] for c in mine),
                           "knn_mean": statistics.fmean(knn), "knn_std": statistics.stdev(knn) if len(knn) > 1 else 0.0,
                           "knn_min": min(knn), "knn_max": max(knn)})
        out[name] = points
    return out


def figure(path: Path, args: argparse.Namespace, runs: List[Dict], refs: List[Dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    families = {"OCL": "tab:blue", "MAE": "tab:orange", "ASL": "tab:green"}
    curves = curve_summary(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for i, (name, points) in enumerate(curves.items()):
        color = "tab:red" if "r=0.25" in name else next((c for f, c in families.items() if name.startswith(f)), f"C{i}")
        style = ":" if "drop" in name else "--" if "EHM" in name else "-"
        x = [p["trained_min"] for p in points]
        left.plot(x, [p["knn_mean"] for p in points], style, marker="o", ms=3, color=color, label=name)
        left.fill_between(x, [p["knn_min"] for p in points], [p["knn_max"] for p in points], color=color, alpha=0.15)
        mine = [r for r in runs if r["method"] == name]
        lin = [r["linear_top1"] for r in mine]
        right.errorbar(statistics.fmean(r["trained_min"] for r in mine), statistics.fmean(lin),
                       yerr=statistics.stdev(lin) if len(lin) > 1 else 0.0, fmt="o" if "EHM" not in name else "s",
                       color=color, capsize=3, label=name, mfc="white" if "drop" in name else color)
    for ref, ls in zip(refs, ("-.", (0, (1, 3)), (0, (3, 1, 1, 1)))):
        left.axhline(ref["curve_knn_top1"], color="grey", ls=ls, lw=1, label=ref["name"])
        right.axhline(ref["linear_top1"], color="grey", ls=ls, lw=1, label=ref["name"])
    seeds = sorted({r["seed"] for r in runs})
    left.set(xlabel="training minutes (mean over seeds)",
             ylabel=f"kNN top-1 % (bank {args.curve_bank or 'all'}, {args.curve_test or 'all'} test images)",
             title=f"kNN during training: mean, min..max over seeds {seeds}")
    right.set(xlabel="training minutes", ylabel="linear probe top-1 % (test split)",
              title=f"after {args.steps} steps: linear probe, mean +- std")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command

def check_plan(args: argparse.Namespace) -> None:
    """OUT_DIR's runs were made with one budget and protocol: refuse another."""
    plan = {k: getattr(args, k) for k in PLAN_KEYS}
    path = Path(args.out_dir) / "plan.json"
    kept = read_json(path)
    if kept is None:
        write_json(path, plan)
        return
    changed = [f"{k} {kept.get(k)!r} -> {plan[k]!r}" for k in PLAN_KEYS if kept.get(k) != plan[k]]
    if changed:
        raise UserError(f"{args.out_dir} holds runs of another plan ({'; '.join(changed)}): continue with the "
                        f"same options or use another --out-dir")


def study(args: argparse.Namespace, methods: List[Method]) -> int:
    quality_fashion_mnist.ensure_shards(Path(args.data_dir))
    check_plan(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    for seed in args.seeds:  # seeds outermost: every method sees the machine's same moods
        for name, recipe, overrides in methods:
            train_run(name, recipe, overrides, seed, args)
    order = {m[0]: i for i, m in enumerate(METHODS)}
    wanted = {m[0] for m in methods}
    runs = sorted((r for r in (read_json(p) for p in Path(args.out_dir).glob("*_seed*/result.json"))
                   if r["method"] in wanted), key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    refs = [] if args.skip_references else references(args, methods)
    tuned = {} if args.skip_finetune else best_seed_finetunes(args, runs)
    cost = {} if args.skip_cost else costs(args, methods)
    same_time = equal_time(runs)
    tables = {"accuracy": accuracy_table(args, runs, refs, tuned), "equal_time": equal_time_table(args, runs, same_time),
              "paired": paired_table(runs), "cost": cost_table(runs, cost)}
    figure(Path(args.figure), args, runs, refs)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_average_before": load_before},
              "plan": {k: getattr(args, k) for k in PLAN_KEYS}, "seeds": sorted({r["seed"] for r in runs}),
              "methods": [{"name": n, "recipe": r, "overrides": method_overrides(o, args)} for n, r, o in methods],
              "finetune_recipe": str(FINETUNE_RECIPE.relative_to(REPO)), "finetune_overrides": args.finetune,
              "runs": runs, "curves": curve_summary(runs), "equal_time": same_time, "references": refs,
              "finetune": tuned, "cost": cost,
              "tables": tables, "this_invocation_seconds": time.perf_counter() - started}
    write_json(Path(args.out), result)
    print("\n\n".join(["", tables["accuracy"], tables["paired"], tables["equal_time"], tables["cost"], ""]))
    print(f"results: {args.out}; figure: {args.figure}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="a subset of the methods, by name")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=156, help="optimizer steps per run, every method (default: "
                        "156, two epochs of the default --train-shards)")
    parser.add_argument("--curve-points", type=int, default=3, help="training segments, a kNN point after each")
    parser.add_argument("--curve-bank", type=int, default=5000, help="the curve's kNN bank (first N train images)")
    parser.add_argument("--curve-test", type=int, default=2000, help="the curve's kNN queries (first N test images)")
    parser.add_argument("--max-train-samples", type=int, default=20000, help="final kNN bank / probe set (0: all)")
    parser.add_argument("--max-test-samples", type=int, default=0, help="final test images (0: all 10k)")
    parser.add_argument("--warmup-frac", type=float, default=0.1, help="lr warm-up, fraction of --steps")
    parser.add_argument("--data-dir", default=str(REPO / "data/fashion-mnist-wds"))
    parser.add_argument("--train-shards", default=DEFAULT_SHARDS, metavar="PATTERN",
                        help=f"pre-train on these shards of DATA_DIR/train ('' for all 60k; default {DEFAULT_SHARDS})")
    parser.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE",
                        help="linear-probe recipe override, e.g. --probe probe.global_batch=256")
    parser.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="fine-tune recipe override, e.g. --finetune finetune.max_steps=50")
    parser.add_argument("--cost-steps", type=int, default=5, help="timed steps per method in the cost measurement")
    parser.add_argument("--gemm-size", type=int, default=0, help="the cost's reference GEMM (default 2048)")
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--out-dir", default=str(REPO / "runs/methods_fashion_mnist"))
    parser.add_argument("--out", default=str(REPO / "docs/results/methods_fashion_mnist.json"))
    parser.add_argument("--figure", default=str(REPO / "docs/images/methods_fashion_mnist.png"))
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="pre-training recipe overrides for every run, e.g. --set train.micro_batch=128")
    args = parser.parse_args(argv)
    try:
        methods = check_arguments(args)
    except UserError as err:  # one line, exit 2, before any work
        return report_user_error(PROG, err)
    try:
        return run_command(PROG, lambda: study(args, methods))
    except Interrupted as stopped:
        print(f"{PROG}: {stopped}", file=sys.stderr, flush=True)
        return 130


def check_arguments(args: argparse.Namespace) -> List[Method]:
    methods = METHODS
    if args.only:
        unknown = [m for m in args.only if m not in {name for name, _, _ in METHODS}]
        if unknown:
            raise UserError(f"--only {', '.join(unknown)}: not a method here ({', '.join(m[0] for m in METHODS)})")
        methods = [m for m in METHODS if m[0] in args.only]
    if args.steps < 1 or args.curve_points < 1 or args.curve_points > args.steps:
        raise UserError(f"--steps {args.steps} --curve-points {args.curve_points}: need 1 <= curve points <= steps")
    if args.max_train_samples and args.curve_bank > args.max_train_samples:
        raise UserError(f"--curve-bank {args.curve_bank} exceeds --max-train-samples {args.max_train_samples}")
    if args.max_test_samples and args.curve_test > args.max_test_samples:
        raise UserError(f"--curve-test {args.curve_test} exceeds --max-test-samples {args.max_test_samples}")
    if not 0 <= args.warmup_frac < 1:
        raise UserError(f"--warmup-frac {args.warmup_frac}: must be in [0, 1)")
    try:  # every recipe and override, before any training
        for _, recipe, overrides in methods:
            load_config(recipe, method_overrides(overrides, args))
        finetune_recipe(args)
        probe_recipe(args)
    except ConfigError as err:
        raise UserError(str(err)) from None
    return methods


if __name__ == "__main__":
    sys.exit(main())
