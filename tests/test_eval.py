"""Evaluation: weighted kNN (monitor + CLI), linear probe (LARS as MAE's), fine-tuning, recipes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from scale.config import ConfigError
from scale.eval.__main__ import main
from scale.eval.config import FinetuneRecipe, LinearProbeConfig, LinearProbeRecipe, load_recipe
from scale.eval.finetune import build_classifier, build_finetune_optimizer
from scale.eval.knn import build_monitors, knn_accuracy, knn_scores
from scale.eval.linear_probe import build_lars, cached_batches, train_probe_head
from scale.models import model_spec
from scale.trainer import Trainer
from conftest import REPO, tiny_config

FAST = ("model.name=vit_tiny_patch7_28", "data.num_samples=64", "train.ckpt_every=100")
SYNTHETIC_DATA = ("data.name=synthetic", "data.num_samples=64", "data.num_workers=0", "data.mean=[0.5]",
                  "data.std=[0.25]", "data.num_classes=10")


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """2 epochs x 2 steps of OCL with the kNN monitor after every epoch."""
    cfg = tiny_config(tmp_path_factory.mktemp("knn"), *FAST, "eval.knn_every_epochs=1")
    spec = model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans)
    summary = Trainer(cfg, monitors=build_monitors(cfg, spec)).fit()
    return cfg, summary


def _records(cfg):
    with open(Path(cfg.train.output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- kNN

def _reference_knn(bank, bank_y, queries, k, t, num_classes):
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    out = torch.zeros(queries.shape[0], num_classes)
    for i, q in enumerate(queries):
        sims = [(float(q @ b), int(y)) for b, y in zip(bank, bank_y)]
        for sim, label in sorted(sims, key=lambda s: -s[0])[:k]:
            out[i, label] += torch.tensor(sim / t).exp()
    return out


def test_weighted_knn_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    bank, bank_y = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(7, 8, generator=g)
    scores = knn_scores(bank, bank_y, queries, k=5, temperature=0.07, num_classes=4, chunk=3)
    torch.testing.assert_close(scores, _reference_knn(bank, bank_y, queries, 5, 0.07, 4), rtol=1e-4, atol=1e-6)
    # Separable clusters: perfect; labels of the queries are what the votes say.
    centers = torch.eye(8)[:4] * 10
    train = centers.repeat_interleave(10, 0) + torch.randn(40, 8, generator=g)
    test = centers.repeat_interleave(3, 0) + torch.randn(12, 8, generator=g)
    acc = knn_accuracy((train, torch.arange(4).repeat_interleave(10)), (test, torch.arange(4).repeat_interleave(3)),
                       k=20, temperature=0.07)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_knn_monitor_logs_during_pretraining_and_cli_agrees(monitored_run, capsys):
    cfg, summary = monitored_run
    evals = [r for r in _records(cfg) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and [r["epoch"] for r in evals] == [1.0, 2.0]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and r["knn_bank"] == 64 for r in evals)
    train_steps = [r["step"] for r in _records(cfg) if r.get("kind") != "eval"]
    assert train_steps == [1, 2, 3, 4]
    tb = Path(cfg.train.output_dir) / "tensorboard"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn_top1")] == [2, 4]

    # The standalone command on the final checkpoint: the same encoder and data give the same number.
    assert main(["knn", "--checkpoint", cfg.train.output_dir, "--no-progress"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("knn: top-1") and "results:" in last_line
    result = json.loads((Path(summary.last_checkpoint).parent / "step_00000004.knn.json").read_text())
    assert result["top1"] == pytest.approx(evals[-1]["knn_top1"]) and result["k"] == 20
    assert result["step"] == 4 and result["bank"] == 64


# ----------------------------------------------------------------------------- linear probe

class _MaeLars(torch.optim.Optimizer):
    """MAE's util/lars.py, as the reference: no weight decay and no trust ratio on 1-D parameters."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["trust_coefficient"] * param_norm
                                                                   / update_norm, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_is_maes(weight_decay):
    torch.manual_seed(0)
    ours, theirs = nn.Linear(16, 5), nn.Linear(16, 5)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = build_lars(ours, 0.5, LinearProbeConfig(weight_decay=weight_decay))
    opt_theirs = _MaeLars(theirs.parameters(), lr=0.5, weight_decay=weight_decay)
    x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
    for _ in range(4):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(ours.bias, theirs.bias)  # 1-D: plain momentum SGD in both
    if weight_decay == 0:  # timm divides by |g| + wd|w|, MAE by |g + wd w|: equal without weight decay
        torch.testing.assert_close(ours.weight, theirs.weight)


def test_probe_head_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(10, 32, generator=g)
    labels = torch.arange(10).repeat(60)
    feats = centers[labels] + torch.randn(600, 32, generator=g)
    # LARS moves a weight by ~lr * 0.001 of its norm per step: a small batch needs a large lr.
    cfg = LinearProbeConfig(num_classes=10, epochs=20, warmup_epochs=1, global_batch=64, lr=5.0, cache_features=True)
    batches, steps = cached_batches((feats[:500], labels[:500]), cfg.global_batch, seed=0)
    result = train_probe_head(batches, steps, 32, (feats[500:], labels[500:]), cfg, torch.device("cpu"),
                              progress=False, single_thread=True)
    assert steps == 7 and result["steps"] == 140 and result["top1"] > 95
    norm = result["head"].norm
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6


def test_linprobe_cli_with_augmentation(monitored_run, capsys):
    cfg, summary = monitored_run
    out = Path(cfg.train.output_dir) / "probe.json"
    argv = ["linprobe", "--checkpoint", summary.last_checkpoint, "--config",
            str(REPO / "recipes/linprobe_fashion_mnist_cpu.yaml"), "--out", str(out), "--no-progress",
            *SYNTHETIC_DATA, "probe.cache_features=false", "probe.global_batch=32", "probe.micro_batch=16",
            "probe.epochs=2", "probe.warmup_epochs=1", "probe.eval_every_epochs=1"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("linprobe: top-1")
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["lr"] == pytest.approx(4.0 * 32 / 256) and result["recipe"]["probe"]["cache_features"] is False


# ----------------------------------------------------------------------------- fine-tuning

def test_finetune_a_few_steps(monitored_run, tmp_path, capsys):
    cfg, summary = monitored_run
    saved = tmp_path / "classifier.safetensors"
    argv = ["finetune", "--checkpoint", summary.last_checkpoint, "--config",
            str(REPO / "recipes/finetune_vitb16.yaml"), "--no-progress", "--save-model", str(saved),
            *SYNTHETIC_DATA, "data.transform=mae", "data.crop_scale=[0.08,1.0]", "finetune.num_classes=10",
            "finetune.global_batch=16", "finetune.micro_batch=8", "finetune.max_steps=3", "finetune.device=cpu",
            "finetune.eval_every_epochs=1", "finetune.num_classes=10"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune: top-1")
    result = json.loads((Path(summary.last_checkpoint).parent / "step_00000004.finetune.json").read_text())
    assert result["steps"] == 3 and len(result["train_losses"]) == 3
    assert all(0 < loss < 10 for loss in result["train_losses"])
    assert result["history"][-1]["step"] == 3

    from scale.export import timm_model_from_export
    model = timm_model_from_export(saved)
    assert model.num_classes == 10 and model.head.weight.shape == (10, 192)


def test_finetune_model_layer_decay_drop_path_and_weights(monitored_run):
    from scale.export import encoder_state_dict, load_checkpoint, spec_from_config

    _, summary = monitored_run
    loaded = load_checkpoint(summary.last_checkpoint)
    spec = spec_from_config(loaded.config)
    recipe = load_recipe(FinetuneRecipe, REPO / "recipes/finetune_vitb16.yaml", ["finetune.num_classes=10"])
    encoder = encoder_state_dict(loaded.model_state)
    model = build_classifier(encoder, spec, recipe.finetune)
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, encoder["blocks.2.attn.qkv.weight"])
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1) and model.head.out_features == 10
    optimizer = build_finetune_optimizer(model, recipe.finetune, lr=1.0)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    depth = spec.depth  # layers: 0 = embeddings, i + 1 = block i, depth + 1 = norm and head
    assert scale_of[id(model.cls_token)] == pytest.approx(0.65 ** (depth + 1))
    assert scale_of[id(model.blocks[0].mlp.fc1.weight)] == pytest.approx(0.65 ** depth)
    assert scale_of[id(model.head.weight)] == 1.0
    assert decay_of[id(model.pos_embed)] == 0 and decay_of[id(model.blocks[0].norm1.weight)] == 0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 0.05
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    # MAE's avg pooling: the final norm gives way to a fresh fc_norm.
    avg = load_recipe(FinetuneRecipe, None, ["finetune.global_pool=avg", "finetune.num_classes=10"]).finetune
    assert hasattr(build_classifier(encoder, spec, avg), "fc_norm")


# ----------------------------------------------------------------------------- recipes

def test_recipes_carry_the_paper_and_mae_values():
    b = load_recipe(LinearProbeRecipe, REPO / "recipes/linprobe_vitb16.yaml").probe
    l = load_recipe(LinearProbeRecipe, REPO / "recipes/linprobe_vitl16.yaml").probe
    assert (b.epochs, b.warmup_epochs, b.blr, b.weight_decay, b.global_batch) == (90, 10, 0.1, 0.0, 16384)
    assert (l.epochs, l.warmup_epochs, l.blr, l.weight_decay, l.global_batch) == (50, 10, 0.1, 0.0, 1024)
    assert load_recipe(LinearProbeRecipe, REPO / "recipes/linprobe_fashion_mnist_cpu.yaml").probe.num_classes == 10
    fb = load_recipe(FinetuneRecipe, REPO / "recipes/finetune_vitb16.yaml").finetune
    fl = load_recipe(FinetuneRecipe, REPO / "recipes/finetune_vitl16.yaml").finetune
    assert (fb.epochs, fb.warmup_epochs, fb.blr, fb.betas, fb.weight_decay, fb.global_batch) == \
        (100, 5, 5e-4, (0.9, 0.95), 0.05, 1024)
    assert (fl.epochs, fl.warmup_epochs, fl.blr, fl.betas, fl.weight_decay, fl.global_batch) == \
        (50, 5, 1e-3, (0.9, 0.95), 0.05, 1024)
    assert (fb.layer_decay, fb.drop_path, fl.layer_decay, fl.drop_path) == (0.65, 0.1, 0.75, 0.2)
    assert (fb.mixup, fb.cutmix, fb.label_smoothing) == (0.8, 1.0, 0.1)
    with pytest.raises(ConfigError, match="probe.global_batch"):
        load_recipe(LinearProbeRecipe, None, ["probe.global_batch=100", "probe.micro_batch=64"])
    with pytest.raises(ConfigError, match="unknown config key 'finetune.lr_decay'"):
        load_recipe(FinetuneRecipe, None, ["finetune.lr_decay=0.7"])


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["knn", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
