"""FLOP counts from the model's shapes (matmuls only; norms, softmax and the loss are <1%)."""
from __future__ import annotations

from ..masking import MaskGenerator
from ..models import ViTSpec
from ..models.flops import blocks_forward_flops, patch_embed_flops
from ..objectives import Objective


def encoder_forward_flops(spec: ViTSpec, num_sequences: int, seq_len: int) -> int:
    """Forward FLOPs of the transformer blocks over `num_sequences` sequences of `seq_len` tokens."""
    return blocks_forward_flops(spec.embed_dim, spec.mlp_ratio, spec.depth, num_sequences, seq_len)


def train_step_flops(spec: ViTSpec, num_images: int, num_groups: int, visible_per_group: int,
                     train_patch_embed: bool = False, objective_forward_flops: int = 0) -> int:
    """Forward + backward (2x forward) FLOPs of one step over `num_images` images, the
    objective's own layers (a decoder: `Objective.forward_flops`) included.

    The images need no gradient, so the patch embedding costs at most its weight gradient,
    and nothing when it is frozen.
    """
    blocks = encoder_forward_flops(spec, num_images * num_groups, 1 + visible_per_group)
    embed = patch_embed_flops(spec, num_images)
    # weight grad only for the embedding, never input grad
    return 3 * (blocks + objective_forward_flops) + (2 if train_patch_embed else 1) * embed


def method_step_flops(spec: ViTSpec, objective: Objective, masking: MaskGenerator, num_images: int,
                      num_groups: int, visible_per_group: int, train_patch_embed: bool = False) -> int:
    """FLOPs of one step of a method over `num_images` images whose masks have `num_groups` groups of
    `visible_per_group` patches: the encoder over every group of each of the objective's encoder passes
    and the objective's own layers, forward and backward (`train_step_flops`), plus what the mask
    generator computes itself (EHM's signal forward: no gradient, forward only)."""
    groups = num_groups * objective.needs.encoder_passes
    return (train_step_flops(spec, num_images, groups, visible_per_group, train_patch_embed,
                             objective.forward_flops(spec, num_images, visible_per_group))
            + masking.forward_flops(spec, num_images))
