import math

import pytest
import timm
import torch

from scale.config import ConfigError
from scale.models import MODELS, build_encoder
from scale.models.attention import resolve_backend

PRESETS = {"vit_tiny_patch16": (12, 192, 3), "vit_small_patch16": (12, 384, 6), "vit_base_patch16": (12, 768, 12),
           "vit_large_patch16": (24, 1024, 16), "vit_huge_patch16": (32, 1280, 16)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_paper_shapes(name):
    spec = MODELS.build(name)
    assert (spec.depth, spec.embed_dim, spec.num_heads) == PRESETS[name]
    assert spec.patch_size == 16 and spec.img_size == 224


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16", "vit_base_patch16"])
def test_parameter_names_match_timm(name):
    ours = build_encoder(name)
    theirs = timm.create_model(MODELS.build(name).timm_name, pretrained=False, num_classes=0)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key in ours_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape, key


@pytest.mark.slow
@pytest.mark.long
def test_vit_huge_matches_timm_with_patch16():
    ours = build_encoder("vit_huge_patch16")
    with torch.device("meta"):
        theirs = timm.create_model("vit_huge_patch14_224", pretrained=False, num_classes=0, patch_size=16)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    params = sum(p.numel() for p in ours.parameters())
    assert 625e6 < params < 640e6  # the paper lists ~632M


def test_full_image_features_equal_timm():
    ours = build_encoder("vit_tiny_patch4_28").eval()
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=4,
                               in_chans=1, depth=6).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x)[:, 0], theirs(x), rtol=1e-5, atol=1e-5)


def test_patch_embed_frozen_and_xavier_by_default():
    model = build_encoder("vit_tiny_patch16")
    w = model.patch_embed.proj.weight
    assert not w.requires_grad and not model.patch_embed.proj.bias.requires_grad
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 192))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.patch_embed.proj.bias == 0)
    trained = build_encoder("vit_tiny_patch16", train_patch_embed=True)
    assert trained.patch_embed.proj.weight.requires_grad


def test_position_embeddings_fixed_sincos():
    model = build_encoder("vit_tiny_patch4_28")
    pos = model.pos_embed
    assert not pos.requires_grad
    assert torch.all(pos[0, 0] == 0)  # the CLS position
    grid = pos[0, 1:].reshape(7, 7, -1)
    # sin-cos: every value in [-1, 1], distinct rows and columns, sin^2 + cos^2 = 1 per band
    assert pos.abs().max() <= 1.0
    d4 = 192 // 4
    sin_h, sin_w, cos_h, cos_w = grid[..., :d4], grid[..., d4:2 * d4], grid[..., 2 * d4:3 * d4], grid[..., 3 * d4:]
    torch.testing.assert_close(sin_h ** 2 + cos_h ** 2, torch.ones_like(sin_h))
    torch.testing.assert_close(sin_w ** 2 + cos_w ** 2, torch.ones_like(sin_w))
    assert not torch.allclose(grid[0, 0], grid[0, 1]) and not torch.allclose(grid[0, 0], grid[1, 0])


def test_groups_run_in_one_pass_and_equal_separate_passes():
    torch.manual_seed(0)
    model = build_encoder("vit_tiny_patch4_28").eval()
    x = torch.randn(4, 1, 28, 28)
    ids = torch.stack([torch.randperm(49)[:20].reshape(2, 10) for _ in range(4)])
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        out = model(x, ids)
    hook.remove()
    assert out.shape == (4, 2, 192)
    assert calls == [torch.Size([8, 11, 192])]  # ONE pass over 2B sequences of 1 + n tokens
    with torch.no_grad():
        tokens = model.embed_patches(x)
        for b in range(4):
            for g in range(2):
                ref = model.encode_tokens(tokens[b:b + 1, ids[b, g]])
                torch.testing.assert_close(out[b, g], ref[0], rtol=1e-5, atol=1e-5)


def test_only_visible_patches_matter():
    model = build_encoder("vit_tiny_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    ids = torch.tensor([[[0, 1, 2], [10, 11, 12]], [[5, 6, 7], [20, 21, 22]]])
    y = x.clone()
    y[:, :, 20:, 20:] = 100.0  # patches far from every selected index (rows/cols 5-6 of the grid)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ids), model(y, ids))


@pytest.mark.parametrize("backend", ["sdpa"])
def test_attention_backends_agree_with_math(backend):
    torch.manual_seed(0)
    model = build_encoder("vit_tiny_patch4_28", attn_backend="math")
    x = torch.randn(4, 1, 28, 28)
    ids = torch.stack([torch.randperm(49)[:24].reshape(2, 12) for _ in range(4)])
    ref = model(x, ids)
    ref.sum().backward()
    ref_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_attn_backend(backend)
    out = model(x, ids)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xFormers and bf16 SDPA need a CUDA device")
def test_cuda_backends_agree():  # pragma: no cover - runs on GPU machines
    torch.manual_seed(0)
    model = build_encoder("vit_tiny_patch16", attn_backend="math").cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    ids = torch.stack([torch.randperm(196)[:136].reshape(2, 68) for _ in range(8)]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x, ids).float()
        for backend in ("sdpa", "xformers"):
            try:
                model.set_attn_backend(backend)
            except ValueError:
                continue
            torch.testing.assert_close(model(x, ids).float(), ref, rtol=3e-2, atol=3e-2)


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", cpu, max_tokens=17) == "math"  # short CPU sequences: math is faster
    assert resolve_backend("auto", cpu, max_tokens=197) == "sdpa"
    assert resolve_backend("math", cpu) == "math"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("xformers", cpu)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        resolve_backend("flash", cpu)


def test_unknown_model_lists_presets():
    with pytest.raises(ConfigError, match="model.name: unknown model"):
        build_encoder("vit_gigantic")


@pytest.fixture
def fake_xformers(monkeypatch):
    """Installs an `xformers` package whose only op is the given function (the real one has no CPU
    kernels); the availability caches are cleared before and after, so no other test sees the fake."""
    import sys
    import types

    from scale.models import attention

    def install(memory_efficient_attention):
        package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
        ops.memory_efficient_attention = memory_efficient_attention
        package.ops = ops
        monkeypatch.setitem(sys.modules, "xformers", package)
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)
        attention.xformers_available.cache_clear()
        attention.xformers_problem.cache_clear()
        return attention

    yield install
    attention.xformers_available.cache_clear()
    attention.xformers_problem.cache_clear()


def test_an_xformers_that_imports_but_has_no_kernels_is_detected(fake_xformers):
    """xformers 0.0.35 on torch 2.11 + CUDA 13 (the H200 machine): it imports, then finds no operator."""
    def no_operator(q, k, v, scale=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query       : shape=(1, 2, 8, 64) (torch.float32)")

    attention = fake_xformers(no_operator)
    problem = attention.xformers_problem(torch.device("cpu"))
    assert problem is not None and "No operator found" in problem and "\n" not in problem


def test_an_xformers_whose_kernel_runs_forward_and_backward_is_usable(fake_xformers):
    def sdpa_as_xformers(q, k, v, scale=None):  # (B, N, H, D) in and out, as xformers
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    attention = fake_xformers(sdpa_as_xformers)
    assert attention.xformers_problem(torch.device("cpu")) is None


def test_auto_falls_back_to_sdpa_when_xformers_cannot_run_and_explicit_xformers_says_why(monkeypatch):
    from scale.models import attention

    monkeypatch.setattr(attention, "xformers_problem", lambda device: "xformers cannot run attention: No operator")
    assert attention.resolve_backend("auto", torch.device("cuda")) == "sdpa"
    with pytest.raises(ConfigError, match="model.attn_backend=xformers but xformers cannot run attention"):
        attention.resolve_backend("xformers", torch.device("cuda"))
    monkeypatch.setattr(attention, "xformers_problem", lambda device: None)
    assert attention.resolve_backend("auto", torch.device("cuda")) == "xformers"
