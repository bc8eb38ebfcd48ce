"""EHM in training: exact resume (the EMA source included), gradient caching equals one pass,
per-step cost and depth logged, the EMA held as module state."""
import json

import pytest
import torch

from conftest import tiny_config
from scale.trainer import Trainer
from test_mae import MAE_TINY

MAE_EHM = (*MAE_TINY, "mask.name=ehm")
OCL_EHM_EMA = ("mask.name=ehm_drop_two_group", "mask.ehm.source=ema", "mask.ehm.ema_decay=0.9")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [pytest.param(MAE_EHM, marks=pytest.mark.long), OCL_EHM_EMA], ids=["mae_ehm", "ocl_ehm_drop_ema"])
def test_resume_with_ehm_is_bit_exact(tmp_path, overrides):
    # 2 epochs of 8 steps: d = 1 in epoch 0, floor(H / 2) in epoch 1; stop at 6, resume across the boundary.
    full_trainer = Trainer(tiny_config(tmp_path / "a", *overrides))
    full = full_trainer.fit()
    part = Trainer(tiny_config(tmp_path / "b", *overrides, "train.max_steps=6")).fit()
    assert part.losses == full.losses[:6]
    resumed_trainer = Trainer(tiny_config(tmp_path / "b", *overrides, "train.resume=auto"))
    resumed = resumed_trainer.fit()
    assert resumed.losses == full.losses[6:]  # to the last bit
    rows = metrics(tmp_path / "a/run")
    assert [r["ehm_depth"] for r in rows[:8]] == [1.0] * 8 and min(r["ehm_depth"] for r in rows[8:]) > 1
    assert all(r["time_mask_signal_s"] > 0 and r["time_mask_tree_s"] > 0 for r in rows)
    full_state = full_trainer.pretrain_module.state_dict()
    resumed_state = resumed_trainer.pretrain_module.state_dict()
    assert sorted(full_state) == sorted(resumed_state)
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), name
    if "mask.ehm.source=ema" in overrides:  # the EMA is module state, updated, and not the live encoder
        ema = {k: v for k, v in full_state.items() if k.startswith("signal_ema.model.")}
        live = dict(full_trainer.pretrain_module.encoder.named_parameters())
        assert set(ema) == {f"signal_ema.model.{name}" for name in live}
        assert all(not torch.equal(ema[f"signal_ema.model.{n}"], p.detach()) for n, p in live.items()
                   if n.startswith("blocks.0."))


def test_ema_source_starts_at_the_encoder_and_follows_it(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *OCL_EHM_EMA, "mask.ehm.ema_decay=0.5", "train.max_steps=1"))
    module = trainer.pretrain_module
    before = {n: p.detach().clone() for n, p in module.encoder.named_parameters()}
    ema = dict(module.signal_ema.model.named_buffers())
    assert all(torch.equal(ema[n], before[n]) for n in before)
    assert not any(p.requires_grad for p in module.signal_ema.parameters())
    trainer.fit()
    after = dict(module.encoder.named_parameters())
    for name, old in before.items():  # one step of decay 0.5: halfway between old and new
        torch.testing.assert_close(ema[name], 0.5 * old + 0.5 * after[name].detach())


def test_grad_cache_with_ehm_draws_the_same_masks_and_loss_as_one_pass(tmp_path):
    runs = {}
    for label, extra in (("one_pass", ()), ("grad_cache", ("train.micro_batch=4",))):
        trainer = Trainer(tiny_config(tmp_path / label, "mask.name=ehm_two_group", "mask.ehm.signal_batch=8",
                                      "mask.ehm.depth=fixed", "mask.ehm.fixed_depth=0.5", "train.global_batch=16",
                                      "train.micro_batch=null",
                                      "train.max_steps=1", *extra))
        drawn = []
        masking = trainer.masking

        def recording(batch_size, context, masking=masking, drawn=drawn):
            masks = masking(batch_size, context)
            drawn.append(masks)
            return masks
        trainer.masking = recording
        trainer.masking.needs, trainer.masking.console_metrics = masking.needs, masking.console_metrics
        trainer.masking.forward_flops = masking.forward_flops  # the trainer logs the generator's own FLOPs
        summary = trainer.fit()
        runs[label] = (drawn[0], summary.losses[0], {n: p.detach().clone()
                                                      for n, p in trainer.pretrain_module.named_parameters()})
    (m1, loss1, p1), (m2, loss2, p2) = runs["one_pass"], runs["grad_cache"]
    assert torch.equal(m1.group_ids, m2.group_ids) and torch.equal(m1.masked_ids, m2.masked_ids)
    assert m1.metrics["ehm_depth"].item() > 1
    assert abs(loss1 - loss2) < 1e-5
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("objective.name=asl", "mask.name=ehm", "mask.ratio=0.75", "objective.decoder.dim=64",
     "objective.decoder.depth=1", "objective.decoder.num_heads=4"),
    ("mask.name=ehm_two_group", "mask.ehm.tree=greedy", "mask.ehm.progress=step"),
], ids=["asl_ehm", "ocl_ehm_greedy_tree"])
def test_every_objective_trains_with_its_ehm_generator(tmp_path, overrides):
    summary = Trainer(tiny_config(tmp_path, *overrides, "train.max_steps=2")).fit()
    assert summary.final_step == 2 and all(loss == loss for loss in summary.losses)
    assert all("ehm_depth" in row for row in metrics(tmp_path / "run"))


def test_a_generator_with_the_wrong_group_count_is_refused(tmp_path):
    from scale.config import ConfigError

    with pytest.raises(ConfigError, match="mask.name=.ehm. draws 1 visible group.*generator: ehm_drop_two_group, ehm_two_group, random_two_group$"):
        Trainer(tiny_config(tmp_path, "mask.name=ehm"))  # OCL scores two groups
