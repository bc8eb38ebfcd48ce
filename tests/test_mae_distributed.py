"""MAE on every engine: 2-rank DDP and FSDP2 gradients equal one process (one pass and exact
accumulation, one gradient synchronisation per step); FSDP2 and DeepSpeed runs train and export."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY_OVERRIDES, python_env
from test_mae import MAE_TINY

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests/dist_scripts/mae_worker.py"


def _env():

    env = python_env()
    for key in [k for k in env if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))]:
        env.pop(key)
    return env


def _torchrun(*args, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_one_sync_per_step(tmp_path, engine):
    _torchrun(str(WORKER), "--engine", engine, "--out", str(tmp_path))
    result = json.loads((tmp_path / f"mae_{engine}_rank0.json").read_text())
    assert result["world_size"] == 2 and result["plan_mode"] == "accumulate"
    assert result["signal_shape"] == [8, 50, 50] and result["signal_max_diff"] < 1e-5
    for mode in ("one_pass", "accumulate"):
        r = result[mode]
        assert not r["missing"], r
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["max_rel_diff"] < 1e-4, r
    if engine == "ddp":  # one all-reduce of each gradient bucket, whatever the number of micro-batches
        assert result["syncs"]["accumulate"] == result["syncs"]["one_pass"] > 0, result["syncs"]
    else:  # FSDP2: one reduce-scatter per unit, once
        assert result["syncs"]["accumulate"] == result["syncs"]["one_pass"] > 0, result["syncs"]


@pytest.mark.long
@pytest.mark.parametrize("engine,extra", [("fsdp", []), ("deepspeed", ["engine.zero_stage=3"])])
def test_fsdp_and_deepspeed_runs_train_and_export(tmp_path, engine, extra):
    out = tmp_path / "run"
    _torchrun("-m", "scale.train", *TINY_OVERRIDES, *MAE_TINY, f"engine.name={engine}", *extra,
              "train.max_steps=3", "train.global_batch=16", "train.micro_batch=4", f"train.output_dir={out}")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3
    target = tmp_path / "enc.safetensors"
    done = subprocess.run([sys.executable, "-m", "scale.export", "--checkpoint", str(out), "--out", str(target)],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from scale.export import timm_model_from_export

    model = timm_model_from_export(target)  # strict: encoder only, decoder dropped
    assert not any("decoder" in k for k in model.state_dict())
