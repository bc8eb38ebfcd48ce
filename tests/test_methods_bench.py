"""bench/methods_fashion_mnist.py on tiny synthetic shards: every output, resuming without redoing
finished work, an interrupted run continuing from its checkpoint, and a bad --only as one line."""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import signal
import statistics
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale.trainer import Trainer  # the benches train through it (scale.trainer.train_until)

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[1]
TWO = ["--only", "OCL", "MAE + EHM"]


def write_split(directory: Path, split: str, sizes: list) -> None:
    """Shards of 28 x 28 grey PNGs (class c: a bright band at row 2c, plus noise) with .cls labels."""
    directory.mkdir(parents=True)
    rng, index, shards = np.random.default_rng(len(split)), 0, []
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        with tarfile.open(directory / name, "w") as tar:
            for _ in range(n):
                label = index % 10
                pixels = rng.integers(0, 80, (28, 28), dtype=np.uint8)
                pixels[2 * label:2 * label + 4] = 255
                png = io.BytesIO()
                Image.fromarray(pixels, "L").save(png, "PNG")
                for ext, data in (("png", png.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        shards.append({"name": name, "num_samples": n, "sha256": ""})
    (directory / "manifest.json").write_text(json.dumps({
        "format": "scale-wds-v1", "split": split, "total_samples": sum(sizes), "shards": shards,
        "classes": {str(c): c for c in range(10)}, "options": {}, "skipped": []}))


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.methods_fashion_mnist")  # the repo root is on sys.path (conftest.py)


@pytest.fixture
def data(tmp_path):
    write_split(tmp_path / "data/train", "train", [64, 64])
    write_split(tmp_path / "data/test", "test", [64])
    return tmp_path / "data"


def tiny_argv(tmp_path: Path, data: Path, *extra: str) -> list:
    return ["--data-dir", str(data), "--train-shards", "", "--seeds", "0", "--steps", "4", "--curve-points", "2",
            "--max-train-samples", "64", "--curve-bank", "32", "--curve-test", "32",
            "--probe", "probe.global_batch=32", "--probe", "probe.micro_batch=32", "--probe", "probe.epochs=2",
            "--probe", "probe.warmup_epochs=0",
            "--finetune", "finetune.global_batch=16", "--finetune", "finetune.micro_batch=16",
            "--finetune", "finetune.max_steps=1", "--finetune", "data.num_workers=0",
            "--cost-steps", "1", "--gemm-size", "64",
            "--out-dir", str(tmp_path / "study"), "--out", str(tmp_path / "methods.json"),
            "--figure", str(tmp_path / "methods.png"),
            "--set", "train.global_batch=16", "data.num_workers=0", "train.log_every=1", *extra]


def forbid(monkeypatch, bench, *names: str) -> None:
    """Any call of these (module attribute or Trainer method) fails the test: nothing may be redone."""
    def fail(*args, **kwargs):
        raise AssertionError("work redone on resume")
    for name in names:
        if name.startswith("Trainer."):
            monkeypatch.setattr(Trainer, name.split(".")[1], fail)
        else:
            monkeypatch.setattr(bench, name, fail)


@pytest.mark.long
def test_tiny_study_writes_json_figure_tables_and_resumes_without_redoing(bench, tmp_path, data, capsys,
                                                                            monkeypatch):
    argv = tiny_argv(tmp_path, data, *TWO)
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "methods.json").read_text())
    assert [(r["method"], r["seed"], r["steps"]) for r in result["runs"]] == [("OCL", 0, 4), ("MAE + EHM", 0, 4)]
    for run in result["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 2, 4]
        minutes = [p["trained_min"] for p in run["curve"]]
        assert minutes[0] == 0 < minutes[1] < minutes[2] == pytest.approx(run["trained_min"])
        assert run["segments"] == 2 and run["img_per_s"] > 0
        assert 0 <= run["knn_top1"] <= 100 and 0 <= run["linear_top1"] <= 100
    assert [r["name"] for r in result["references"]][0] == "raw pixels"
    assert [r["init"] for r in result["references"][1:]] == ["mocov3", "mae"]  # OCL's init, MAE's
    assert all("finetune" in r for r in result["references"][1:])
    assert set(result["finetune"]) == {"OCL", "MAE + EHM"} and result["finetune"]["OCL"]["steps"] == 1
    assert set(result["cost"]) == {"OCL", "MAE + EHM"}
    ehm = result["cost"]["MAE + EHM"]
    assert ehm["mask_signal_flops_per_step"] > 0 == result["cost"]["OCL"]["mask_signal_flops_per_step"]
    assert 0 < ehm["ratio"] and ehm["peak_mem_bytes"] > 0
    assert (tmp_path / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accuracy, cost = result["tables"]["accuracy"].splitlines(), result["tables"]["cost"].splitlines()
    assert accuracy[0].startswith("| method (4 steps of 16) | seeds |") and len(accuracy) == 2 + 2 + 3
    assert accuracy[2].startswith("| OCL | 1 |") and "(seed 0; [CLS] std " in accuracy[2]
    assert result["finetune"]["OCL"]["cls_std"] > 0
    assert accuracy[4].startswith("| raw pixels | - |") and "(from scratch)" in accuracy[5]
    assert cost[0].startswith("| method | img/s") and "ratio to GEMM" in cost[0] and len(cost) == 2 + 2
    assert result["tables"]["accuracy"] in printed and result["tables"]["cost"] in printed
    assert result["tables"]["equal_time"] in printed and set(result["equal_time"]["methods"]) == {"OCL", "MAE + EHM"}

    # Again: nothing is trained, scored, fine-tuned or measured a second time; the outputs are rewritten.
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("*.json")}
    forbid(monkeypatch, bench, "Trainer.fit", "Trainer.__init__", "run_finetune", "finetune_model", "run_child",
           "encode_splits")
    (tmp_path / "methods.png").unlink()
    assert bench.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("*.json")} == done
    again = json.loads((tmp_path / "methods.json").read_text())
    assert again["runs"] == result["runs"] and again["tables"] == result["tables"]
    assert (tmp_path / "methods.png").is_file()


def test_an_interrupted_run_continues_from_its_checkpoint(bench, tmp_path, data, monkeypatch):
    argv = tiny_argv(tmp_path, data, "--only", "MAE", "--skip-references", "--skip-finetune", "--skip-cost")
    calls, steps_run = [], []
    real_step, real_fit = Trainer.train_step, Trainer.fit

    def train_step(self, images):
        calls.append(self.step)
        if len(calls) == 3:  # SIGTERM in the second segment (steps 3..4): the trainer saves step 3 and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images)

    def fit(self):
        summary = real_fit(self)
        steps_run.append((summary.final_step - summary.steps_done, summary.final_step))
        return summary

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "fit", fit)
    assert bench.main(argv) == 130
    run = tmp_path / "study/mae_seed0"
    assert not (run / "result.json").exists()
    assert steps_run == [(0, 2), (2, 3)]
    assert [p["step"] for p in json.loads((run / "progress.json").read_text())["curve"]] == [0, 2]

    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert bench.main(argv) == 0
    assert steps_run[2:] == [(3, 4)]  # from the saved step 3: no step trained twice
    record = json.loads((run / "result.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 2, 4] and record["segments"] == 3


def test_unknown_method_is_one_line_exit_2(bench, tmp_path, data, capsys):
    assert bench.main(tiny_argv(tmp_path, data, "--only", "OCL", "MAE+EHM")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only MAE+EHM" in err[0] and "MAE + EHM" in err[0]  # names the choices
    assert not (tmp_path / "study").exists()


def test_the_curve_protocol_is_a_prefix_of_the_final_features(bench, tmp_path, data):
    """The figure's last point is read off the final features' first rows: they must be the features
    a curve point computes (the same images, in the same order)."""
    import argparse

    from scale.eval.baselines import random_init_encoder

    args = argparse.Namespace(data_dir=str(data), train_shards="", overrides=["data.num_workers=0"])
    cfg = bench.run_config(args, "mae_fashion_mnist_cpu", tmp_path / "run", *bench.method_overrides((), args))
    encoder = random_init_encoder(cfg)
    (full_x, full_y), (full_qx, full_qy) = bench.encode_splits(encoder, cfg, 0, 0)
    (x, y), (qx, qy) = bench.encode_splits(encoder, cfg, 32, 40)
    assert len(full_x) == 128 and len(x) == 32 and len(qx) == 40
    assert (full_y[:32] == y).all() and (full_qy[:40] == qy).all()
    assert (full_x[:32] - x).abs().max() < 1e-5 and (full_qx[:40] - qx).abs().max() < 1e-5
    assert bench.knn_point((full_x, full_y), (full_qx, full_qy), 32, 40) == bench.knn_point((x, y), (qx, qy), 0, 0)


def test_equal_time_reads_every_method_at_the_cheapest_methods_minutes(bench):
    """The budget is the cheapest method's mean minutes; each run is read linearly between the curve
    points around it (a 2x slower method is halfway through its steps there)."""
    def run(method, seed, minutes, knn):
        curve = [{"step": s, "trained_min": m, "knn_top1": k} for s, m, k in zip((0, 50, 100), minutes, knn)]
        return {"method": method, "seed": seed, "trained_min": minutes[-1], "curve": curve}

    runs = [run("MAE", 0, (0, 5, 10), (20, 60, 70)), run("MAE", 1, (0, 6, 12), (20, 62, 74)),
            run("OCL", 0, (0, 11, 22), (30, 70, 80)), run("OCL", 1, (0, 10, 20), (30, 66, 84))]
    same = bench.equal_time(runs)
    assert same["minutes"] == pytest.approx(11.0)
    mae, ocl = same["methods"]["MAE"], same["methods"]["OCL"]
    # MAE seed 0 finished at 10 min: its last point; seed 1 is 5/6 of the way from its 6-min point to its 12-min one
    assert mae["knn"] == pytest.approx([70, 72]) and mae["steps"] == pytest.approx((100 + 50 + 50 * 5 / 6) / 2)
    assert ocl["knn"] == pytest.approx([70, 67.8]) and ocl["steps"] == pytest.approx((50 + 55) / 2)
    assert ocl["knn_std"] == pytest.approx(statistics.stdev([70, 67.8]))
    table = bench.equal_time_table(argparse.Namespace(steps=100), runs, same).splitlines()
    assert "11.0 training min" in table[0] and table[3].startswith("| OCL | 52 | 68.90 +- 1.56")


def test_paired_table_subtracts_seed_by_seed_and_skips_absent_pairs(bench):
    runs = [{"method": m, "seed": s, "knn_top1": k, "linear_top1": k + 5}
            for m, s, k in (("OCL", 0, 70.0), ("OCL", 1, 72.0), ("MAE", 0, 66.0), ("MAE", 1, 71.0), ("MAE", 2, 60.0))]
    lines = bench.paired_table(runs).splitlines()
    assert len(lines) == 3  # only OCL - MAE has both methods; seed 2 has no OCL run to pair with
    assert lines[2] == "| OCL - MAE | 2 | +2.50 +- 2.12 (+4.00, +1.00) | +2.50 +- 2.12 (+4.00, +1.00) |"


def test_a_damaged_state_file_is_one_line_exit_2(bench, tmp_path, data, capsys):
    argv = tiny_argv(tmp_path, data, "--only", "MAE")
    (tmp_path / "study").mkdir()
    (tmp_path / "study/plan.json").write_text("{half a plan")
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan.json: not a JSON file this study wrote" in err[0] and "Traceback" not in err[0]
    assert (tmp_path / "study/plan.json").read_text() == "{half a plan"  # nothing written over
