"""DeepSpeed reliability: parameter bounds on the fp32 master copy, an fp32 temperature under bf16,
and checkpoints read without running code (resume and export).

The multi-process checks run in one torchrun launch (2 ranks, gloo; tests/dist_scripts/
deepspeed_reliability.py, ~25 s on 2 cores once DeepSpeed's CPU comm op is built); the
export checks read the checkpoints that launch wrote, in this process.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale.config import ConfigError
from scale.engine import EngineRun, SingleProcessEngine, plan_batch
from scale.engine.deepspeed_engine import FORCE_WEIGHTS_ONLY, deepspeed_config
from scale.errors import UserError
from scale.masking import MaskContext, build_mask_generator
from scale.objectives.ocl import OCLObjective
from scale.pretraining import build_pretrain_module

from conftest import REPO, python_env, tiny_config

pytestmark = pytest.mark.distributed

SCRIPT = REPO / "tests" / "dist_scripts" / "deepspeed_reliability.py"
BOUND = torch.tensor(math.log(0.07)).item()  # the pinned log-temperature, as fp32
BF16_STEP = 2.0 ** -6  # bf16's spacing for |x| in [2, 4): a log-temperature near -2.66
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "ACCELERATE_USE_DEEPSPEED",
               "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


class CreatesFile:
    """Unpickling this creates `marker` (what a crafted checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed_reliability")
    env = python_env({"OMP_NUM_THREADS": "1", "SCALE_TEST_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    for name in LAUNCH_VARS:
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "bounds,bf16", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# ----------------------------------------------------------------------------- A: bounds

@pytest.mark.parametrize("label", ["zero1", "zero2", "zero3", "ddp", "fsdp"])
def test_temperature_bound_holds_on_module_and_master_copies(launch, label):
    """log τ pinned (min = init = max temperature), lr 0.05: every step moves it off the bound.
    After engine.step() alone, the module's copy and DeepSpeed's fp32 master copy are the bound."""
    for rank, results in enumerate(launch[1]):
        assert results["bounds"]["bound"] == BOUND
        copies = results["bounds"][label]
        assert copies["module"] == [BOUND], (label, rank, copies)
        if label.startswith("zero"):
            assert copies["master"] == [BOUND], (label, rank, copies)


def test_single_engine_applies_bounds_in_step(tmp_path):
    cfg = tiny_config(tmp_path, "model.name=vit_tiny_patch7_28", "train.micro_batch=4",
                      *(f"objective.{k}_temperature=0.07" for k in ("min", "init", "max")))
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    engine = SingleProcessEngine(torch.device("cpu"))
    engine.setup(module, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05),
                 plan_batch(cfg.train, 1, module.objective.couples_batch))
    masks = build_mask_generator(cfg.mask, module.encoder.spec.grid_size)(
        4, MaskContext(torch.Generator().manual_seed(0), torch.device("cpu")))
    module(torch.randn(4, 1, 28, 28), masks).loss.backward()
    assert module.objective.log_temperature.grad.abs().item() > 0
    engine.step(None)
    assert module.objective.log_temperature.item() == BOUND


def test_objective_declares_bounds():
    objective = OCLObjective(8, min_temperature=0.01, max_temperature=0.5)
    assert objective.parameter_bounds() == {"log_temperature": (math.log(0.01), math.log(0.5))}


# ----------------------------------------------------------------------------- B: bf16

@pytest.mark.parametrize("label", ["zero1", "zero3"])
def test_bf16_keeps_temperature_and_head_fp32_while_the_encoder_runs_bf16(launch, label):
    for rank, results in enumerate(launch[1]):
        run = results["bf16"][label]
        assert run["autocast"] == {"enabled": True, "dtype": "bfloat16"} and run["bf16"] == {"enabled": False}
        assert run["encoder_fc1_output"] == "torch.bfloat16", run  # the encoder computes in bf16
        assert run["head_output"] == "torch.float32" and run["head_dtypes"] == ["torch.float32"], run
        before, after = run["before"], run["after"]
        assert after["module_dtype"] == after["master_dtype"] == "torch.float32", run
        assert after["module"] == after["master"], run
        # Three Adam steps at lr 1e-3 move log τ by ~3e-3, well under half a bf16 step: a bf16
        # copy would not have moved (or would have jumped a whole 1/64).
        moved = abs(after["module"][0] - before["module"][0])
        assert 1e-4 < moved < BF16_STEP / 2, run


def test_precision_decides_deepspeed_autocast_on_every_device(tmp_path):
    for precision, device, enabled in (("bf16", "cpu", True), ("auto", "cpu", False), ("fp32", "cpu", False),
                                       ("auto", "cuda", True), ("fp32", "cuda", False)):
        cfg = tiny_config(tmp_path, f"train.precision={precision}")
        ds = deepspeed_config(cfg.engine, EngineRun.of(cfg), plan_batch(cfg.train, 1), torch.device(device))
        assert ds["torch_autocast"] == {"enabled": enabled, "dtype": "bfloat16"}, (precision, device)
        assert ds["bf16"]["enabled"] is False  # DeepSpeed's bf16 mode would cast the temperature to bf16


@pytest.mark.parametrize("section, match", [
    ({"bf16": {"enabled": True}}, "bf16.enabled=True is DeepSpeed's bf16 mode"),
    ({"torch_autocast": {"enabled": "auto", "dtype": "float16"}}, "torch_autocast.dtype='float16'"),
    ({"torch_autocast": {"enabled": True}}, "torch_autocast.enabled=True contradicts"),
    ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal"),
])
def test_deepspeed_json_that_defeats_the_fp32_objective_or_safe_loading_is_refused(tmp_path, section, match):
    recipe = json.loads((REPO / "recipes" / "deepspeed" / "zero2.json").read_text())
    recipe.update(section)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(recipe))
    cfg = tiny_config(tmp_path, f"engine.deepspeed_config={path}", "train.precision=fp32")
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(cfg.engine, EngineRun.of(cfg), plan_batch(cfg.train, 1), torch.device("cpu"))


# ----------------------------------------------------------------------------- D: loading never runs code

@pytest.mark.parametrize("label", ["zero1", "zero2", "zero3"])
def test_resume_reads_deepspeed_checkpoints_as_plain_data_and_refuses_crafted_files(launch, label):
    out, ranks = launch
    for rank, results in enumerate(ranks):
        run = results["bounds"][label]
        assert run["resumed_extra"]["note"] == label and run["resumed"]["master"] == [BOUND]
        for kind in ("model_states", "optim_states"):
            refused = run[f"crafted_{kind}"]
            assert refused["refused"] and refused["type"] == "CheckpointFileError", refused
            assert not refused["marker_exists"], refused
            assert f"crafted/{label}_{kind}/deepspeed/" in refused["error"] and f"{kind}.pt:" in refused["error"], refused
            assert "refused" in refused["error"] and "\n" not in refused["error"], refused
        assert not list(out.glob("pwned_*"))


def _crafted_copy(source: Path, target: Path, pattern: str, marker: Path) -> Path:
    shutil.copytree(source, target)
    files = sorted((target / "deepspeed").glob(pattern))
    assert files
    for path in files:
        torch.save({"module": CreatesFile(marker), "optimizer_state_dict": CreatesFile(marker)}, path)
    return files[0]


@pytest.mark.parametrize("label", ["zero1", "zero2", "zero3"])
def test_export_reads_deepspeed_checkpoints_as_plain_data_and_refuses_crafted_files(launch, label, tmp_path,
                                                                                     capsys):
    from scale.export import load_checkpoint, main

    saved = launch[0] / "checkpoints" / label
    loaded = load_checkpoint(saved)  # zero_to_fp32 under weights_only=True: DeepSpeed's own files pass
    assert loaded.format == "deepspeed"
    assert loaded.model_state["objective.log_temperature"].reshape(-1).tolist() == [BOUND]
    assert any(k.startswith("encoder.") for k in loaded.model_state)
    assert FORCE_WEIGHTS_ONLY not in os.environ

    for kind, pattern in (("model_states", "*model_states.pt"), ("optim_states", "*optim_states.pt")):
        marker = tmp_path / f"pwned_{kind}"
        crafted = _crafted_copy(saved, tmp_path / kind, pattern, marker)
        with pytest.raises(UserError) as err:
            load_checkpoint(tmp_path / kind)
        assert str(crafted) in str(err.value) and "refused" in str(err.value), err.value
        assert not marker.exists() and FORCE_WEIGHTS_ONLY not in os.environ
        capsys.readouterr()
        assert main(["--checkpoint", str(tmp_path / kind), "--out", str(tmp_path / "x.safetensors")]) == 2
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and str(crafted) in stderr, stderr
        assert not marker.exists() and not (tmp_path / "x.safetensors").exists()
