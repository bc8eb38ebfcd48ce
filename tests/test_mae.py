"""MAE, faithful to MAE's models_mae.py: loss, decoder and encoder against an independent
transcription; exact accumulation; exact resume; export to timm."""
import contextlib
import math

import pytest
import torch

from conftest import tiny_config
from scale.config import load_config
from scale.objectives import DecoderConfig
from scale.engine import GradientAccumulation, SingleProcessEngine, plan_batch
from scale.masking import MaskContext, build_mask_generator
from scale.models import build_encoder
from scale.objectives import ObjectiveBatch
from scale.objectives.mae import MAEObjective
from scale.pretraining import PretrainModule, build_pretrain_module
from scale.trainer import Trainer

MAE_TINY = ("objective.name=mae", "mask.name=random", "mask.ratio=0.75", "model.init=mae",
            "model.train_patch_embed=true", "objective.decoder.dim=64", "objective.decoder.depth=2",
            "objective.decoder.num_heads=4")


# ----------------------------------------------------------------------------- a transcription of MAE
# Written from facebookresearch/mae models_mae.py (patchify, random_masking, forward_encoder,
# forward_decoder, forward_loss), generalised to C channels, with scale's modules as the layers.

def mae_patchify(imgs, p):
    c = imgs.shape[1]
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], c, h, p, w, p))
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * c))


def mae_random_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def mae_forward_encoder(encoder, imgs, mask_ratio, noise):
    x = encoder.patch_embed(imgs)
    x = x + encoder.pos_embed[:, 1:, :]
    x, mask, ids_restore = mae_random_masking(x, mask_ratio, noise)
    cls_token = encoder.cls_token + encoder.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in encoder.blocks:
        x = blk(x)
    return encoder.norm(x), mask, ids_restore


def mae_forward_decoder(dec, x, ids_restore):
    x = dec.decoder_embed(x)
    mask_tokens = dec.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + dec.decoder_pos_embed
    for blk in dec.decoder_blocks:
        x = blk(x)
    x = dec.decoder_norm(x)
    return dec.decoder_pred(x)[:, 1:, :]


def mae_forward_loss(imgs, pred, mask, p, norm_pix_loss=True):
    target = mae_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- against the transcription

@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_forward_equals_the_transcription(norm_pix):
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch4_28", init="mae", train_patch_embed=True, attn_backend="math").eval()
    objective = MAEObjective(encoder.spec, DecoderConfig(dim=64, depth=2, num_heads=4), norm_pix).eval()
    module = PretrainModule(encoder, objective)
    images = torch.randn(4, 1, 28, 28)
    generator = torch.Generator().manual_seed(7)
    masks = build_mask_generator(load_config(None, ["mask.name=random", "mask.ratio=0.75"]).mask, 7)(
        4, MaskContext(generator, torch.device("cpu")))
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(7))  # the noise the generator drew

    latent, mask, ids_restore = mae_forward_encoder(encoder, images, 0.75, noise)
    pred_ref = mae_forward_decoder(objective.decoder, latent, ids_restore)
    loss_ref = mae_forward_loss(images, pred_ref, mask, 4, norm_pix)

    batch = module.encode(images, masks)
    assert torch.equal(batch.masks.group_ids[:, 0], torch.argsort(noise, dim=1)[:, :12])
    torch.testing.assert_close(batch.cls[:, 0], latent[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(batch.tokens[:, 0], latent[:, 1:], rtol=0, atol=0)
    pred = objective.predict(batch)
    torch.testing.assert_close(pred, pred_ref, rtol=1e-6, atol=1e-6)
    assert math.isclose(module(images, masks).loss.item(), loss_ref.item(), rel_tol=1e-6)
    # the loss alone, on identical predictions: bit for bit
    assert torch.equal(objective.loss_of(pred_ref, batch), loss_ref)


@pytest.mark.slow
def test_mae_init_and_trainable_patch_embedding():
    torch.manual_seed(0)
    encoder = build_encoder("vit_base_patch16", init="mae", train_patch_embed=True)
    assert encoder.patch_embed.proj.weight.requires_grad
    assert 0.01 < encoder.cls_token.std().item() < 0.03  # N(0, 0.02)
    qkv = encoder.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (qkv.shape[0] + qkv.shape[1]))  # plain Xavier over the whole (3D, D) matrix
    assert qkv.abs().max().item() <= bound and qkv.abs().max().item() > 0.9 * bound
    objective = MAEObjective(encoder.spec, DecoderConfig())
    d = objective.decoder
    assert d.decoder_embed.out_features == 512 and len(d.decoder_blocks) == 8
    assert d.decoder_blocks[0].attn.num_heads == 16 and d.decoder_pred.out_features == 16 * 16 * 3
    assert not d.decoder_pos_embed.requires_grad and torch.all(d.decoder_pos_embed[:, 0] == 0)
    assert 0.01 < d.mask_token.std().item() < 0.03


# ----------------------------------------------------------------------------- accumulation, resume, export

def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_accumulation_equals_the_full_batch(tmp_path):
    cfg = tiny_config(tmp_path, *MAE_TINY)
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    images = torch.randn(16, 1, 28, 28)
    masks = build_mask_generator(cfg.mask, 7)(16, MaskContext(torch.Generator().manual_seed(3), torch.device("cpu")))
    engine = SingleProcessEngine(torch.device("cpu"))
    engine.setup(module, lambda m: torch.optim.SGD(m.parameters(), lr=0.0), plan_batch(cfg.train, 1, False))
    full = engine.forward(images, masks)
    full.loss.backward()
    reference = _grads(module)
    engine.optimizer.zero_grad(set_to_none=True)
    out = GradientAccumulation(engine, 5)(images, masks, contextlib.nullcontext)  # micro-batches 5, 5, 5, 1
    assert math.isclose(out.loss.item(), full.loss.item(), rel_tol=1e-6)
    grads = _grads(module)
    assert grads.keys() == reference.keys() and "objective.decoder.mask_token" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_mae_trains_resumes_exactly_and_exports(tmp_path):
    common = [*MAE_TINY, "train.epochs=2", "train.ckpt_every=5", "train.global_batch=32", "train.micro_batch=16"]
    full = Trainer(tiny_config(tmp_path / "a", *common)).fit()
    Trainer(tiny_config(tmp_path / "b", *common, "train.max_steps=5")).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", *common, "train.resume=auto")).fit()
    assert resumed.losses == full.losses[5:]
    assert full.losses[-1] < full.losses[0]
    from scale.export import export_encoder, timm_model_from_export

    export_encoder(tmp_path / "a/run", tmp_path / "enc.safetensors")
    model = timm_model_from_export(tmp_path / "enc.safetensors")  # strict: no decoder key left
    assert not any("decoder" in k or "mask_token" in k for k in model.state_dict())


def test_mae_flops_include_the_decoder(tmp_path):
    from scale.trainer.flops import train_step_flops

    cfg = tiny_config(tmp_path, *MAE_TINY)
    module = build_pretrain_module(cfg)
    spec = module.encoder.spec
    decoder = module.objective.forward_flops(spec, 8, 12)
    assert decoder > 0
    assert train_step_flops(spec, 8, 1, 12, True, decoder) - train_step_flops(spec, 8, 1, 12, True) == 3 * decoder


def test_mae_needs_one_group_masks(tmp_path):
    from scale.config import ConfigError

    with pytest.raises(ConfigError, match="mask.name='random_two_group'"):
        Trainer(tiny_config(tmp_path, "objective.name=mae", "mask.name=random_two_group"))


def test_objective_batch_carries_what_mae_declares(tmp_path):
    cfg = tiny_config(tmp_path, *MAE_TINY)
    module = build_pretrain_module(cfg)
    masks = build_mask_generator(cfg.mask, 7)(2, MaskContext(torch.Generator().manual_seed(0), torch.device("cpu")))
    batch = module.encode(torch.randn(2, 1, 28, 28), masks)
    assert isinstance(batch, ObjectiveBatch)
    assert batch.tokens.shape == (2, 1, 12, 192) and batch.images.shape == (2, 1, 28, 28)
    ocl = build_pretrain_module(tiny_config(tmp_path))
    ocl_masks = build_mask_generator(ocl_cfg := tiny_config(tmp_path).mask, 7)(
        2, MaskContext(torch.Generator().manual_seed(0), torch.device("cpu")))
    assert ocl_cfg.name == "random_two_group"
    ocl_batch = ocl.encode(torch.randn(2, 1, 28, 28), ocl_masks)
    assert ocl_batch.tokens is None and ocl_batch.images is None  # OCL asks for the CLS only


def test_mae_checkpoint_goes_through_knn_linear_probe_and_finetune_unchanged(tmp_path, capsys):
    from pathlib import Path

    from conftest import REPO
    from scale.eval.__main__ import main
    from test_eval import SYNTHETIC_DATA

    summary = Trainer(tiny_config(tmp_path, *MAE_TINY, "model.name=vit_tiny_patch7_28", "data.num_samples=64",
                                  "train.max_steps=2")).fit()
    ckpt = summary.last_checkpoint
    assert main(["knn", "--checkpoint", ckpt, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("knn: top-1")
    assert main(["linprobe", "--checkpoint", ckpt, "--config", str(REPO / "recipes/linprobe_fashion_mnist_cpu.yaml"),
                 "--no-progress", *SYNTHETIC_DATA, "probe.global_batch=32", "probe.micro_batch=16", "probe.epochs=1",
                 "probe.warmup_epochs=0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("linprobe: top-1")
    assert main(["finetune", "--checkpoint", ckpt, "--config", str(REPO / "recipes/finetune_vitb16.yaml"),
                 "--no-progress", *SYNTHETIC_DATA, "finetune.num_classes=10", "finetune.global_batch=16",
                 "finetune.micro_batch=8", "finetune.max_steps=2", "finetune.device=cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune: top-1")
    assert Path(ckpt).parent.joinpath(Path(ckpt).name + ".finetune.json").is_file()
