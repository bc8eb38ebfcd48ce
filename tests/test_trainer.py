import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scale.checkpoint_io import CheckpointError, CheckpointManager
from scale.models import build_encoder
from scale.pretraining import build_pretrain_module
from scale.trainer import Trainer
from scale.trainer.flops import train_step_flops
from scale.trainer.optim import build_optimizer, build_schedule, learning_rate
from scale.trainer.progress import ProgressReporter
from conftest import REPO, python_env, tiny_config


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_loss_falls_and_logs_everything(tiny_cfg):
    cfg = tiny_cfg("train.epochs=3")
    summary = Trainer(cfg).fit()
    assert summary.final_step == 24 and len(summary.losses) == 24
    first, last = sum(summary.losses[:3]) / 3, sum(summary.losses[-3:]) / 3
    assert last < first - 0.4, summary.losses  # starts near ln(32) = 3.47
    run = REPO / cfg.train.output_dir if not os.path.isabs(cfg.train.output_dir) else cfg.train.output_dir
    records = read_metrics(type(REPO)(run))
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ("loss", "lr", "temperature", "pos_cos", "neg_cos", "img_per_s", "tokens_per_s", "flops_per_s",
                "grad_norm", "skipped_samples"):
        assert key in records[-1] and math.isfinite(records[-1][key]), key
    assert records[-1]["pos_cos"] > records[-1]["neg_cos"]
    assert records[-1]["engine"] == "single"
    assert any(p.name.startswith("events.out.tfevents") for p in (type(REPO)(run) / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    full = Trainer(tiny_config(tmp_path / "a", "data.num_workers=1")).fit()
    assert full.final_step == 16
    # Stop mid-epoch 0 (step 6, after the step-4 checkpoint), then resume across the epoch boundary.
    part = Trainer(tiny_config(tmp_path / "b", "data.num_workers=1", "train.max_steps=6")).fit()
    assert part.final_step == 6 and part.losses == full.losses[:6]
    resumed = Trainer(tiny_config(tmp_path / "b", "data.num_workers=1", "train.resume=auto")).fit()
    assert resumed.steps_done == 10
    assert resumed.losses == full.losses[6:]  # to the last bit
    # Resume from an explicit older checkpoint: steps 5.. again, identical.
    again = Trainer(tiny_config(tmp_path / "b", "data.num_workers=1",
                                f"train.resume={tmp_path / 'b/run/checkpoints/step_00000012'}")).fit()
    assert again.losses == full.losses[12:]
    # metrics.jsonl is the history of the model that went on: each step once, the last run's lines after step 12.
    logged = [json.loads(line) for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16, steps


@pytest.mark.slow
def test_checkpoints_rotate_and_ignore_partial(tmp_path):
    cfg = tiny_config(tmp_path, "train.keep_last=2", "train.max_steps=12")
    Trainer(cfg).fit()
    ckpts = CheckpointManager(tmp_path / "run/checkpoints", 2)
    assert [p.name for p in ckpts.complete()] == ["step_00000008", "step_00000012"]
    # A checkpoint interrupted mid-write (no meta.json, or still a .tmp dir) is never chosen.
    (tmp_path / "run/checkpoints/step_00000016.tmp").mkdir()
    (tmp_path / "run/checkpoints/step_00000020").mkdir()
    assert ckpts.latest().name == "step_00000012"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpts.resolve(str(tmp_path / "run/checkpoints/step_00000020"))


@pytest.mark.slow
def test_sigkill_leaves_previous_checkpoint_usable(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scale.train", *[a for a in _tiny_cli(out)], "train.ckpt_every=1",
           "train.epochs=50", "train.keep_last=2"]
    proc = subprocess.Popen(cmd, env=python_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = CheckpointManager(out / "checkpoints", 2)
    deadline = time.time() + 120
    while time.time() < deadline and (ckpts.latest() is None or int(ckpts.latest().name[5:]) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # likely mid-step or mid-save
    proc.wait()
    latest = ckpts.latest()
    assert latest is not None
    resumed = Trainer(tiny_config(tmp_path, "train.resume=auto", "train.ckpt_every=1", "train.epochs=50",
                                  "train.keep_last=2", f"train.max_steps={int(latest.name[5:]) + 2}")).fit()
    assert resumed.steps_done == 2 and all(math.isfinite(x) for x in resumed.losses)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_stops(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scale.train", *_tiny_cli(out), "train.epochs=50",
                             "train.ckpt_every=1000"], env=python_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert "stopped by signal" in output, output
    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None and 0 < int(latest.name[5:]) < 400


def _tiny_cli(out):
    from conftest import TINY_OVERRIDES
    return [*TINY_OVERRIDES, f"train.output_dir={out}"]


def test_lr_scaling_warmup_and_cosine():
    cfg = tiny_config(REPO / "unused", "optim.blr=1e-3", "optim.min_lr=1e-5")
    assert learning_rate(cfg.optim, 512) == pytest.approx(2e-3)
    module = build_pretrain_module(cfg)
    opt = build_optimizer(module, cfg.optim, 2e-3)
    sched = build_schedule(opt, cfg.optim, total_steps=100, warmup_steps=10)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-3) and lrs[10] == pytest.approx(2e-3)
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:]))  # cosine decays monotonically
    assert lrs[55] == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] > 1e-5 and lrs[-1] < 2e-5


def test_param_groups_exclude_norms_biases_tokens_frozen():
    cfg = tiny_config(REPO / "unused", "optim.weight_decay=0.05")
    module = build_pretrain_module(cfg)
    opt = build_optimizer(module, cfg.optim, 1e-3)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.blocks.0.mlp.fc1.weight" in decayed
    for name in ("encoder.cls_token", "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias",
                 "encoder.norm.bias", "objective.log_temperature"):
        assert name in plain, name
    everything = decayed | plain
    assert "encoder.patch_embed.proj.weight" not in everything and "encoder.pos_embed" not in everything


def test_flop_count_matches_torch_counter():
    model = build_encoder("vit_tiny_patch4_28", attn_backend="math")
    images = torch.randn(4, 1, 28, 28)
    ids = torch.stack([torch.randperm(49)[:34].reshape(2, 17) for _ in range(4)])
    with FlopCounterMode(display=False) as counter:
        model(images, ids).sum().backward()
    ours = train_step_flops(model.spec, 4, 2, 17, train_patch_embed=False)
    assert abs(counter.get_total_flops() - ours) / ours < 0.02


def test_plain_lines_when_not_interactive(tmp_path):
    import io
    stream = io.StringIO()
    reporter = ProgressReporter(tmp_path, total_steps=10, stream=stream, interactive=False)
    reporter.log(3, {"loss": 1.5, "lr": 1e-3})
    reporter.close()
    assert stream.getvalue().strip() == "step 3/10 | loss 1.5 | lr 0.001"
