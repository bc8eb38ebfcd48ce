"""`make demo`: pre-train OCL on the CPU for a few minutes on the best data this machine has.

Fashion-MNIST (real images) when the Debian package `dataset-fashion-mnist` is installed
or can be installed; otherwise the built-in synthetic dataset, and it says so.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .config import load_config
from .errors import UserError, run_command

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def ensure_fashion_mnist() -> Optional[str]:
    """Return None when the dataset is present (installing it with apt if we can), else why not."""
    if FASHION_MNIST.is_dir() and any(FASHION_MNIST.iterdir()):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "apt-get is unavailable or we are not root"
    print("demo: installing Fashion-MNIST with apt-get (package dataset-fashion-mnist)...", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["apt-get", "update", "-qq"], **quiet)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], **quiet)
    if done.returncode != 0 or not FASHION_MNIST.is_dir():
        return f"apt-get install dataset-fashion-mnist failed (exit {done.returncode})"
    return None


def ensure_shards(data_dir: Path) -> None:
    if (data_dir / "train" / "manifest.json").is_file() and (data_dir / "test" / "manifest.json").is_file():
        return
    print(f"demo: converting Fashion-MNIST to WebDataset shards in {data_dir} ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "data_prep.fashion_mnist_to_wds", "--src", str(FASHION_MNIST),
                           "--out", str(data_dir)], cwd=REPO)
    if done.returncode != 0:  # the converter printed its one-line reason
        raise UserError(f"--data-dir {data_dir}: converting Fashion-MNIST failed (exit {done.returncode}, above)")


def fresh_output_dir(wanted: Path) -> Path:
    """`wanted`, or `wanted-2`, `wanted-3`, ... when an earlier demo run is there: never overwrite a run."""
    candidate, n = wanted, 1
    while (candidate / "checkpoints").is_dir() and any((candidate / "checkpoints").iterdir()):
        n += 1
        candidate = wanted.with_name(f"{wanted.name}-{n}")
    if candidate != wanted:
        print(f"demo: {wanted} holds an earlier run; this one goes to {candidate}", flush=True)
    return candidate


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--data-dir", default="data/fashion-mnist-wds")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return run_command("scale.demo", lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    why_not = ensure_fashion_mnist()
    if why_not is None:
        data_dir = Path(args.data_dir).resolve()
        ensure_shards(data_dir)
        recipe = REPO / "recipes/ocl_fashion_mnist_cpu.yaml"
        overrides = [f"data.root={data_dir / 'train'}", f"data.val_root={data_dir / 'test'}", "train.epochs=3"]
        print("demo: pre-training on Fashion-MNIST shards (real images)", flush=True)
    else:
        recipe = REPO / "recipes/ocl_cpu_tiny.yaml"
        overrides = ["train.epochs=6"]
        print(f"demo: Fashion-MNIST is not available ({why_not}); using the built-in SYNTHETIC dataset", flush=True)
    overrides.append(f"train.output_dir={fresh_output_dir(Path(args.output_dir))}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(recipe, [*overrides, *args.overrides])

    from .trainer import Trainer

    from .eval.knn import build_monitors
    from .models import model_spec

    trainer = Trainer(cfg, monitors=build_monitors(cfg, model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans)))
    try:
        summary = trainer.fit()
    finally:
        trainer.engine.close()
    k = max(1, min(10, len(summary.losses) // 5))
    if summary.losses:
        first = sum(summary.losses[:k]) / k
        last = sum(summary.losses[-k:]) / k
        print(f"demo: loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps) over "
              f"{summary.steps_done} steps")
    out = Path(cfg.train.output_dir).resolve()
    print(f"demo: logs        {out / 'metrics.jsonl'}  (tensorboard --logdir {out / 'tensorboard'})")
    print(f"demo: checkpoint  {summary.last_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
