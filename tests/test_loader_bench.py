"""bench/loader_throughput.py: one run compares every data path per core and turns it into cores per GPU."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, python_env

pytestmark = pytest.mark.bench

SCRIPT = [sys.executable, "-m", "bench.loader_throughput"]


def test_one_run_reports_every_path_per_core_and_the_cores_per_gpu(tmp_path):
    out = tmp_path / "loader.json"
    done = subprocess.run([*SCRIPT, "--images", "96", "--per-shard", "32", "--batch-size", "16",
                           "--repeats", "1", "--dir", str(tmp_path / "shards"), "--out", str(out)],
                          cwd=REPO, env=python_env({"CUDA_VISIBLE_DEVICES": ""}), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpu_decode"].startswith("skipped")  # no CUDA here: said, not silently dropped
    for kind in ("pre_resized", "full_size"):
        paths = report["kinds"][kind]["paths"]
        assert set(paths) == {"plain_webdataset", "previous", "cpu", "indexed", "gpu_workers"}
        for path in paths.values():
            assert path["images"] >= 80 and path["img_per_s_per_core"] > 0 and path["img_per_worker_cpu_s"] > 0
        assert paths["previous"]["vs_previous"] == 1.0 and paths["plain_webdataset"]["vs_plain_webdataset"] == 1.0
        # uint8 batches: a quarter of the host bytes of the float paths
        assert paths["cpu"]["host_bytes_per_image"] * 4 == paths["previous"]["host_bytes_per_image"] == 3 * 224 * 224 * 4
        assert paths["indexed"]["host_bytes_per_image"] == paths["cpu"]["host_bytes_per_image"]  # the same uint8 batches
        assert paths["gpu_workers"]["host_bytes_per_image"] < paths["cpu"]["host_bytes_per_image"]  # JPEG bytes
        assert abs(sum(report["kinds"][kind]["dct_scales"].values()) - 1) < 1e-9
    rows = {(r["method"], r["model"]): r for r in report["cores_per_gpu"]}
    assert set(rows) == {("OCL", "vit_base_patch16"), ("OCL", "vit_large_patch16"), ("MAE", "vit_base_patch16"),
                         ("MAE", "vit_large_patch16")}
    for row in rows.values():
        assert row["gpu_img_per_s"] > 0 and row["train_flops_per_image"] > 0
        per_core = report["kinds"]["full_size"]["paths"]["cpu"]["img_per_s_per_core"]
        assert abs(row["cores_per_gpu"]["full_size"]["cpu"] - row["gpu_img_per_s"] / per_core) < 1e-6
    assert rows[("MAE", "vit_large_patch16")]["source"].startswith("estimated")  # not measured: said so
    assert "not in this run" in rows[("OCL", "vit_base_patch16")]["source"]
    assert "cores/GPU" in done.stdout and "| cpu |" in done.stdout


def test_unknown_kind_or_missing_results_file_is_one_line_exit_2(tmp_path):
    for args, says in ((["--kinds", "huge"], "unknown --kinds / --paths value(s) huge"),
                       (["--gpu-results", str(tmp_path / "none.json")], "no such file")):
        done = subprocess.run([*SCRIPT, *args], cwd=REPO, env=python_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
