"""`make demo`: pre-train OCL on the CPU for a few minutes on the best data this machine has, then
show what the encoder learnt: kNN top-1 next to raw pixels and the untrained encoder, and the
curves as a PNG in the run directory.

Fashion-MNIST (real images) when the Debian package `dataset-fashion-mnist` is installed
or can be installed; otherwise the built-in synthetic dataset, and it says so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .atomic_files import read_json, write_json_atomically
from .config import RunConfig, load_config
from .errors import CommandParser, UserError, run_command
from .eval.baselines import PixelEncoder, random_init_encoder
from .plot import METRICS_FILE, RunMetrics, plot_runs, read_run
from .shards.fashion_mnist import main as convert_fashion_mnist

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
KNN_BANK = 20000  # training images in the kNN bank: the three-way comparison stays a few seconds each
STOPPED_EXIT = 3  # as scale-train: stopped early on request, a checkpoint was written, the run continues later


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
    status = convert_fashion_mnist(["--src", str(FASHION_MNIST), "--out", str(data_dir)])
    if status != 0:  # the converter printed its one-line reason
        raise UserError(f"--data-dir {data_dir}: converting Fashion-MNIST failed (exit {status}, above)")


DEMO_STATE = "demo.json"  # in the run directory: what the demo ran there, and whether it got to the end


class DemoStopped(Exception):
    """SIGTERM or Ctrl-C outside training (while evaluating): stop now, the checkpoint is already written."""


def output_dir_for(wanted: Path, plan: Dict[str, object]) -> Tuple[Path, bool]:
    """(run directory, whether to continue it): the first of `wanted`, `wanted-2`, ... that is empty, or that
    holds an unfinished demo run of the same plan (continued). A finished run, or another run, is never
    overwritten."""
    candidate, n = wanted, 1
    while True:
        state = read_demo_state(candidate)
        if state is not None and not state.get("finished") and state.get("plan") == plan:
            print(f"demo: continuing the unfinished run in {candidate}", flush=True)
            return candidate, True
        has_run = (candidate / "checkpoints").is_dir() and any((candidate / "checkpoints").iterdir())
        if state is None and not has_run:
            if candidate != wanted:
                print(f"demo: {wanted} holds an earlier run; this one goes to {candidate}", flush=True)
            return candidate, False
        n += 1
        candidate = wanted.with_name(f"{wanted.name}-{n}")


def read_demo_state(run: Path) -> Optional[Dict[str, object]]:
    """The demo's record of `run`, or None where there is none (or it is not one of ours)."""
    try:
        state = read_json(run / DEMO_STATE)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_demo_state(run: Path, plan: Dict[str, object], finished: bool) -> None:
    write_json_atomically(run / DEMO_STATE, {"plan": plan, "finished": finished}, indent=2)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM stops the demo: inside training the trainer's own handler takes over (finish the step,
    checkpoint, stop); outside it, DemoStopped. Ctrl-C (SIGINT) means the same as SIGTERM."""
    def outside_training(_signum: int, _frame: object) -> None:
        raise DemoStopped()

    def interrupt(_signum: int, frame: object) -> None:
        handler = signal.getsignal(signal.SIGTERM)  # the trainer's while it trains, ours otherwise
        if callable(handler):
            handler(signal.SIGTERM, frame)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, outside_training),
                signal.SIGINT: signal.signal(signal.SIGINT, interrupt)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_message(run: Path, step: Optional[int], checkpoint: Optional[str]) -> str:
    where = f" at step {step} (checkpoint {checkpoint})" if checkpoint else ""
    return f"demo: stopped{where}; run `make demo` again (same arguments) to continue the run in {run}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--data-dir", default="data/fashion-mnist-wds")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    with stop_on_signals():
        try:
            return run_command("scale.demo", lambda: _demo(args))
        except DemoStopped:  # before the run directory was chosen (installing, converting)
            print("demo: stopped; run `make demo` again to go on", flush=True)
            return STOPPED_EXIT


def _demo(args: argparse.Namespace) -> int:
    why_not = ensure_fashion_mnist()
    if why_not is None:
        data_dir = Path(args.data_dir).resolve()
        ensure_shards(data_dir)
        recipe = "ocl_fashion_mnist_cpu"  # packaged recipes, by name (scale/recipe_catalog.py)
        overrides = [f"data.root={data_dir / 'train'}", f"data.val_root={data_dir / 'test'}", "train.epochs=3",
                     f"eval.max_train_samples={KNN_BANK}"]
        data_name = "the Fashion-MNIST test split"
        print("demo: pre-training on Fashion-MNIST shards (real images)", flush=True)
    else:
        recipe = "ocl_cpu_tiny"
        overrides = ["train.epochs=6"]
        data_name = "the SYNTHETIC held-out split"
        print(f"demo: Fashion-MNIST is not available ({why_not}); using the built-in SYNTHETIC dataset", flush=True)
    overrides.append("eval.knn_every_epochs=1")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    plan = {"recipe": recipe, "overrides": [*overrides, *args.overrides]}
    run_dir, resume = output_dir_for(Path(args.output_dir), plan)
    run_dir = run_dir.resolve()
    cfg = load_config(recipe, [*plan["overrides"], f"train.output_dir={run_dir}",
                               *(["train.resume=auto"] if resume else [])])

    from .eval.knn import KnnMonitor
    from .models import model_spec
    from .trainer import Trainer

    knn = KnnMonitor(cfg, model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans))
    trainer = Trainer(cfg, monitors=[knn])
    write_demo_state(run_dir, plan, finished=False)
    started = time.perf_counter()
    summary = None
    try:
        summary = trainer.fit()
        if summary.preempted and summary.final_step < trainer.stop_step:
            print(stopped_message(run_dir, summary.final_step, summary.last_checkpoint), flush=True)
            return STOPPED_EXIT
        run = read_run(run_dir / METRICS_FILE, run_dir.name)  # read once: the trained row and the curves
        trained = last_knn_record(run, summary.final_step)
        if trained is None:  # stopped between evaluations: evaluate the weights it ended with
            encoder = trainer.encoder_for_eval()
            trained = knn.evaluate(encoder, trainer.device) if encoder is not None else None
        minutes = (time.perf_counter() - started) / 60
        if trained is None:
            return 0
        print("demo: scoring the baselines (the same kNN on raw pixels and on the untrained encoder) ...", flush=True)
        rows = [(f"{cfg.objective.name.upper()} {cfg.model.name}, {summary.final_step} steps ({minutes:.1f} min)",
                 trained["knn_top1"]),
                ("same encoder at random init", knn.evaluate(random_init_encoder(cfg), trainer.device)["knn_top1"]),
                ("raw pixels", knn.evaluate(PixelEncoder(cfg.data.mean, cfg.data.std), trainer.device)["knn_top1"])]
        print(learnt_table(rows, data_name, cfg, trained))
        print(verdict(rows, synthetic=why_not is not None))
        pictures = plot_runs([run], run_dir)
        print(f"demo: curves      {pictures[-1]}  (python -m scale.plot {run_dir} redraws them)")
        print(f"demo: logs        {run_dir / METRICS_FILE}  (tensorboard --logdir {run_dir / 'tensorboard'})")
        print(f"demo: checkpoint  {summary.last_checkpoint}")
        write_demo_state(run_dir, plan, finished=True)
        return 0
    except DemoStopped:
        step = summary.final_step if summary else None
        print(stopped_message(run_dir, step, summary.last_checkpoint if summary else None), flush=True)
        return STOPPED_EXIT
    finally:
        trainer.engine.close()


def last_knn_record(run: RunMetrics, step: int) -> Optional[Dict[str, float]]:
    """The kNN record the trainer logged at `step`, if it logged one."""
    by_step = run.points.get(("eval", "knn_top1"), {})
    return {"knn_top1": by_step[float(step)]} if float(step) in by_step else None


def learnt_table(rows: List[Tuple[str, float]], data_name: str, cfg: RunConfig, trained: Dict[str, float]) -> str:
    bank = f"{cfg.eval.max_train_samples}-image" if cfg.eval.max_train_samples else "whole"
    width = max(len(name) for name, _ in rows)
    lines = [f"demo: what the encoder learnt: weighted kNN top-1 (k={cfg.eval.knn_k}) on {data_name}, "
             f"{bank} training bank",
             f"  {'encoder'.ljust(width)}  kNN top-1"]
    lines += [f"  {name.ljust(width)}  {top1:8.2f}%" for name, top1 in rows]
    return "\n".join(lines)


def verdict(rows: List[Tuple[str, float]], synthetic: bool) -> str:
    (_, trained), (_, random_init), (_, pixels) = rows
    text = (f"demo: pre-training moved kNN top-1 {trained - random_init:+.2f} points from random init; "
            f"{'above' if trained > pixels else 'below'} raw pixels by {abs(trained - pixels):.2f}")
    if synthetic:
        text += ("\ndemo: SYNTHETIC data: classes are generated grating patterns (scale/data/synthetic.py); the "
                 "numbers show that the pipeline learns, not how good the encoder is on real images")
    elif trained <= pixels:
        text += (" (a few minutes is short: bench/quality_fashion_mnist.py trains 30 minutes; "
                 "docs/results.md's quality table)")
    return text


if __name__ == "__main__":
    sys.exit(main())
