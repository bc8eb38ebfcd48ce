"""bench/gpu_check.py: every CUDA check's code path runs on the CPU (`--device cpu --smoke`), as it would
on the GPU machine (webdataset hidden: synthetic data imports none, nothing stands in for it); without
CUDA it refuses in one
line; a check that overruns its time is reported FAILED and the others' JSON is still written."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, python_env

pytestmark = pytest.mark.bench

CHECKS = ("attention", "parity", "flop_ratio", "fsdp", "memory", "ehm", "decode")


def _run(*args, env=None, timeout=900):  # a hang guard (~70 s idle), not a timing check: a loaded CI is slow
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, env=env or python_env(),
                          capture_output=True, text=True, timeout=timeout)


def _without_webdataset(tmp_path):
    """An environment where `import webdataset` fails, as on the GPU machine (its image lacks it)."""
    hide = tmp_path / "hide"
    (hide / "webdataset").mkdir(parents=True)
    (hide / "webdataset" / "__init__.py").write_text("raise ImportError('hidden by tests/test_gpu_check.py')\n")
    env = python_env({"CUDA_VISIBLE_DEVICES": ""})
    env["PYTHONPATH"] = os.pathsep.join([str(hide), env["PYTHONPATH"]])
    return env


@pytest.mark.long
def test_smoke_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = _run("--device", "cpu", "--smoke", "--json", str(out), env=_without_webdataset(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["ok"]
    assert report["env"]["torch"] and "xformers" in report["env"] and report["env"]["gpu"] is None
    assert report["env"]["webdataset"] == "absent (synthetic data only)"  # no stand-in package: none is needed
    assert set(report["checks"]) == set(CHECKS)
    for name in CHECKS:
        check = report["checks"][name]
        assert check["status"] == "ok", (name, check["reason"])
        assert check["rows"] and not check["over_tolerance"], (name, check)
        for row in check["rows"]:
            optional = row.get("backend") == "xformers" or row["case"].startswith("loader paths")  # needs webdataset
            allowed = ("ok", "not installed", "skipped") if optional else ("ok",)
            assert row["status"] in allowed, (name, row)

    rows = {name: report["checks"][name]["rows"] for name in CHECKS}
    compared = [r for r in rows["attention"] if r["status"] == "ok" and "bf16" in r]
    assert {r["backend"] for r in compared} >= {"math", "sdpa"}
    assert {(r["shape"]["recipe"], r["shape"]["part"]) for r in compared} == {
        ("ocl_vitb16", "encoder"), ("ocl_vitl16", "encoder"), ("mae_vitb16", "encoder"), ("mae_vitb16", "decoder"),
        ("mae_vitl16", "encoder"), ("mae_vitl16", "decoder")}
    for r in compared:
        assert r["bf16"]["out_max_abs_err"] >= 0 and r["bf16"]["grad_max_abs_err"] >= 0
    assert all(r["fp32"]["out_rel"] < 1e-4 for r in compared if r["backend"] == "sdpa")
    assert [r["case"].split(":")[0] for r in rows["parity"]] == ["ocl_vitb16", "mae_vitb16"]
    for r in rows["parity"]:
        assert len(r["losses"]["fp32"]) == len(r["losses"]["bf16"]) == 3 and r["max_rel_diff"] < r["rtol"]
    assert len(rows["flop_ratio"]) == 3 and all(r["ratio"] > 0 and r["flops_per_step"] > 0 for r in rows["flop_ratio"])
    (fsdp,) = rows["fsdp"]
    assert fsdp["backend"] == "gloo" and fsdp["checkpoint_saved"] and fsdp["resumed"]
    assert fsdp["resume_max_rel_diff"] < 1e-5  # CPU: the resumed steps equal the uninterrupted ones
    assert len(rows["memory"]) == 5 and all(r["peak_mem_bytes"] > 0 for r in rows["memory"])
    assert all("estimate_bytes" in r for r in rows["memory"] if r["case"].startswith("ocl"))
    (ehm,) = rows["ehm"]  # bench/ehm_cost.py's measure, on the tiny model
    assert (ehm["preset"], ehm["batch"], ehm["steps"], ehm["device"]) == ("vit_tiny_patch7_28", 4, 2, "cpu")
    for key in ("signal_per_step", "tree_per_step", "mask_per_step", "ehm_step_per_random_step",
                "signal_flops_per_random_step_flops", "greedy_per_rnn_tree"):
        assert 0 < ehm[key] < float("inf"), (key, ehm[key])
    assert math.isfinite(ehm["ehm_rest_per_random_step"])  # a difference of medians, ~1 on a quiet machine
    assert ehm["signal_per_step"] + ehm["tree_per_step"] == pytest.approx(ehm["mask_per_step"])
    assert ehm["trees_identical"] and ehm["rounds"]["rnn"] > 0 and ehm["rounds"]["greedy"] > 0
    assert "identical yes" in ehm["summary"]
    decode, loader = rows["decode"]  # the device path on the CPU; the loader row needs the hidden webdataset
    assert decode["images"] == 16 and decode["pixel_mean_abs_levels"] < 3 and decode["device_decode_ms_per_image"] > 0
    assert loader["status"] == "skipped" and "webdataset" in loader["reason"]

    lines = done.stdout.splitlines()
    assert lines[0].startswith("# gpu_check SMOKE on cpu: torch") and "xformers" in lines[1]
    assert any(line.split()[:2] == ["check", "case"] for line in lines)
    for name in CHECKS:
        assert any(line.startswith(name) and "== check" in line and " ok " in line for line in lines), name
    assert [line.split()[0] for line in lines if "== check" in line] == list(CHECKS)  # the default order
    assert (tmp_path / "gpu_check.log").is_file()


@pytest.mark.parametrize("args,says", [((), "no CUDA device is present"), (("--device", "cpu"), "needs --smoke")])
def test_refuses_in_one_line_without_cuda_or_smoke(args, says):
    done = _run(*args, env=python_env({"CUDA_VISIBLE_DEVICES": ""}), timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (done.returncode, lines)


def test_a_check_that_runs_out_of_time_is_failed_and_reported(tmp_path):
    out = tmp_path / "partial.json"
    # fsdp takes 5-10 s here (start-up + three short runs with checkpoints): a 3 s budget cannot hold it.
    # Depending on how long the parent took to start, the child is killed ("timed out") or never started.
    done = _run("--device", "cpu", "--smoke", "--only", "fsdp", "--budget-s", "3", "--json", str(out), timeout=120)
    assert done.returncode == 1
    report = json.loads(out.read_text())
    fsdp = report["checks"]["fsdp"]
    assert fsdp["status"] == "FAILED", fsdp
    assert fsdp["reason"].startswith(("timed out after", "skipped: the budget ran out")), fsdp
    assert report["checks"]["attention"]["status"] == "not run" and report["complete"] and not report["ok"]
    assert any(line.startswith("fsdp") and "FAILED" in line for line in done.stdout.splitlines())


@pytest.mark.long
def test_tune_and_profile_smoke_on_cpu(tmp_path):
    """--tune --profile (issue 28, point 4) on the tiny model: each recipe as it is and auto's largest
    micro-batch; every factor changed alone on the first recipe (compile, micro-batches up to auto's, SDPA's
    kernels and xFormers, AdamW's kernels, activation checkpointing), each in its own child; the ratio table,
    the overrides that win; per recipe the top operators and host syncs of a step that does not log."""
    out = tmp_path / "tune.json"
    done = _run("--tune", "--profile", "--device", "cpu", "--smoke", "--json", str(out),
                env=python_env({"CUDA_VISIBLE_DEVICES": ""}), timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["ok"] and report["args"]["budget_s"] == 480
    assert all(report["checks"][name]["status"] == "not run" for name in CHECKS)
    tune, profile = report["checks"]["tune"]["rows"], report["checks"]["profile"]["rows"]
    recipes = ["ocl_vitb16", "ocl_vitl16", "mae_vitb16"]
    as_recipe = [r for r in tune if r["factor"] == "recipe"]
    assert [r["recipe"] for r in as_recipe] == recipes and all(r["ratio"] > 0 and r["batch"] == 4 for r in as_recipe)
    auto = [r for r in tune if r["factor"] == "auto micro-batch"]
    assert [r["recipe"] for r in auto] == recipes and all(r["largest"] == 16 for r in auto)  # the stand-in memory
    varied = {(r["factor"], r["setting"]): r for r in tune if r["factor"] not in ("recipe", "auto micro-batch")}
    assert {r["recipe"] for r in varied.values()} == {"ocl_vitb16"}
    assert set(varied) == {("compile", "on"), ("micro-batch", "8"), ("micro-batch", "16"), ("attention", "sdpa flash"),
                           ("attention", "sdpa efficient"), ("attention", "sdpa cudnn"), ("attention", "xformers"),
                           ("AdamW", "fused"), ("AdamW", "foreach"), ("activation checkpointing", "full")}
    skipped = {key for key, r in varied.items() if r["status"] == "skipped"}
    assert skipped == {("attention", "sdpa efficient"), ("attention", "sdpa cudnn"), ("attention", "xformers")}
    for key, r in varied.items():
        if key not in skipped:
            assert r["status"] == "ok" and r["ratio"] > 0 and r["vs_recipe"] > 0, r
    assert varied[("micro-batch", "16")]["batch"] == 16 and varied[("micro-batch", "16")]["override"] == "train.micro_batch=16"
    assert set(report["tune"]["winners"]) == set(recipes)
    assert report["tune"]["table"][0].startswith("| recipe | factor | setting | train-step FLOP/s / GEMM")
    assert "# --tune: train-step FLOP/s over the FLOP/s of a fp32 256^3 GEMM" in done.stdout
    assert all(f"# overrides that win for {name}" in done.stdout for name in recipes)

    assert [r["recipe"] for r in profile] == recipes
    for r in profile:
        assert 0 < len(r["top_kernels"]) <= 15 and all(0 < k["share"] <= 1 for k in r["top_kernels"])
        assert r["host_syncs_per_step"] >= 0 and r["steps"] == 2
        assert (tmp_path / f"tune_profile_{r['recipe']}.txt").is_file()
    assert report["seconds"] <= 480


def test_tune_table_names_the_overrides_that_beat_the_recipe():
    from bench.gpu_check import tune_table

    def row(factor, setting, ratio, override=""):
        return {"recipe": "r", "factor": factor, "setting": setting, "override": override, "status": "ok",
                "ratio": ratio, "vs_recipe": ratio / 0.30, "img_per_s": 1.0, "batch": 4, "peak_mem_bytes": 1}

    rows = [row("recipe", "as the recipe", 0.30), row("compile", "on", 0.36, "train.compile=true"),
            row("micro-batch", "8", 0.33, "train.micro_batch=8"), row("micro-batch", "16", 0.40, "train.micro_batch=16"),
            row("AdamW", "foreach", 0.303, "optim.implementation=foreach"),  # within the 2% margin: noise
            {"recipe": "r", "factor": "attention", "setting": "xformers", "override": "model.attn_backend=xformers",
             "status": "skipped", "summary": "no kernels"}]
    lines, winners = tune_table(rows)
    assert winners == {"r": ["train.compile=true", "train.micro_batch=16"]}
    assert len(lines) == 2 + len(rows) and "skipped: no kernels" in lines[-1]
