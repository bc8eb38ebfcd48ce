"""AdamW with MAE's parameter groups and a per-iteration warm-up + cosine schedule."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from ..config import OptimConfig


def learning_rate(cfg: OptimConfig, effective_batch: int) -> float:
    """The MAE convention: lr = blr * effective_batch / 256, unless an absolute lr is set."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 256


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Norms, biases, tokens, 0/1-D parameters and frozen parameters get no weight decay."""
    groups = param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=module.no_weight_decay())
    implementation = cfg.implementation
    if implementation == "auto":  # fused on CUDA (one kernel for every parameter); on CPU it measured no faster
        on_cuda = all(p.device.type == "cuda" for group in groups for p in group["params"])
        implementation = "fused" if on_cuda else "for_loop"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **kernel)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   warmup_steps: int) -> CosineLRScheduler:
    """Linear warm-up from 0 over `warmup_steps`, then half-cycle cosine to min_lr.

    Call `schedule.step_update(step)` before the optimizer step of iteration `step`.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=cfg.min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False, cycle_limit=1)
