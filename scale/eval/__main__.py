"""`python -m scale.eval {knn,linprobe,finetune} --checkpoint CKPT [--config RECIPE] [key=value ...]`

    knn       weighted k-NN (k=20, T=0.07) of CLS features: data.root is the bank, data.val_root the
              queries; RECIPE is a pre-training recipe (default: the checkpoint's own config)
    linprobe  linear probe (MAE protocol, paper Table 11); RECIPE: linprobe_* (recipes/linprobe_*.yaml)
    finetune  end-to-end fine-tuning (MAE protocol, paper Table 10); RECIPE: finetune_* (recipes/finetune_*.yaml)

CKPT is a checkpoint directory (any engine's format) or a run directory (its newest checkpoint).
Results go to CKPT's sibling `step_XXXXXXXX.<command>.json` (or --out); the last line printed
is the result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..config import ConfigError, RunConfig, load_config, to_dict
from ..errors import CommandParser, run_command


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m scale.eval", description="Evaluate a pre-trained encoder.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("knn", "linprobe", "finetune"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (newest checkpoint)")
        p.add_argument("--config", metavar="RECIPE", required=name != "knn",
                       help="a recipe name or a YAML file path"
                            + (" (default: the checkpoint's saved config)" if name == "knn" else ""))
        p.add_argument("--out", help="results JSON (default: next to the checkpoint)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "finetune":
            p.add_argument("--save-model", help="write the fine-tuned classifier here (safetensors)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def knn_config(checkpoint_config: Optional[dict], recipe: Optional[str], overrides: List[str]) -> RunConfig:
    if recipe:
        return load_config(recipe, overrides)
    if not checkpoint_config:
        raise ConfigError("the checkpoint carries no saved config; pass --config RECIPE")
    return load_config(None, overrides, base=checkpoint_config)


def run_knn(checkpoint: str, recipe: Optional[str], overrides: List[str], progress: bool) -> dict:
    import time

    from ..checkpoint_io import load_checkpoint
    from ..device import autocast_dtype, resolve_device
    from .features import encoder_from_checkpoint
    from .knn import KnnMonitor

    loaded = load_checkpoint(checkpoint)
    cfg = knn_config(loaded.config, recipe, overrides)
    device = resolve_device(cfg.train.device)
    started = time.perf_counter()
    encoder, loaded = encoder_from_checkpoint(loaded, cfg.model, device, cfg.model.attn_backend)
    record = KnnMonitor(cfg, encoder.spec).evaluate(encoder, device, autocast_dtype(cfg.train.precision, device),
                                                    progress=progress)
    return {"kind": "knn", "checkpoint": str(loaded.path), "step": loaded.meta.get("step"),
            "model": loaded.meta.get("model", cfg.model.name), "top1": record["knn_top1"],
            "top5": record["knn_top5"], "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature,
            "bank": int(record["knn_bank"]), "queries": int(record["knn_queries"]),
            "seconds": time.perf_counter() - started, "config": to_dict(cfg)}


def _evaluate(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    from ..checkpoint_io import META, load_checkpoint, read_meta, resolve_checkpoint
    from .features import check_architecture_overrides
    from .results import check_output_file, results_path, write_results

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else results_path(checkpoint, args.command)
    # The outputs are written only after the evaluation, which can take hours: check them first.
    check_output_file(out, "--out", f"{args.command}.json")
    if args.command == "finetune" and args.save_model:
        check_output_file(Path(args.save_model), "--save-model", "classifier.safetensors")
    saved = read_meta(checkpoint).get("config") if (checkpoint / META).is_file() else None
    if saved is None and any(o.strip().startswith("model.") for o in args.overrides):
        saved = load_checkpoint(checkpoint).config  # older checkpoints: the config is inside the state
    check_architecture_overrides(saved, args.overrides)
    if args.command == "knn":
        results = run_knn(str(checkpoint), args.config, args.overrides, progress)
    elif args.command == "linprobe":
        from .config import LinearProbeRecipe, load_recipe
        from .linear_probe import run_linear_probe

        results = run_linear_probe(str(checkpoint), load_recipe(LinearProbeRecipe, args.config, args.overrides),
                                   progress)
    else:
        from .config import FinetuneRecipe, load_recipe
        from .finetune import run_finetune

        results = run_finetune(str(checkpoint), load_recipe(FinetuneRecipe, args.config, args.overrides),
                               progress, args.save_model)
    write_results(out, results)
    extra = {"knn": f" (k={results.get('k')}, T={results.get('temperature')}, {results.get('bank')} bank / "
                    f"{results.get('queries')} queries)",
             "linprobe": f" ({results.get('steps')} head steps)",
             "finetune": f" ({results.get('steps')} steps)"}[args.command]
    print(f"{args.command}: top-1 {results['top1']:.2f}% top-5 {results['top5']:.2f}%{extra} | "
          f"{checkpoint} | {results['seconds']:.0f}s | results: {out}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(f"scale.eval {args.command}", lambda: _evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
