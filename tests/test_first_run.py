"""What a new user sees: the concise console line (or a bar), `scale.plot`'s PNGs, and
`make demo`'s closing table of what the encoder learnt next to raw pixels and random init."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config
from scale import demo, plot
from scale.eval.features import build_split, iterate_split
from scale.eval.knn import knn_accuracy
from scale.trainer import Trainer
from scale.trainer.progress import ProgressReporter, format_duration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- console

def test_plain_line_is_step_loss_lr_headline_throughput_and_eta(tmp_path):
    stream = io.StringIO()
    reporter = ProgressReporter(tmp_path, total_steps=100, stream=stream, interactive=False,
                                headline=[("temperature", "τ")])
    record = {"loss": 4.25, "lr": 1.5e-4, "temperature": 0.07, "pos_cos": 0.5, "neg_cos": 0.01,
              "img_per_s": 612.4, "tokens_per_s": 1e5, "flops_per_s": 3e12, "data_wait_frac": 0.01,
              "engine": "single", "epoch": 0.1}
    reporter.log(10, record)
    reporter.log(20, record)
    reporter.close()
    first, second = stream.getvalue().splitlines()
    assert first == "step 10/100 | loss 4.25 | lr 1.50e-04 | τ 0.07 | img/s 612"  # no ETA before a rate exists
    assert re.fullmatch(r"step 20/100 \| loss 4\.25 \| lr 1\.50e-04 \| τ 0\.07 \| img/s 612 \| ETA \d+s", second)
    assert "pos_cos" not in stream.getvalue() and "flops" not in stream.getvalue()


def test_eta_extrapolates_the_wall_clock_since_the_first_log(tmp_path):
    reporter = ProgressReporter(tmp_path, total_steps=100, enabled=False)
    assert reporter.eta(10, now=0.0) is None
    assert reporter.eta(20, now=5.0) == pytest.approx(0.5 * 80)  # 0.5 s per step, 80 steps left
    assert format_duration(3725) == "1h02m" and format_duration(125) == "2m05s" and format_duration(7) == "7s"


def test_interactive_stream_gets_a_bar_not_lines(tmp_path):
    stream = io.StringIO()
    reporter = ProgressReporter(tmp_path, total_steps=50, stream=stream, interactive=True,
                                headline=[("temperature", "τ")])
    reporter.advance(5)
    reporter.log(5, {"loss": 3.5, "lr": 1e-3, "temperature": 0.1, "img_per_s": 100.0})
    reporter.close()
    out = stream.getvalue()
    assert "\r" in out and "5/50" in out and "loss 3.5" in out and "τ 0.1" in out
    assert "step 5/50 |" not in out  # the plain line is for logs, not terminals


def test_headline_label_falls_back_to_ascii_on_a_c_locale_stream(tmp_path):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    reporter = ProgressReporter(tmp_path, total_steps=10, stream=stream, interactive=False,
                                headline=[("temperature", "τ")])
    reporter.log(1, {"loss": 1.0, "lr": 0.1, "temperature": 0.05})
    stream.flush()
    assert stream.buffer.getvalue().decode() == "step 1/10 | loss 1 | lr 0.1 | tau 0.05\n"


@pytest.mark.slow
@pytest.mark.parametrize("objective,headline", [("ocl", "τ"), ("mae", None)])
def test_training_console_is_short_and_metrics_jsonl_keeps_everything(tmp_path, capsys, objective, headline):
    cfg = tiny_config(tmp_path, f"objective.name={objective}", "train.epochs=1", "train.log_every=2",
                      *(["mask.name=random", "mask.ratio=0.75", "objective.decoder.dim=32",
                         "objective.decoder.depth=1", "objective.decoder.num_heads=2"] if objective == "mae" else []))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.engine.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4  # steps 2, 4, 6, 8
    for line in lines:
        assert len(line) <= 100, line
        assert " | loss " in line and " | lr " in line and " | img/s " in line
        assert (f" | {headline} " in line) if headline else (" | τ " not in line)
    assert " | ETA " in lines[-1]
    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "img_per_s", "tokens_per_s", "flops_per_s", "data_wait_frac", "grad_norm",
                "time_step_s", "epoch", *(["temperature", "pos_cos", "neg_cos"] if objective == "ocl" else [])):
        assert all(key in r for r in records), key


# ----------------------------------------------------------------------------- plots

def write_metrics(run_dir: Path, lines) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
    return run_dir


@pytest.mark.slow
def test_plot_overlays_runs_one_png_per_curve(tmp_path, capsys):
    ocl = write_metrics(tmp_path / "ocl", [
        {"step": 1, "loss": 5.0, "lr": 1e-4, "temperature": 0.07, "img_per_s": 500.0, "engine": "single"},
        {"step": 2, "loss": 9.9, "lr": 2e-4, "temperature": 0.069, "img_per_s": 510.0},
        {"step": 2, "kind": "eval", "knn_top1": 70.0, "knn_top5": 95.0},
        {"step": 3, "loss": 4.0, "lr": 3e-4, "temperature": 0.068, "img_per_s": 520.0},
        # resumed from the step-2 checkpoint: its steps are logged again, and they win
        {"step": 2, "loss": 4.5, "lr": 2e-4, "temperature": 0.069, "img_per_s": 505.0},
        '{"step": 3, "loss": 4.1, "lr"',  # cut short by a crash
    ])
    mae = write_metrics(tmp_path / "mae", [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "img_per_s": 800.0}
                                           for s in (1, 2, 3)])
    out = tmp_path / "plots"
    assert plot.main([str(ocl), str(mae / "metrics.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    written = {Path(p).name for p in printed.out.split()}
    assert written == {"loss.png", "lr.png", "temperature.png", "knn.png", "throughput.png", "curves.png"}
    for name in written:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    run = plot.read_run(ocl / "metrics.jsonl", "ocl")
    assert run.series(plot.CURVES[0]) == ([1.0, 2.0, 3.0], [5.0, 4.5, 4.0])
    assert run.skipped_lines == 1
    assert "skipped 1 unreadable line" in printed.err


def test_plot_leaves_out_curves_no_run_logged_and_defaults_to_the_run_dir(tmp_path, capsys):
    mae = write_metrics(tmp_path / "mae", [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "img_per_s": 800.0}
                                           for s in (1, 2)])
    assert plot.main([str(mae)]) == 0
    assert sorted(p.name for p in mae.glob("*.png")) == ["curves.png", "loss.png", "lr.png", "throughput.png"]


@pytest.mark.parametrize("content,why", [(None, "no such metrics file"), ("", "holds no metrics records"),
                                         ("[1, 2]\nnot json\n", "holds no metrics records")])
def test_plot_user_errors_are_one_line_exit_2(tmp_path, content, why):
    run = tmp_path / "run"
    if content is not None:
        write_metrics(run, [content])
    done = subprocess.run([sys.executable, "-m", "scale.plot", str(run)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and why in done.stderr and str(run) in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- demo

DEMO_TINY = ["train.epochs=1", "train.micro_batch=32", "train.log_every=4", "data.num_workers=0", "eval.micro_batch=64"]


def demo_rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        match = re.fullmatch(r"  (.+?)\s+(\d+\.\d\d)%", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    return rows


def run_dir_of(out: str) -> Path:
    return Path(re.search(r"demo: curves\s+(\S+)", out).group(1)).parent


@pytest.mark.slow
def test_demo_on_synthetic_data_ends_with_the_table_the_curves_and_what_they_mean(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "ensure_fashion_mnist", lambda: "not installed in this test")
    status = demo.main(["--output-dir", str(tmp_path / "demo"), "data.num_samples=320", *DEMO_TINY])
    out = capsys.readouterr().out
    assert status == 0
    rows = demo_rows(out)
    assert len(rows) == 3 and "raw pixels" in rows and "same encoder at random init" in rows
    assert "SYNTHETIC" in out and "not how good the encoder is on real images" in out
    run = run_dir_of(out)
    assert run == (tmp_path / "demo").resolve()
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC and (run / "knn.png").is_file()


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x0800 | array.ndim).to_bytes(4, "big")
    path.write_bytes(magic + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, seed: int = 0) -> Path:
    """Tiny IDX files in the upstream layout: class k is a bright bar at row 2k+4, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    for prefix, n in (("train", 192), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4: 2 * k + 7, 4:24] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.mark.slow
def test_demo_on_fashion_mnist_computes_the_baselines_it_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "FASHION_MNIST", fake_fashion_mnist(tmp_path / "idx"))
    data_dir = tmp_path / "shards"
    status = demo.main(["--output-dir", str(tmp_path / "demo"), "--data-dir", str(data_dir), *DEMO_TINY])
    out = capsys.readouterr().out
    assert status == 0, out
    assert (data_dir / "train" / "manifest.json").is_file()
    assert "Fashion-MNIST test split" in out and "SYNTHETIC" not in out
    rows = demo_rows(out)
    # The raw-pixel row, recomputed here without the demo's code: pixels in [0, 1], DINO's kNN.
    cfg = tiny_config(tmp_path, "data.name=webdataset", f"data.root={data_dir / 'train'}",
                      f"data.val_root={data_dir / 'test'}", "model.name=vit_tiny_patch7_28",
                      "data.mean=[0.286]", "data.std=[0.353]")

    def pixels(train: bool):
        images, labels = [], []
        for x, y in iterate_split(build_split(cfg.data, demo_spec(), train=train), 64):
            images.append((x * 0.353 + 0.286).flatten(1))
            labels.append(y.long())
        return torch.cat(images), torch.cat(labels)

    assert rows["raw pixels"] == pytest.approx(knn_accuracy(pixels(True), pixels(False))["top1"], abs=0.006)
    trained = next(v for k, v in rows.items() if k.startswith("OCL"))
    knn_lines = [json.loads(l) for l in (run_dir_of(out) / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in l]
    assert trained == pytest.approx(knn_lines[-1]["knn_top1"], abs=0.006)  # the trainer's last kNN, not a quote


def demo_spec():
    from scale.models import model_spec
    return model_spec("vit_tiny_patch7_28", 28, 1)

