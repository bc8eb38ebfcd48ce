"""A Vision Transformer that encodes only the visible patches of each group.

Parameter names are those of timm's VisionTransformer (cls_token, pos_embed,
patch_embed.proj, blocks.N.{norm1,attn,norm2,mlp}, norm), so a state dict loads into
`timm.create_model(..., num_classes=0)` as it is. The model knows nothing about masking
policy, distribution or precision: it takes images plus index tensors and returns CLS
embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from ..config import ConfigError
from ..registry import Registry
from .attention import BackendAttention, resolve_backend


@dataclass(frozen=True)
class ViTSpec:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    timm_name: str = ""  # the timm architecture with the same shapes, for export checks

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


MODELS: Registry[ViTSpec] = Registry("model", "model.name")


def _preset(name: str, **kwargs) -> None:
    MODELS.register(name)(lambda: ViTSpec(**kwargs))


# ImageNet presets (patch 16, 224x224), as in timm / the paper.
_preset("vit_tiny_patch16", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
        timm_name="vit_tiny_patch16_224")
_preset("vit_small_patch16", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
        timm_name="vit_small_patch16_224")
_preset("vit_base_patch16", img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        timm_name="vit_base_patch16_224")
_preset("vit_large_patch16", img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        timm_name="vit_large_patch16_224")
_preset("vit_huge_patch16", img_size=224, patch_size=16, embed_dim=1280, depth=32, num_heads=16,
        timm_name="vit_huge_patch14_224")  # timm's ViT-H is patch 14; shapes differ only in patch_embed
# Small-image presets for CPU runs (28x28 grey, e.g. Fashion-MNIST; 32x32 colour).
_preset("vit_tiny_patch4_28", img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3, in_chans=1)
_preset("vit_tiny_patch7_28", img_size=28, patch_size=7, embed_dim=192, depth=6, num_heads=3, in_chans=1)
_preset("vit_small_patch4_28", img_size=28, patch_size=4, embed_dim=384, depth=6, num_heads=6, in_chans=1)
_preset("vit_tiny_patch4_32", img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, in_chans=3)


@dataclass
class EncoderOutput:
    """One encoder pass over every group of a batch."""

    cls: torch.Tensor  # (B, G, D) [CLS] output of each group, after the final norm
    tokens: Optional[torch.Tensor] = None  # (B, G, n, D) visible tokens after the final norm, when asked


INITS = ("mocov3", "mae")


class VisibleTokenViT(nn.Module):
    """ViT encoder over visible-patch subsets, with one [CLS] token per sequence."""

    def __init__(self, spec: ViTSpec, train_patch_embed: bool = False, attn_backend: str = "sdpa",
                 drop_path_rate: float = 0.0, init: str = "mocov3"):
        super().__init__()
        if spec.img_size % spec.patch_size:
            raise ConfigError(f"img_size {spec.img_size} is not a multiple of patch_size {spec.patch_size}")
        if spec.embed_dim % 4:
            raise ConfigError(f"embed_dim {spec.embed_dim} must be divisible by 4 for 2-D sin-cos positions")
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, spec.in_chans, spec.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        # Fixed 2-D sin-cos; the [CLS] position is the zero vector (MAE / MoCo v3).
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.num_patches, spec.embed_dim), requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, spec.depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(spec.embed_dim, spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True,
                  drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=1e-6),
                  attn_layer=BackendAttention)
            for i in range(spec.depth)
        ])
        self.norm = nn.LayerNorm(spec.embed_dim, eps=1e-6)
        self.embed_dropout = 0.0  # dropout on the visible patch embeddings in training (ASL's DLE)
        if init not in INITS:
            raise ConfigError(f"model.init must be one of {', '.join(INITS)}; got {init!r}")
        self.init_weights(train_patch_embed, init)
        self.set_attn_backend(attn_backend)

    # ------------------------------------------------------------------ init
    def init_weights(self, train_patch_embed: bool, init: str = "mocov3") -> None:
        """MoCo v3's init (OCL): q, k, v as separate Xavier matrices, [CLS] N(0, 1e-6); MAE's:
        plain Xavier on every Linear, [CLS] N(0, 0.02). Both: Xavier on the flattened patch
        embedding, LayerNorm (1, 0), fixed 2-D sin-cos positions with a zero [CLS] row."""
        grid = [self.spec.grid_size, self.spec.grid_size]
        pos = build_sincos2d_pos_embed(grid, self.embed_dim)
        with torch.no_grad():
            self.pos_embed[:, 1:].copy_(pos.unsqueeze(0))
            self.pos_embed[:, :1].zero_()
        nn.init.normal_(self.cls_token, std=1e-6 if init == "mocov3" else 0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv") and init == "mocov3":
                    # MoCo v3: treat q, k, v as three separate fan-out matrices.
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding: Xavier-uniform over (3*p*p + dim), frozen unless asked (MoCo v3).
        proj = self.patch_embed.proj
        fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
        bound = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        proj.weight.requires_grad_(train_patch_embed)
        proj.bias.requires_grad_(train_patch_embed)

    def set_attn_backend(self, backend: str) -> str:
        """Pick the attention kernel for every block; `auto` resolves against the current device."""
        resolved = resolve_backend(backend, self.cls_token.device, max_tokens=1 + self.spec.num_patches)
        for m in self.modules():
            if isinstance(m, BackendAttention):
                m.backend = resolved
        self.attn_backend = resolved
        return resolved

    def set_embed_dropout(self, rate: float) -> None:
        """Dropout on each visible sequence's patch embeddings (after the positions are added), in
        training only; every sequence draws its own (ASL's DLE: two passes, two augmentations)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"embedding dropout must be in [0, 1), got {rate}")
        self.embed_dropout = rate

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token", "pos_embed"}

    # ------------------------------------------------------------------ forward
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens with their position embeddings."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def encode_tokens(self, tokens: torch.Tensor, with_tokens: bool = False):
        """Prepend [CLS] (+ its position), run the blocks; the normed CLS output (S, D), and with
        `with_tokens` also the normed other tokens (S, n, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        x = self.blocks(x)
        if not with_tokens:
            return self.norm(x[:, 0])
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def encode(self, images: torch.Tensor, group_ids: Optional[torch.Tensor] = None,
               with_tokens: bool = False) -> EncoderOutput:
        """Encode the visible groups of each image.

        images: (B, C, H, W). group_ids: (B, G, n) patch indices, or None for all patches (G = 1).
        All B*G sequences of (1 + n) tokens go through the blocks in ONE pass. Returns the CLS
        of every group and, with `with_tokens`, the visible tokens after the final norm.
        """
        tokens = self.embed_patches(images)
        if group_ids is None:
            group_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], 1, -1)
            visible = tokens
        else:
            if group_ids.shape[0] != tokens.shape[0]:
                raise ValueError(f"group_ids has batch {group_ids.shape[0]}, images have batch {tokens.shape[0]}")
            B, G, n = group_ids.shape
            flat = group_ids.reshape(B, G * n, 1).expand(-1, -1, self.embed_dim)
            visible = torch.gather(tokens, 1, flat).reshape(B * G, n, self.embed_dim)
        if self.embed_dropout > 0 and self.training:  # not drawn at all otherwise: other methods' RNG streams stay
            visible = F.dropout(visible, self.embed_dropout, training=True)
        B, G, n = group_ids.shape
        if not with_tokens:
            return EncoderOutput(self.encode_tokens(visible).reshape(B, G, self.embed_dim))
        cls, rest = self.encode_tokens(visible, with_tokens=True)
        return EncoderOutput(cls.reshape(B, G, self.embed_dim), rest.reshape(B, G, n, self.embed_dim))

    def forward(self, images: torch.Tensor, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, G, D) CLS embeddings of the visible groups (G = 1 when group_ids is None)."""
        return self.encode(images, group_ids).cls

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Softmax attention of the first `num_blocks` blocks on the full images, averaged over
        heads and blocks: (B, 1 + N, 1 + N) float32, [CLS] first. Eval semantics (no drop path),
        no gradients, no draw from any RNG."""
        blocks = list(self.blocks)[:max(1, min(num_blocks, len(self.blocks)))]
        tokens = self.embed_patches(images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        probs = []

        def capture(block: nn.Module, args) -> None:  # the attention's input: the block's input, normed
            probs.append(block.attn.attention_probs(block.norm1(args[0])).mean(dim=1))

        # Each block runs its own forward (so FSDP2 unshards it, ZeRO-3 gathers it), in eval mode. The hook
        # is the block's, not its attention's: module hooks run outside a compiled forward (train.compile),
        # where a fresh hook inside it would be traced and recompile the blocks at every call.
        handles = [block.register_forward_pre_hook(capture) for block in blocks]
        was_training = self.training
        self.eval()
        try:
            for block in blocks:
                x = block(x)
        finally:
            self.train(was_training)
            for handle in handles:
                handle.remove()
        return torch.stack(probs).mean(dim=0)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full-image token features (B, 1 + N, D), as timm's forward_features returns."""
        tokens = self.embed_patches(images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))


def model_spec(name: str, img_size: Optional[int] = None, in_chans: Optional[int] = None) -> ViTSpec:
    """The preset `name` with the image size / channel overrides of a model config."""
    spec = MODELS.build(name)
    overrides = {k: v for k, v in (("img_size", img_size), ("in_chans", in_chans)) if v is not None}
    return ViTSpec(**{**spec.__dict__, **overrides}) if overrides else spec


def build_encoder(name: str, *, img_size: Optional[int] = None, in_chans: Optional[int] = None,
                  train_patch_embed: bool = False, attn_backend: str = "sdpa",
                  drop_path_rate: float = 0.0, init: str = "mocov3") -> VisibleTokenViT:
    spec = model_spec(name, img_size, in_chans)
    return VisibleTokenViT(spec, train_patch_embed=train_patch_embed, attn_backend=attn_backend,
                           drop_path_rate=drop_path_rate, init=init)
