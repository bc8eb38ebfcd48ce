"""`python -m scale.train --config RECIPE [key=value ...]` (also installed as `scale-train`)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import load_config, to_yaml
from .errors import CommandParser, PREEMPTED_EXIT, run_command


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = CommandParser(
        prog="scale-train",
        description="Pre-train a ViT with masked-image self-supervised learning (OCL, MAE, ASL; random, grid or EHM masks).",
        epilog="Overrides use dotted keys, e.g. optim.blr=1e-4 model.name=vit_small_patch16 train.max_steps=100")
    parser.add_argument("--config", metavar="RECIPE",
                        help="a recipe name (e.g. ocl_vitb16; `python -m scale.recipe_catalog` lists them) or a "
                             "YAML file path (an existing file wins); defaults apply where it is silent")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in the output dir) or a checkpoint dir; "
                                         "same as train.resume=...")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .trainer import Trainer  # heavy imports only once the config is known to be good

    from .eval.knn import build_monitors
    from .models import model_spec

    trainer = Trainer(cfg, monitors=build_monitors(cfg, model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans)))
    try:  # a divergence (Diverged) is run_command's one line and exit 5, as for every command that trains
        summary = trainer.fit()
    finally:
        trainer.engine.close()  # tear the process group down so no rank lingers at exit
    # Exit status 3 means "stopped early by SIGUSR1/SIGTERM; a checkpoint was written and
    # `--resume auto` will continue": the SLURM templates (slurm/launch.sh) requeue on it.
    # A run that had already reached its last step when the signal came exits 0 (finished).
    # A hang exits 4 from the watchdog's thread (scale/trainer/watchdog.py); scale/errors.py lists them all.
    if summary.preempted and summary.final_step < trainer.stop_step:
        return PREEMPTED_EXIT
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_command("scale-train", lambda: _train(args))


if __name__ == "__main__":
    sys.exit(main())
