"""ASL (scale/objectives/asl.py): Eq. 9's value and gradient, the MAE special case bit for bit,
DLE's two encoder passes, FLOP counts, logs, exact resume with accumulation, export, config errors."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from scale.config import ConfigError
from scale.masking import MaskContext, build_mask_generator
from scale.models.flops import blocks_forward_flops
from scale.objectives.asl import l1_distance, symmetric_alignment
from scale.objectives.mae import mask_of
from scale.pretraining import build_pretrain_module
from scale.trainer import Trainer
from scale.trainer.flops import encoder_forward_flops, train_step_flops
from test_mae import MAE_TINY

ASL_TINY = (*MAE_TINY, "objective.name=asl")  # MAE's tiny encoder, mask and decoder; the later key wins
DLE = "objective.asl.branch=dle"


def _inputs(cfg, batch: int = 4, seed: int = 3):
    images = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    masks = build_mask_generator(cfg.mask, 7)(batch, MaskContext(torch.Generator().manual_seed(seed),
                                                                  torch.device("cpu")))
    return images, masks


def _module(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_pretrain_module(cfg)


# ----------------------------------------------------------------------------- Eq. 9-10

def test_symmetric_l1_has_the_gradient_of_a_plain_l1_and_twice_its_value():
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 5, 12, generator=g) for _ in range(2)]
    ori, aug = (v.clone().requires_grad_() for v in values)
    ori_ref, aug_ref = (v.clone().requires_grad_() for v in values)
    symmetric = symmetric_alignment(ori, aug, l1_distance)
    plain = (ori_ref - aug_ref).abs().mean(-1)
    assert symmetric.shape == plain.shape == (3, 5)
    assert torch.equal(symmetric, 2 * plain)
    weights = torch.rand(3, 5, generator=g)  # any upstream gradient, not only ones
    (symmetric * weights).sum().backward()
    (plain * weights).sum().backward()
    assert torch.equal(ori.grad, ori_ref.grad) and torch.equal(aug.grad, aug_ref.grad)
    assert ori.grad.abs().sum() > 0 and torch.equal(aug.grad, -ori.grad)


def test_loss_sem_is_twice_the_masked_mean_l1_of_the_decoder_outputs(tmp_path):
    cfg = tiny_config(tmp_path, *ASL_TINY)
    module = _module(cfg).eval()
    images, masks = _inputs(cfg)
    out = module(images, masks)
    with torch.no_grad():
        ori, aug = module.objective.branches(module.encode(images, masks))  # (B, 1 + N, p*p*C), [CLS] first
    assert ori.shape == aug.shape == (4, 1 + 49, 16)
    mask = mask_of(masks.masked_ids, 49)
    assert mask.sum() == 4 * (49 - 12)
    per_patch = (ori[:, 1:] - aug[:, 1:]).abs().mean(-1)  # the patches' mean absolute difference
    by_hand = (per_patch * mask).sum() / mask.sum()  # over the masked patches only
    assert by_hand > 0
    assert torch.equal(out.metrics["loss_sem"], 2 * by_hand)
    assert torch.equal(out.metrics["pred_gap"], by_hand)
    # Eq. 11 with both branches' MSE (the default) and weights 1 : 1
    assert torch.allclose(out.loss, out.metrics["loss_mae"] + out.metrics["loss_sem"], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the MAE special case

def _step(module, images, masks):
    out = module(images, masks)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_asl_without_alignment_on_the_original_branch_is_mae_bit_for_bit(tmp_path):
    mae_cfg = tiny_config(tmp_path, *MAE_TINY)
    asl_cfg = tiny_config(tmp_path, *ASL_TINY, "objective.asl.align_weight=0", "objective.asl.mae_branches=original")
    images, masks = _inputs(mae_cfg, batch=6)
    mae_loss, mae_grads = _step(_module(mae_cfg, seed=5), images, masks)
    asl = _module(asl_cfg, seed=5)
    asl_loss, asl_grads = _step(asl, images, masks)
    assert torch.equal(asl_loss, mae_loss)
    assert {n.split(".")[0] for n in mae_grads} == {"encoder", "objective"}
    assert all(n.startswith(("encoder.", "objective.decoder.")) for n in mae_grads)
    assert set(asl_grads) == set(mae_grads)  # the aug block gets no gradient at all
    assert all(p.grad is None for p in asl.objective.aug_block.parameters())
    for name, grad in mae_grads.items():
        assert torch.equal(asl_grads[name], grad), name
    # The default ASL (both branches in L_MAE, L_SEM weighted 1) is not MAE: this comparison can fail.
    default_loss, default_grads = _step(_module(tiny_config(tmp_path, *ASL_TINY), seed=5), images, masks)
    assert not torch.equal(default_loss, mae_loss)
    assert not torch.equal(default_grads["objective.decoder.decoder_embed.weight"],
                           mae_grads["objective.decoder.decoder_embed.weight"])


# ----------------------------------------------------------------------------- DLE

def test_dle_runs_the_encoder_twice_with_dropout_in_training_only(tmp_path):
    cfg = tiny_config(tmp_path, *ASL_TINY, DLE)
    module = _module(cfg)
    assert module.encoder.embed_dropout == 0.1 and module.objective.aug_block is None
    images, masks = _inputs(cfg)
    batch = module.encode(images, masks)
    assert batch.cls.shape == (4, 2, 192) and batch.tokens.shape == (4, 2, 12, 192)
    assert not torch.allclose(batch.cls[:, 0], batch.cls[:, 1], atol=1e-3)
    assert not torch.allclose(batch.tokens[:, 0], batch.tokens[:, 1], atol=1e-3)
    assert module(images, masks).metrics["loss_sem"] > 0
    module.eval()
    batch = module.encode(images, masks)
    assert batch.cls.shape[1] == 2
    assert torch.equal(batch.cls[:, 0], batch.cls[:, 1]) and torch.equal(batch.tokens[:, 0], batch.tokens[:, 1])
    metrics = module(images, masks).metrics
    assert metrics["loss_sem"] == 0 and metrics["pred_gap"] == 0


def test_dle_without_dropout_gives_identical_branches(tmp_path):
    cfg = tiny_config(tmp_path, *ASL_TINY, DLE, "objective.asl.dle_dropout=0")
    module = _module(cfg)
    assert module.training and module.encoder.embed_dropout == 0
    images, masks = _inputs(cfg)
    batch = module.encode(images, masks)
    assert batch.cls.shape[1] == 2 and torch.equal(batch.tokens[:, 0], batch.tokens[:, 1])
    out = module(images, masks)
    assert out.metrics["loss_sem"] == 0 and out.metrics["pred_gap"] == 0 and out.loss > 0


def test_other_objectives_draw_no_dropout(tmp_path):
    for overrides in (MAE_TINY, ASL_TINY, ()):  # MAE, ASL-AEE, OCL: the encoder's embeddings untouched
        assert _module(tiny_config(tmp_path, *overrides)).encoder.embed_dropout == 0


# ----------------------------------------------------------------------------- FLOPs

def test_objective_flops_are_two_decoder_passes_plus_the_aee_block(tmp_path):
    mae = _module(tiny_config(tmp_path, *MAE_TINY)).objective
    aee = _module(tiny_config(tmp_path, *ASL_TINY)).objective
    dle = _module(tiny_config(tmp_path, *ASL_TINY, DLE)).objective
    spec = aee.spec
    B, visible = 8, 12
    decoder = mae.forward_flops(spec, B, visible)
    assert decoder == mae.decoder.forward_flops(B, visible) > 0
    block = blocks_forward_flops(spec.embed_dim, spec.mlp_ratio, 1, B, 1 + visible)
    assert block > 0
    assert aee.forward_flops(spec, B, visible) == 2 * decoder + block
    assert dle.forward_flops(spec, B, visible) == 2 * decoder


@pytest.mark.parametrize("branch,passes", [("aee", 1), ("dle", 2)])
def test_trainer_counts_the_second_encoder_pass_of_dle(tmp_path, branch, passes):
    trainer = Trainer(tiny_config(tmp_path, *ASL_TINY, f"objective.asl.branch={branch}"))
    B, visible = 32, 12
    trainer.last_group_shape = (B, 1, visible)  # what train_step leaves: the mask's one group
    record = trainer._window_record({"loss": torch.tensor(1.0)}, elapsed=1.0, steps=1, data_wait=0.0)
    spec, objective = trainer.spec, trainer.pretrain_module.objective
    expected = train_step_flops(spec, B, passes, visible, True, objective.forward_flops(spec, B, visible))
    assert record["flops_per_s"] == expected
    assert record["tokens_per_s"] == B * passes * (1 + visible)
    one_pass = train_step_flops(spec, B, 1, visible, True, objective.forward_flops(spec, B, visible))
    assert expected - one_pass == (passes - 1) * 3 * encoder_forward_flops(spec, B, 1 + visible)


# ----------------------------------------------------------------------------- training: logs, resume, export

def test_training_logs_the_two_losses_and_the_gap(tmp_path, capsys):
    cfg = tiny_config(tmp_path, *ASL_TINY, "train.max_steps=2")
    Trainer(cfg).fit()
    out_dir = Path(cfg.train.output_dir)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["loss_mae"] > 0 and r["loss_sem"] > 0 and r["pred_gap"] > 0
        assert r["loss"] == pytest.approx(r["loss_mae"] + r["loss_sem"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    for key in ("loss_mae", "loss_sem", "pred_gap"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [1, 2]
        assert scalars[-1].value == pytest.approx(records[-1][key], rel=1e-6)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    for line in lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
        assert {"loss", "mae", "sem", "gap"} <= set(fields), line
    assert float(fields["sem"]) == pytest.approx(records[-1]["loss_sem"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["aee", "dle"])
def test_asl_trains_resumes_exactly_with_accumulation_and_exports(tmp_path, branch):
    common = [*ASL_TINY, f"objective.asl.branch={branch}", "train.epochs=1", "train.ckpt_every=5",
              "train.global_batch=32", "train.micro_batch=16"]
    full = Trainer(tiny_config(tmp_path / "a", *common)).fit()
    assert len(full.losses) == 8
    Trainer(tiny_config(tmp_path / "b", *common, "train.max_steps=5")).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", *common, "train.resume=auto")).fit()
    assert resumed.losses == full.losses[5:]
    assert full.losses[-1] < full.losses[0]
    records = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_sem"] > 0 for r in records)  # the second branch differs (AEE's block, DLE's dropout)
    from scale.export import export_encoder, read_export, timm_model_from_export

    export_encoder(tmp_path / "a/run", tmp_path / "enc.safetensors")
    state, _ = read_export(tmp_path / "enc.safetensors")
    assert state and not any("aug_block" in k or "decoder" in k or "mask_token" in k for k in state)
    model = timm_model_from_export(tmp_path / "enc.safetensors")  # strict
    assert not any("aug_block" in k or "decoder" in k for k in model.state_dict())


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("override,key", [
    ("objective.asl.branch=xyz", "objective.asl.branch"),
    ("objective.asl.align_loss=mse", "objective.asl.align_loss"),
    ("objective.asl.dle_dropout=1.0", "objective.asl.dle_dropout"),
])
def test_bad_asl_settings_are_one_line_errors_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, *ASL_TINY, override)
    message = str(err.value)
    assert key in message and "\n" not in message.strip()


def test_asl_needs_one_group_masks(tmp_path):
    with pytest.raises(ConfigError, match="mask.name='random_two_group'"):
        Trainer(tiny_config(tmp_path, *ASL_TINY, "mask.name=random_two_group"))
