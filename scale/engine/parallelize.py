"""Parallelism applied from outside, by the method's declaration (torchtitan's `parallelize_*`).

A PretrainModule declares a `ParallelPlan`: its encoder blocks and its objective's blocks
(e.g. MAE's decoder), and the modules whose parameters stay fp32 (e.g. OCL's temperature
and head). This module applies it, in torchtitan's order: activation checkpointing ->
compile -> sharding. Model and objective code know nothing of it.

- `apply_block_wrappers`: per-block activation checkpointing and torch.compile
  (train.activation_checkpointing, train.compile) on encoder and objective blocks alike;
  block indices in train.activation_checkpointing name encoder blocks. train.compile also
  compiles the objective's loss (`Objective.loss_methods`: tensors in, after any gather), so
  collectives and the engines' hooks stay outside every compiled region.
- `shard_fsdp2`: every declared block its own FSDP2 unit under the main (bf16 on CUDA)
  policy, each fp32 module its own unit under an fp32 policy, the root last.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict

import torch.nn as nn

from ..config import TrainConfig
from .block_wrappers import apply_activation_checkpointing, apply_compile, compile_methods


def apply_block_wrappers(module: nn.Module, train_cfg: TrainConfig) -> Dict[str, Any]:
    """AC then compile on the blocks `module.parallel_plan()` declares (before the engine wraps it)."""
    plan = module.parallel_plan()
    groups = [SimpleNamespace(blocks=plan.encoder_blocks)]
    if plan.objective_blocks:
        groups.append(SimpleNamespace(blocks=plan.objective_blocks))
    mode = train_cfg.activation_checkpointing
    checkpointed = []
    if mode != "none":
        checkpointed = apply_activation_checkpointing(groups[0], mode)
        for group in groups[1:]:  # the objective's blocks: `full` and `every_<k>` apply to them too
            if mode == "full" or mode.startswith("every_"):
                apply_activation_checkpointing(group, mode)
    compiled = 0
    if train_cfg.compile:
        compiled = sum(apply_compile(group) for group in groups)
        compile_methods(plan.loss_methods)  # each objective's loss, after its gather
    return {"checkpointed_blocks": checkpointed, "compiled_blocks": compiled}


def shard_fsdp2(module: nn.Module, main_policy: Any, fp32_policy: Any, reshard_after_forward: bool) -> None:
    """fully_shard each declared unit, then the root (which holds the rest: embeddings, norms, tokens)."""
    from torch.distributed.fsdp import fully_shard

    plan = module.parallel_plan()
    for block in [*plan.encoder_blocks, *plan.objective_blocks]:
        fully_shard(block, mp_policy=main_policy, reshard_after_forward=reshard_after_forward)
    for fp32_module in plan.fp32_modules:  # e.g. logits / temperature: kept and computed in fp32
        fully_shard(fp32_module, mp_policy=fp32_policy)
    # Root resharded after forward too: a no-grad forward (gradient caching) must not leave stale
    # unsharded copies behind for after the optimizer step.
    fully_shard(module, mp_policy=main_policy, reshard_after_forward=True)
