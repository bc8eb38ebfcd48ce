"""Cost of Evolved Hierarchical Masking (EHM) in an MAE train step, as ratios measured in one run.

Per preset, two trainers with the same weights, the same fixed batch of random images and the preset's
MAE recipe (mae_<model>.yaml when one uses the model, else mae_fashion_mnist_cpu.yaml with the model
swapped in) differ only in `mask.name`: `random` (ratio 0.75) and `ehm`. Their `Trainer.train_step`s
alternate, each going first in turn (so load from other processes hits both alike), after `--warmup` steps each; from each
step's own metrics (what metrics.jsonl logs every step) come the medians of `time_step_s` and, for
EHM, of `time_mask_signal_s` (the attention forward of the first k blocks over all 1 + N tokens, with
the patch similarity) and `time_mask_tree_s` (tree, cut, visit order). Reported:

  signal / step, tree / step, (signal + tree) / step   shares of the EHM step (the paper: 7.9%, 0.2%, 8.1%)
  EHM step / random step                             the measured slow-down
  (EHM step - signal - tree) / random step           the check that both saw the same load: ~1
  signal FLOPs / random-step FLOPs                   the matmul count (scale/trainer/flops.py): 6-block forward
                                                     over 1 + N tokens vs MAE's forward + backward
  greedy / rnn tree time, rounds                     both builders on the step's real similarities (the same
                                                     batch, the EHM model); their trees must be identical

Ratios only: absolute seconds depend on the machine and its load; the raw medians are in the JSON.

    python -m bench.ehm_cost                                  # CPU presets + ViT-B/16 (196 patches)
    python -m bench.ehm_cost --presets vit_base_patch16 --batch 8 --steps 4
    python -m bench.ehm_cost --device cuda --presets vit_base_patch16 --out $OUT/ehm_cost_gpu.json

A GPU script calls `measure(preset, batch, steps, device)` (one preset, one dict, no files written), e.g.
`measure("vit_base_patch16", 256, 10, "cuda", warmup=3)`; its trainers train on synthetic data, which needs no
webdataset (the GPU image lacks it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import yaml

from bench.common import REPO, sync
from scale.config import load_config
from scale.engine import plan_batch
from scale.errors import UserError, run_command
from scale.masking.hierarchy import TREE_BUILDERS, PatchTree
from scale.models import MODELS
from scale.trainer import Trainer, step_plan

DEFAULT_PRESETS = ("vit_tiny_patch4_28", "vit_tiny_patch4_32", "vit_base_patch16")
FALLBACK_RECIPE = REPO / "recipes" / "mae_fashion_mnist_cpu.yaml"
CPU_BATCH_SMALL, CPU_BATCH_LARGE = 64, 8  # CPU defaults: <= 64 patches, more (ViT-B's 196)
PAPER = {"signal_share": 0.079, "tree_share": 0.002, "mask_share": 0.081, "signal_flops_estimate": 0.30}


def mae_recipe(preset: str) -> Path:
    """The MAE recipe whose model is `preset` (e.g. mae_vitb16.yaml: ViT-B's 512-d x 8 decoder), else the CPU one."""
    for path in sorted((REPO / "recipes").glob("mae_*.yaml")):
        if ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("name") == preset:
            return path
    return FALLBACK_RECIPE


def default_batch(preset: str, device: str) -> int:
    """CPU: small enough for about a minute per preset; CUDA: the recipe's per-device micro-batch."""
    if device == "cuda":
        train = load_config(mae_recipe(preset), [f"model.name={preset}"]).train
        return train.micro_batch or plan_batch(train, 1).per_rank_batch
    return CPU_BATCH_SMALL if MODELS.build(preset).num_patches <= 64 else CPU_BATCH_LARGE


def build_trainer(preset: str, batch: int, device: str, mask: str, output_dir: str, extra: Sequence[str]) -> Trainer:
    spec = MODELS.build(preset)
    cfg = load_config(mae_recipe(preset), [
        f"model.name={preset}", f"mask.name={mask}", "mask.ratio=0.75", "train.global_batch=null",
        f"train.micro_batch={batch}", f"train.device={device}", "engine.name=single",
        "data.name=synthetic", f"data.num_samples={batch}", "data.num_workers=0",
        f"data.mean={[0.5] * spec.in_chans}", f"data.std={[0.25] * spec.in_chans}",
        "train.epochs=1000000", "optim.warmup_epochs=0", f"train.output_dir={output_dir}", *extra])
    return Trainer(cfg)


def median_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_tree(a: PatchTree, b: PatchTree) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("parent", "merge_level", "left_size"))


def measure(preset: str, batch: int, steps: int, device: str = "cpu", warmup: int = 1, tree_repeats: int = 3,
            extra: Sequence[str] = ()) -> Dict[str, Any]:
    """One preset: random vs EHM MAE train steps, EHM's signal and tree shares, rnn vs greedy trees.
    `extra`: config overrides for both trainers (e.g. mask.ehm.blocks=4, train.precision=fp32)."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise UserError(f"steps {steps}, warmup {warmup}, batch {batch}: need steps >= 1, warmup >= 0, batch >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: build_trainer(preset, batch, device, m, f"{tmp}/{m}", extra) for m in ("random", "ehm")}
        ehm = trainers["ehm"]
        spec, dev = ehm.spec, ehm.device
        images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, device=dev)
        metrics: Dict[str, List[Dict[str, float]]] = {m: [] for m in trainers}
        for i in range(warmup + steps):  # alternating, in turn first: the same load for both
            for name in (("random", "ehm") if i % 2 == 0 else ("ehm", "random")):
                trainer = trainers[name]
                out = trainer.train_step(images)
                trainer.step += 1
                if i >= warmup:
                    metrics[name].append({k: float(v) for k, v in out.items() if k.startswith(("time_", "ehm_"))})
        # EHM's step counts its signal forward (the mask generator's own FLOPs); the random step is the rest.
        plan = step_plan(ehm.cfg)
        visible, signal_flops = plan.visible_per_group, plan.mask_flops
        step_flops = plan.flops - signal_flops
        blocks = ehm.cfg.mask.ehm.blocks
        # The tree builders on this batch's similarity from the EHM model, as its next step would see it.
        with torch.no_grad():
            similarity = ehm.masking.similarity(ehm.mask_context(ehm.data.to_device(images, ehm.device)))
        trees = {name: build(similarity) for name, build in TREE_BUILDERS.items()}
        tree_s = {name: median_s(lambda b=build: b(similarity), dev, tree_repeats)
                  for name, build in TREE_BUILDERS.items()}
        precision = str(ehm.amp_dtype or torch.float32).replace("torch.", "")
        del trainers, ehm

    def med(name: str, key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in metrics[name])

    step_random, step_ehm = med("random", "time_step_s"), med("ehm", "time_step_s")
    signal, tree = med("ehm", "time_mask_signal_s"), med("ehm", "time_mask_tree_s")
    return {
        "preset": preset, "num_patches": spec.num_patches, "batch": batch, "steps": steps, "warmup": warmup,
        "device": device, "precision": precision, "recipe": str(mae_recipe(preset).relative_to(REPO)),
        "signal_blocks": min(blocks, spec.depth), "visible_per_image": visible,
        "signal_per_step": signal / step_ehm, "tree_per_step": tree / step_ehm,
        "mask_per_step": (signal + tree) / step_ehm, "ehm_step_per_random_step": step_ehm / step_random,
        # a consistency check: EHM's step without its mask regions against the random step (1 when quiet)
        "ehm_rest_per_random_step": (step_ehm - signal - tree) / step_random,
        "signal_flops_per_random_step_flops": signal_flops / step_flops,
        "greedy_per_rnn_tree": tree_s["greedy"] / tree_s["rnn"],
        "rounds": {name: t.rounds for name, t in trees.items()}, "trees_identical": same_tree(*trees.values()),
        "tree_height_mean": float(trees["rnn"].height.float().mean()),
        "seconds_median": {"random_step": step_random, "ehm_step": step_ehm, "signal": signal, "tree": tree,
                           **{f"tree_{name}": s for name, s in tree_s.items()}},
        "per_step": metrics,
    }


TABLE_HEADER = ("| preset | patches | batch | signal / step | tree / step | (signal + tree) / step "
                "| EHM step / random step | (EHM step - signal - tree) / random step "
                "| signal FLOPs / random-step FLOPs | greedy / rnn tree time "
                "| rounds rnn / greedy | trees identical |")


def table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = [TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['num_patches']} | {r['batch']} | {r['signal_per_step']:.1%} "
                     f"| {r['tree_per_step']:.1%} | {r['mask_per_step']:.1%} | {r['ehm_step_per_random_step']:.2f}x "
                     f"| {r['ehm_rest_per_random_step']:.2f} "
                     f"| {r['signal_flops_per_random_step_flops']:.1%} | {r['greedy_per_rnn_tree']:.1f}x "
                     f"| {r['rounds']['rnn']} / {r['rounds']['greedy']} | {'yes' if r['trees_identical'] else 'NO'} |")
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 through run_command, not usage + message
        raise UserError(message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("ehm_cost.py", lambda: run(argv))


def run(argv: Optional[Sequence[str]]) -> int:
    p = Parser(prog="ehm_cost.py", description=__doc__.split("\n\n")[0], epilog=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated model presets")
    p.add_argument("--batch", type=int, default=0,
                   help=f"images per step (default: CPU {CPU_BATCH_SMALL} up to 64 patches, else {CPU_BATCH_LARGE}; "
                        "CUDA the recipe's micro-batch)")
    p.add_argument("--steps", type=int, default=4,
                   help="timed steps per trainer (median; even: each trainer goes first as often)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tree-repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", help="JSON (default docs/results/ehm_cost_<device>.json)")
    p.add_argument("overrides", nargs="*", help="config overrides for both trainers, e.g. mask.ehm.blocks=4")
    args = p.parse_args(argv)
    presets = [x for x in args.presets.split(",") if x]
    unknown = [x for x in presets if x not in MODELS.names()]
    if unknown or not presets:
        raise UserError(f"--presets {','.join(unknown) or repr(args.presets)}: unknown; "
                        f"allowed: {', '.join(MODELS.names())}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else REPO / "docs" / "results" / f"ehm_cost_{args.device}.json"
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
           "torch": torch.__version__, "threads": args.threads, "loadavg_start": os.getloadavg()}
    print(f"# EHM cost on {env['device']} ({args.device}, torch {env['torch']}, {args.threads} threads), "
          f"load average {env['loadavg_start'][0]:.2f}", flush=True)
    rows = []
    for preset in presets:
        batch = args.batch or default_batch(preset, args.device)
        r = measure(preset, batch, args.steps, args.device, args.warmup, args.tree_repeats, args.overrides)
        rows.append(r)
        print(f"  {preset} batch {batch}: signal/step {r['signal_per_step']:.1%}, tree/step {r['tree_per_step']:.1%}, "
              f"EHM/random {r['ehm_step_per_random_step']:.2f}x (load {os.getloadavg()[0]:.2f})", flush=True)
    env["loadavg_end"] = os.getloadavg()
    lines = table(rows)
    print("\n".join(lines))
    command = " ".join(["python -m bench.ehm_cost", *(sys.argv[1:] if argv is None else argv)])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"env": env, "paper": PAPER, "command": command, "table": lines, "results": rows},
                                  indent=1))
    except OSError as err:
        raise UserError(f"--out {out}: cannot be written ({err.strerror or err})") from None
    print(f"wrote {out}")
    if not all(r["trees_identical"] for r in rows):
        print("rnn and greedy trees differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
