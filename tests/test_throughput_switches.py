"""train.activation_checkpointing and train.compile: same loss and gradients, same names, every engine.

A two-block, 64-d encoder (registered here) keeps torch.compile's first compilation short; all
blocks and all tests share one compiled graph per (AC on/off) variant.
"""
from __future__ import annotations

import copy
import os

import pytest
import timm
import torch

from scale.config import ConfigError, load_config
from scale.engine import ENGINES
from scale.engine.block_wrappers import (ac_block_indices, apply_activation_checkpointing,
                                         apply_compile, is_checkpointed)
from scale.engine.parallelize import apply_block_wrappers
from scale.masking import MaskContext, build_mask_generator, step_generator
from scale.models import MODELS, ViTSpec
from scale.pretraining import build_pretrain_module
from scale.trainer import Trainer
from conftest import TINY_OVERRIDES

MICRO = "vit_micro_d2_patch4_28"
if MICRO not in MODELS:
    MODELS.register(MICRO)(lambda: ViTSpec(img_size=28, patch_size=4, embed_dim=64, depth=2, num_heads=2, in_chans=1))

BATCH = 8


def micro_cfg(tmp_path, *overrides):
    return load_config(None, [*TINY_OVERRIDES, f"model.name={MICRO}", f"train.micro_batch={BATCH}",
                              "data.num_samples=32", f"train.output_dir={tmp_path / 'run'}", *overrides])


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_pretrain_module(cfg)


def batch_and_masks(cfg):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 1, 28, 28, generator=g)
    cpu = torch.device("cpu")
    masks = build_mask_generator(cfg.mask, 7)(BATCH, MaskContext(step_generator(0, 0, 0, cpu), cpu))
    return images, masks


def loss_and_grads(module, images, masks):
    module.zero_grad(set_to_none=True)
    out = module(images, masks)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------- modes

def test_ac_modes_select_blocks():
    assert ac_block_indices("none", 6) == []
    assert ac_block_indices("full", 6) == [0, 1, 2, 3, 4, 5]
    assert ac_block_indices("every_1", 6) == [0, 1, 2, 3, 4, 5]
    assert ac_block_indices("every_2", 6) == [1, 3, 5]  # torchtitan: every k-th block, counting from 1
    assert ac_block_indices("every_4", 6) == [3]
    assert ac_block_indices("0,2, 5", 6) == [0, 2, 5]
    assert ac_block_indices("[4,1]", 6) == [1, 4]
    assert ac_block_indices([3, 0], 6) == [0, 3]
    with pytest.raises(ValueError, match="has 6 blocks"):
        ac_block_indices("0,6", 6)
    with pytest.raises(ValueError, match="must be"):
        ac_block_indices("most", 6)


def test_config_fields_validate(tmp_path):
    cfg = micro_cfg(tmp_path, "train.activation_checkpointing=every_2", "train.compile=true")
    assert cfg.train.activation_checkpointing == "every_2" and cfg.train.compile is True
    assert micro_cfg(tmp_path).train.activation_checkpointing == "none"
    for bad in ("every_0", "some", "1,,2", "every_x"):
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            micro_cfg(tmp_path, f"train.activation_checkpointing={bad}")
    with pytest.raises(ConfigError, match="compile"):
        micro_cfg(tmp_path, "train.compile=maybe")


# ----------------------------------------------------------------------------- activation checkpointing

def saved_bytes(module, images, masks):
    """Bytes autograd saves for backward during one forward (to see checkpointing at work)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(images, masks).loss.backward()
    return total


def test_activation_checkpointing_same_loss_and_grads(tmp_path):
    cfg = micro_cfg(tmp_path)
    images, masks = batch_and_masks(cfg)
    plain = build(cfg)
    reference = loss_and_grads(plain, images, masks)
    for mode, expected in (("full", [0, 1]), ("every_2", [1]), ("0", [0])):
        module = build(cfg)
        assert apply_activation_checkpointing(module.encoder, mode) == expected
        assert [is_checkpointed(b) for b in module.encoder.blocks] == [i in expected for i in range(2)]
        # Recomputation replays the same fp32 ops: equal to float rounding (in practice bit-equal).
        assert_same(loss_and_grads(module, images, masks), reference, rtol=1e-6, atol=1e-7)
    # It does checkpoint: the blocks keep (much) less for backward.
    full = build(cfg)
    apply_activation_checkpointing(full.encoder, "full")
    assert saved_bytes(full, images, masks) < 0.5 * saved_bytes(build(cfg), images, masks)
    # No-grad passes (evaluation, gradient caching's embedding pass) run the plain forward.
    with torch.no_grad():
        torch.testing.assert_close(full.encode(images, masks).cls, plain.encode(images, masks).cls, rtol=0, atol=0)


def test_drop_path_replays_the_same_rng(tmp_path):
    cfg = micro_cfg(tmp_path, "model.drop_path_rate=0.5")
    images, masks = batch_and_masks(cfg)
    plain, module = build(cfg), build(cfg)
    apply_activation_checkpointing(module.encoder, "full")
    torch.manual_seed(5)
    reference = loss_and_grads(plain, images, masks)
    torch.manual_seed(5)
    assert_same(loss_and_grads(module, images, masks), reference, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- compile

@pytest.mark.slow
@pytest.mark.parametrize("ac", [pytest.param("none", marks=pytest.mark.long), "full"])
def test_compile_and_ac_compile_same_loss_and_grads_and_names(tmp_path, ac):
    cfg = micro_cfg(tmp_path)
    images, masks = batch_and_masks(cfg)
    plain = build(cfg)
    reference = loss_and_grads(plain, images, masks)
    names = [n for n, _ in plain.named_parameters()]
    keys = list(plain.state_dict())
    module = build(cfg)
    apply_activation_checkpointing(module.encoder, ac)
    assert apply_compile(module.encoder) == 2
    assert apply_compile(module.encoder) == 0  # idempotent
    with pytest.raises(RuntimeError, match="before apply_compile"):
        apply_activation_checkpointing(module.encoder, "full")
    for _ in range(2):  # the second step runs the cached graph
        result = loss_and_grads(module, images, masks)
        assert_same(result, reference, rtol=2e-4, atol=1e-5)
    # Parameter names and state-dict keys are timm's, exactly as without the switches.
    assert [n for n, _ in module.named_parameters()] == names
    assert list(module.state_dict()) == keys
    # Exports load into timm's VisionTransformer strictly, and plain weights load back.
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=4,
                               in_chans=1, embed_dim=64, depth=2, num_heads=2)
    theirs.load_state_dict(module.encoder.state_dict(), strict=True)
    module.load_state_dict(plain.state_dict(), strict=True)


# ----------------------------------------------------------------------------- trainer and engines

def run_steps(cfg, steps=2):
    trainer = Trainer(cfg)
    try:
        images = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(steps):
            losses.append(float(trainer.train_step(images)["loss"]))
            trainer.step += 1
        blocks = trainer.pretrain_module.encoder.blocks
        state = trainer.engine.full_state_dict()
        return losses, blocks, state
    finally:
        trainer.engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "ddp", "fsdp"])
def test_trainer_applies_switches_before_the_engine(tmp_path, engine):
    """AC -> compile -> engine wrapping (fully_shard per block for FSDP2): same losses, timm names."""
    reference, _, plain_state = run_steps(micro_cfg(tmp_path / "ref", "engine.name=single"))
    losses, blocks, state = run_steps(micro_cfg(tmp_path / engine, f"engine.name={engine}",
                                                "train.activation_checkpointing=full", "train.compile=true"))
    assert all(is_checkpointed(b) and getattr(b, "_scale_compiled", False) for b in blocks)
    if engine == "fsdp":
        assert all(type(b).__name__.startswith("FSDP") for b in blocks)  # fully_shard came last
    assert losses == pytest.approx(reference, rel=2e-4, abs=1e-5)
    assert list(state) == list(plain_state)  # no _checkpoint_wrapped_module. / _orig_mod. prefixes


def test_gradient_caching_with_activation_checkpointing(tmp_path):
    """Gradient caching's no-grad embedding pass skips checkpointing; its re-embedding under the same
    RNG state (drop-path) recomputes the same activations: the losses are identical."""
    common = ("train.global_batch=8", "train.micro_batch=3", "model.drop_path_rate=0.2")
    reference, _, _ = run_steps(micro_cfg(tmp_path / "ref", *common))
    losses, _, _ = run_steps(micro_cfg(tmp_path / "ac", *common, "train.activation_checkpointing=full"))
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_deepspeed_engine_with_activation_checkpointing(tmp_path):
    """Opt-in (SCALE_TEST_DEEPSPEED=1): DeepSpeed's CPU accelerator JIT-builds its shared-memory
    comm op (ninja, 30-110 s on 2 cores, and rebuilt whenever another environment with other
    flags built it last), which alone would exceed this file's time budget."""
    pytest.importorskip("deepspeed")
    if "deepspeed" not in ENGINES:
        pytest.skip("no deepspeed engine registered")
    if not os.environ.get("SCALE_TEST_DEEPSPEED"):
        pytest.skip("set SCALE_TEST_DEEPSPEED=1 (builds DeepSpeed's CPU comm op, 30-110 s)")
    reference, _, plain_state = run_steps(micro_cfg(tmp_path / "ref", "engine.name=single"))
    try:
        losses, blocks, state = run_steps(micro_cfg(tmp_path / "ds", "engine.name=deepspeed",
                                                    "train.activation_checkpointing=full", "train.compile=true"))
    except Exception as exc:  # DeepSpeed's CPU accelerator may be unavailable on this install
        if "accelerator" in str(exc).lower() or "cuda" in str(exc).lower():
            pytest.skip(f"DeepSpeed cannot run on this CPU: {exc}")
        raise
    assert all(is_checkpointed(b) for b in blocks)
    assert losses == pytest.approx(reference, rel=2e-4, abs=1e-5)
    assert list(state) == list(plain_state)


def test_apply_block_wrappers_reads_the_train_config(tmp_path):
    cfg = micro_cfg(tmp_path, "train.activation_checkpointing=every_2")
    module = build(cfg)
    assert apply_block_wrappers(module, cfg.train) == {"checkpointed_blocks": [1], "compiled_blocks": 0}
    assert [is_checkpointed(b) for b in module.encoder.blocks] == [False, True]
    assert apply_block_wrappers(copy.deepcopy(build(micro_cfg(tmp_path))), micro_cfg(tmp_path).train) == {
        "checkpointed_blocks": [], "compiled_blocks": 0}
