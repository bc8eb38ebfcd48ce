"""How many images one device can pass at once: the step's memory estimate and `train.micro_batch: auto`.

The estimate (once in bench/train_step.py, which now imports it from here) counts what autograd keeps for
backward per token per transformer block, plus 18 bytes per parameter of model state. It matched the
H200's measured peak within 2% for OCL ViT-B/L/H (docs/throughput.md, "Micro-batch limits") and the
CPU's large-batch slope within 2% (fp32, no activation checkpointing); with full activation
checkpointing it overestimates by ~20% (conservative).

`train.micro_batch: auto` uses it once, when the trainer makes its batch plan: the largest micro-batch
whose estimate fits MARGIN of the device's free memory, split so the per-rank batch passes in equal
micro-batches where it can; gradient caching or accumulation then runs only when the per-rank batch
does not fit. On a CPU there is no device memory to size against: auto means one pass. Under FSDP2 or
ZeRO the model state is sharded over the ranks; the estimate counts it whole on every rank (conservative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..masking.base import visible_count
from ..models import ViTSpec

# Usable share of the free memory: the CUDA context's later growth, cuBLAS/cuDNN workspaces, compile's
# buffers and the allocator's fragmentation live outside the estimate.
MARGIN = 0.9
# fp32 parameters, gradients, AdamW exp_avg and exp_avg_sq (16), and autocast's cached bf16 weight copies (2).
STATE_BYTES_PER_PARAM = 18


@dataclass(frozen=True)
class BlockStack:
    """`depth` transformer blocks of width `dim` (MLP width `hidden`), each over `tokens` tokens per image."""
    depth: int
    dim: int
    hidden: int
    tokens: int


def encoder_stack(spec: ViTSpec, tokens_per_image: int) -> BlockStack:
    return BlockStack(spec.depth, spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio), tokens_per_image)


def block_activation_bytes_per_token(dim: int, hidden: float, bf16: bool) -> float:
    """Bytes autograd keeps per token per timm Block (flash / memory-efficient attention: no N^2 term).

    Saved for backward: norm1 input x (fp32 residual), qkv input, q/k/v, attention output,
    proj input (the transpose-reshape copy), norm2 input (fp32 residual), fc1 input, fc1 output
    (GELU input), GELU output (fc2 input). Under bf16 autocast the residual stream and the
    LayerNorm inputs stay fp32 (4 bytes), every linear's saved input/output is bf16 (2 bytes);
    fp32 runs keep 4 bytes everywhere (h = dim, hidden = r h):
        fp32: (4+4+12+4+4+4+4) h + 2 * 4 * (r h) = 36 h + 8 r h   (= 68 h for r = 4)
        bf16: (4+2+6+2+2+4+2) h + 2 * 2 * (r h) = 22 h + 4 r h   (= 38 h for r = 4)
    """
    return (22 * dim + 4 * hidden) if bf16 else (36 * dim + 8 * hidden)


def stacks_activation_bytes_per_image(stacks: Sequence[BlockStack], bf16: bool, checkpointed: bool) -> float:
    """Activation memory per image of a forward+backward through `stacks`.

    Without AC: every block's saved tensors (backward frees a block's as it goes, which offsets
    the gradient buffers: on CPU at batch 3661 the measured slope was within 2% of this).
    AC full: each block's fp32 input, plus in backward the block being recomputed: its saved
    tensors and about as much again in activation gradients (on CPU at batch 2048 this
    overestimated the measured slope by ~20%: conservative).
    """
    total, largest_block = 0.0, 0.0
    for s in stacks:
        per_block = block_activation_bytes_per_token(s.dim, s.hidden, bf16) * s.tokens
        largest_block = max(largest_block, per_block)
        total += s.depth * (4 * s.dim * s.tokens if checkpointed else per_block)
    return total + (2 * largest_block if checkpointed else 0.0)


def activation_bytes_per_image(spec: ViTSpec, tokens_per_image: int, bf16: bool, checkpointed: bool) -> float:
    """The encoder's activation memory per image (`stacks_activation_bytes_per_image` of its blocks)."""
    return stacks_activation_bytes_per_image([encoder_stack(spec, tokens_per_image)], bf16, checkpointed)


def param_count(spec: ViTSpec) -> int:
    """The encoder's parameters from its shapes (blocks, patch embedding, CLS, position, final norm)."""
    d, hidden = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    embed = spec.in_chans * spec.patch_size ** 2 * d + d + d
    return spec.depth * block + embed + 2 * d


@dataclass(frozen=True)
class StepMemory:
    """Estimated device memory of one training step: fixed model state plus a cost per image."""
    state_bytes: float
    bytes_per_image: float

    def at(self, micro_batch: int) -> float:
        return self.state_bytes + micro_batch * self.bytes_per_image


def step_memory(params: int, stacks: Sequence[BlockStack], bf16: bool, checkpointed: bool) -> StepMemory:
    return StepMemory(STATE_BYTES_PER_PARAM * params, stacks_activation_bytes_per_image(stacks, bf16, checkpointed))


def largest_micro_batch(memory: StepMemory, free_bytes: float, margin: float = MARGIN) -> int:
    """The largest micro-batch whose estimate fits `margin` of `free_bytes` (0: not even one image)."""
    budget = free_bytes * margin - memory.state_bytes
    return max(int(budget // memory.bytes_per_image), 0)


def split_per_rank_batch(per_rank: int, largest: int) -> int:
    """The micro-batch that passes `per_rank` images in as few passes of at most `largest` as possible.

    Equal passes where a pass count up to twice the fewest divides the batch (one shape: a compiled step
    keeps one graph, plan_batch's last chunk is not a short one), else balanced passes (the last at most
    one image shorter per pass). `largest` >= per_rank: one pass."""
    if largest >= per_rank:
        return per_rank
    fewest = -(-per_rank // largest)
    for passes in range(fewest, min(2 * fewest, per_rank) + 1):
        if per_rank % passes == 0:
            return per_rank // passes
    return -(-per_rank // fewest)


def module_stacks(spec: ViTSpec, groups: int, visible_per_group: int, passes: int,
                  objective_blocks: Sequence[nn.Module]) -> List[BlockStack]:
    """The encoder over `passes` x `groups` sequences of 1 + visible tokens per image, and each of the
    objective's blocks (a decoder's) over all 1 + N positions once per encoder pass, as MAE's and ASL's
    decoders run (ASL AEE's second decoder pass is not counted)."""
    stacks = [encoder_stack(spec, passes * groups * (1 + visible_per_group))]
    for block in objective_blocks:
        stacks.append(BlockStack(passes, block.norm1.normalized_shape[0], block.mlp.fc1.out_features,
                                 1 + spec.num_patches))
    return stacks


def pretrain_step_memory(module: nn.Module, mask_ratio: float, bf16: bool, checkpointed: bool) -> StepMemory:
    """The step memory of a PretrainModule (its encoder, objective and every parameter) at `mask_ratio`,
    with the masks' shape every built-in generator keeps (as scale.trainer.plan.step_plan counts FLOPs)."""
    spec, objective = module.encoder.spec, module.objective
    groups = objective.num_groups
    visible = visible_count(spec.num_patches, mask_ratio, groups) // groups
    stacks = module_stacks(spec, groups, visible, objective.needs.encoder_passes, objective.blocks())
    return step_memory(sum(p.numel() for p in module.parameters()), stacks, bf16, checkpointed)


@dataclass(frozen=True)
class MicroBatchChoice:
    """What `train.micro_batch: auto` chose, and the line the trainer logs about it."""
    micro_batch: Optional[int]  # None: one pass of the per-rank batch
    note: str


def choose_micro_batch(per_rank: int, device: torch.device, memory: StepMemory,
                       free_bytes: Optional[float] = None) -> MicroBatchChoice:
    """`train.micro_batch: auto` on `device`: the micro-batch for `per_rank` images per rank and step.
    `free_bytes` None: the device's free memory now (torch.cuda.mem_get_info), before the model is on it."""
    if device.type != "cuda":
        return MicroBatchChoice(None, f"train.micro_batch=auto: on {device.type} there is no device memory to size "
                                      f"against; one pass of the per-rank batch ({per_rank} images)")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    largest = largest_micro_batch(memory, free_bytes)
    gib = 1024 ** 3
    if largest < 1:
        return MicroBatchChoice(1, f"train.micro_batch=auto: the model state alone ({memory.state_bytes / gib:.1f} GiB) "
                                   f"leaves no room in {MARGIN:.0%} of {free_bytes / gib:.1f} GiB free; micro-batch 1")
    micro = split_per_rank_batch(per_rank, largest)
    passes = -(-per_rank // micro)
    return MicroBatchChoice(micro if micro < per_rank else None,
                            f"train.micro_batch=auto: {micro} of {per_rank} images per pass ({passes} pass"
                            f"{'es' if passes > 1 else ''}); estimate {memory.at(micro) / gib:.1f} GiB at {micro} "
                            f"(state {memory.state_bytes / gib:.1f} GiB + {memory.bytes_per_image / 2 ** 20:.1f} MiB/image), "
                            f"largest that fits {largest} in {MARGIN:.0%} of {free_bytes / gib:.1f} GiB free")
