"""FLOP counts of transformer layers from their shapes (matmuls only; norms and softmax are <1%)."""
from __future__ import annotations

from .vit import ViTSpec


def blocks_forward_flops(dim: int, mlp_ratio: float, depth: int, num_sequences: int, seq_len: int) -> int:
    """Forward FLOPs of `depth` ViT blocks of width `dim` over `num_sequences` sequences of `seq_len` tokens."""
    hidden = int(dim * mlp_ratio)
    tokens = num_sequences * seq_len
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * num_sequences * seq_len * seq_len * dim  # q k^T and attn v over all heads
    return depth * (linear + attention)


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def patch_embed_flops(spec: ViTSpec, num_images: int) -> int:
    """Forward FLOPs of the patch embedding (a linear map of each patch's pixels) of `num_images` images."""
    return 2 * num_images * spec.num_patches * spec.in_chans * spec.patch_size ** 2 * spec.embed_dim
