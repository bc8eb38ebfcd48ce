"""`python -m scale.plot RUN_DIR [RUN_DIR ...]` (also `scale-plot`): PNGs of the training
curves in the runs' metrics.jsonl, the runs overlaid.

One PNG per curve (loss, lr, τ, kNN top-1, throughput) plus `curves.png` with every panel.
A curve that no run logged (τ in an MAE run) is left out. The PNGs go to `--out`, by
default the run directory when there is one run and ./plots when there are several.

metrics.jsonl holds one JSON object per line: training records (step, loss, lr, ...) and
evaluation records ("kind": "eval", knn_top1, ...). A resumed run appends the steps after
its checkpoint again; the last record of a step wins, as that is the run that went on. A
line cut short by a crash is skipped (and counted), not fatal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import CommandParser, UserError, run_command

METRICS_FILE = "metrics.jsonl"
MAX_LINE_BYTES = 1 << 20  # a metrics line is a few hundred bytes; anything larger is not ours


@dataclass(frozen=True)
class Curve:
    key: str  # the metric's key in metrics.jsonl
    kind: str  # "train" or "eval" records
    title: str
    file: str  # PNG name


CURVES = (
    Curve("loss", "train", "training loss", "loss.png"),
    Curve("lr", "train", "learning rate", "lr.png"),
    Curve("temperature", "train", "τ (contrastive temperature)", "temperature.png"),
    Curve("knn_top1", "eval", "kNN top-1 (%)", "knn.png"),
    Curve("img_per_s", "train", "throughput (img/s)", "throughput.png"),
)


@dataclass
class RunMetrics:
    """One run's records: (kind, key) -> {x: value}, the last record of a step winning."""

    label: str
    path: Path
    points: Dict[Tuple[str, str], Dict[float, float]] = field(default_factory=dict)
    skipped_lines: int = 0

    def series(self, curve: Curve) -> Tuple[List[float], List[float]]:
        by_x = self.points.get((curve.kind, curve.key), {})
        xs = sorted(by_x)
        return xs, [by_x[x] for x in xs]


def metrics_path(run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such metrics file; give a run directory (train.output_dir) holding "
                        f"{METRICS_FILE}, or the file itself")
    return path


def read_run(path: Path, label: str, x_axis: str = "step") -> RunMetrics:
    run = RunMetrics(label=label, path=path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    with handle:
        for raw in handle:
            record = _parse_line(raw)
            x = record.get(x_axis) if record is not None else None
            if record is None or not _is_number(x):
                run.skipped_lines += 1
                continue
            kind = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in (x_axis, "kind") and _is_number(value) and math.isfinite(value):
                    run.points.setdefault((kind, key), {})[float(x)] = float(value)
    if not run.points:
        raise UserError(f"{path}: holds no metrics records (one JSON object per line with a {x_axis!r} field)")
    return run


def _parse_line(raw: bytes) -> Optional[dict]:
    if len(raw) > MAX_LINE_BYTES:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_labels(paths: Sequence[Path]) -> List[str]:
    """The run directories' names, or more of their paths where two names are the same."""
    names = [p.parent.name or str(p.parent) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p.parent) for p in paths]


def plot_runs(runs: Sequence[RunMetrics], out_dir: Path, x_axis: str = "step") -> List[Path]:
    """Write the PNGs; returns their paths (curves.png last)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (a cluster node, CI)
    import matplotlib.pyplot as plt

    curves = [c for c in CURVES if any(run.series(c)[0] for run in runs)]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot be created ({err.strerror or err})") from None
    written = []
    cols = min(len(curves), 3)
    rows = math.ceil(len(curves) / cols)
    overview, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for curve, overview_ax in zip(curves, axes.flat):
        single, ax = plt.subplots(figsize=(6, 4))
        for target in (ax, overview_ax):
            _draw(target, curve, runs, x_axis)
        single.tight_layout()
        written.append(_save(single, out_dir / curve.file))
        plt.close(single)
    overview.tight_layout()
    written.append(_save(overview, out_dir / "curves.png"))
    plt.close(overview)
    return written


def _draw(ax, curve: Curve, runs: Sequence[RunMetrics], x_axis: str) -> None:
    for run in runs:
        xs, ys = run.series(curve)
        if xs:
            ax.plot(xs, ys, marker="o" if curve.kind == "eval" else None, markersize=3, label=run.label)
    ax.set_title(curve.title)
    ax.set_xlabel(x_axis)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")


def _save(figure, path: Path) -> Path:
    try:
        figure.savefig(path, dpi=100)
    except OSError as err:
        raise UserError(f"{path}: cannot be written ({err.strerror or err})") from None
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(prog="scale-plot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", help="folder for the PNGs (default: the run dir for one run, ./plots for several)")
    parser.add_argument("--x", dest="x_axis", choices=("step", "epoch"), default="step", help="x axis")
    args = parser.parse_args(argv)
    return run_command("scale-plot", lambda: _plot(args))


def _plot(args: argparse.Namespace) -> int:
    paths = [metrics_path(run) for run in args.runs]
    runs = [read_run(path, label, args.x_axis) for path, label in zip(paths, run_labels(paths))]
    for run in runs:
        if run.skipped_lines:
            print(f"scale-plot: {run.path}: skipped {run.skipped_lines} unreadable line(s)", file=sys.stderr)
    out = Path(args.out) if args.out else (paths[0].parent if len(paths) == 1 else Path("plots"))
    for path in plot_runs(runs, out, args.x_axis):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
