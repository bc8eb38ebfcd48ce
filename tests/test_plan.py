"""The run's plan (scale/trainer/plan.py), training in segments (scale/trainer/segments.py) and the mask
generator's own FLOPs in the trainer's logged FLOP/s."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from scale.config import ConfigError, load_config
from scale.models.flops import blocks_forward_flops
from scale.trainer import Trainer, plan_run, step_plan, train_until
from scale.trainer.flops import train_step_flops

SYNTHETIC = ("data.name=synthetic", "data.num_samples=64", "data.num_workers=0", "data.mean=[0.5]",
             "data.std=[0.25]", "train.device=cpu", "train.precision=fp32", "train.log_every=1")


def logged_flops_per_step(output_dir) -> float:
    """FLOPs of a step as the trainer logged them: FLOP/s over images/s, times the images of a step."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "flops_per_s" in r)
    return step["flops_per_s"] / step["img_per_s"] * step["global_batch"]


def test_the_trainers_logged_flops_count_ehms_signal_forward(tmp_path):
    cfg = load_config("mae_fashion_mnist_cpu", [*SYNTHETIC, "mask.name=ehm", "mask.ehm.blocks=2", "mask.ratio=0.75",
                                                "train.global_batch=8", "train.max_steps=1",
                                                f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.fit()
    spec, batch = trainer.spec, 8
    visible = trainer.last_group_shape[2]
    decoder = trainer.pretrain_module.objective.forward_flops(spec, batch, visible)
    step = train_step_flops(spec, batch, 1, visible, cfg.model.train_patch_embed, decoder)
    # The signal: the patch embedding and the first 2 blocks over all 1 + N tokens, forward only.
    embed = 2 * batch * spec.num_patches * spec.in_chans * spec.patch_size ** 2 * spec.embed_dim
    signal = embed + blocks_forward_flops(spec.embed_dim, spec.mlp_ratio, 2, batch, 1 + spec.num_patches)
    assert logged_flops_per_step(tmp_path) == pytest.approx(step + signal, rel=1e-9)
    assert signal > 0.1 * step  # not a rounding error: what the log left out before
    plan = step_plan(cfg)
    assert (plan.flops, plan.mask_flops, plan.visible_per_group) == (step + signal, signal, visible)


@pytest.mark.parametrize("overrides", [
    (),  # OCL, random two-group masks
    ("train.global_batch=32", "train.micro_batch=8"),  # gradient caching: the plan is of the whole step
])
def test_the_plan_is_what_the_trainer_runs(tmp_path, overrides):
    cfg = tiny_config(tmp_path, "train.max_steps=1", *overrides)
    trainer = Trainer(cfg)
    trainer.fit()
    plan = plan_run(cfg)
    assert plan.length.steps_per_epoch == trainer.steps_per_epoch == 8
    assert (plan.length.total_steps, plan.length.stop_step) == (trainer.total_steps, trainer.stop_step) == (16, 1)
    assert plan.step.batch == trainer.batch_plan
    assert (plan.step.num_groups, plan.step.visible_per_group) == trainer.last_group_shape[1:]
    assert plan.step.flops == pytest.approx(logged_flops_per_step(tmp_path / "run"), rel=1e-9)
    assert plan.step.mask_flops == 0  # random masks read no model


def test_the_plan_builds_no_model_and_splits_the_global_batch_over_ranks(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the plan built a model")

    monkeypatch.setattr("scale.models.vit.VisibleTokenViT.__init__", refuse)
    monkeypatch.setattr("scale.trainer.trainer.Trainer.__init__", refuse)
    cfg = load_config("ocl_vith16", ["data.name=synthetic", "data.num_samples=8192"])  # ViT-H/16, 4096 a step
    plan = plan_run(cfg, world_size=8)
    assert plan.step.batch.per_rank_batch * 8 == plan.step.batch.global_batch == cfg.train.global_batch
    assert plan.length.steps_per_epoch == 8192 // plan.step.batch.global_batch
    assert plan.step.flops_per_image * plan.step.batch.global_batch == plan.step.flops > 0


def test_too_little_data_for_one_batch_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.global_batch 32: the data \(data.root\) has 16 samples, not one "
                                          "batch of 32 per rank on 1 rank"):
        plan_run(tiny_config(tmp_path, "data.num_samples=16"))


@pytest.mark.slow
def test_a_run_trained_in_segments_is_the_uninterrupted_run(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight", "train.max_steps=4")).fit()
    cfg = tiny_config(tmp_path / "segments")
    first, second = train_until(cfg, 2), train_until(cfg, 4)
    assert (first.summary.steps_done, second.summary.final_step) == (2, 4)
    assert first.summary.losses + second.summary.losses == straight.losses
    assert first.seconds > 0 and second.seconds > 0
    again = train_until(cfg, 4)  # already there: no step runs
    assert (again.summary.steps_done, again.summary.final_step) == (0, 4)
