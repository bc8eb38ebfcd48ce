"""End-to-end fine-tuning (MAE's protocol, OCL Table 10 values) of an exported encoder.

The encoder becomes a timm VisionTransformer (scale.export's architecture arguments) with
a classifier; everything trains with AdamW, layer-wise lr decay
(`timm.optim.param_groups_layer_decay`: embeddings are layer 0, block i is layer i + 1,
the final norm and head the top), drop path, random erasing, Mixup/CutMix
(`timm.data.Mixup`) with label smoothing (`timm.loss.SoftTargetCrossEntropy`), and a
per-step warm-up + cosine schedule. One process; `global_batch` is reached by gradient
accumulation over `micro_batch` pieces.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from tqdm import tqdm

from ..config import ConfigError, OptimConfig, to_dict
from ..data import LoaderSpec
from ..models.vit import ViTSpec
from ..trainer.optim import build_schedule
from .config import FinetuneConfig, FinetuneRecipe
from ..device import autocast_dtype, resolve_device
from .features import autocast, build_split, eval_mode, iterate_split


def build_classifier(encoder_state: Dict[str, torch.Tensor], spec: ViTSpec, cfg: FinetuneConfig) -> nn.Module:
    """A timm ViT with the pre-trained encoder weights, a fresh head (and MAE's fc_norm for avg pooling)."""
    from ..export import create_timm_model, timm_kwargs

    model = create_timm_model(timm_kwargs(spec), num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path,
                              global_pool=cfg.global_pool)
    state = dict(encoder_state)
    expected_missing = {"head.weight", "head.bias"}
    if cfg.global_pool == "avg":  # MAE: the final norm is replaced by a fresh fc_norm after pooling
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != expected_missing or unexpected:
        raise RuntimeError(f"encoder weights do not fit the timm model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    trunc_normal_(model.head.weight, std=cfg.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


def build_finetune_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(), layer_decay=cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def finetune_lr(cfg: FinetuneConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * cfg.global_batch / 256


def build_mixup(cfg: FinetuneConfig) -> Optional[Mixup]:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                 num_classes=cfg.num_classes)


def build_criterion(cfg: FinetuneConfig, mixup: Optional[Mixup]) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, split: Any, device: torch.device, amp: Optional[torch.dtype],
                        batch_size: int, num_workers: int = 0, progress: bool = False) -> Dict[str, float]:
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    with eval_mode(model):
        for images, targets in tqdm(iterate_split(split, batch_size, num_workers=num_workers, device=device),
                                    desc="evaluate", leave=False, disable=not progress):
            targets = targets.to(device)
            with autocast(device, amp):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == targets).sum().item()
            correct5 += (top == targets[:, None]).any(1).sum().item()
            n += targets.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "val_loss": loss_sum / n}


def finetune_model(model: nn.Module, recipe: FinetuneRecipe, spec: ViTSpec, device: torch.device,
                   progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    cfg = recipe.finetune
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # RandomErasing draws from Python's random
    model.to(device)
    amp = autocast_dtype(cfg.precision, device)
    workers = recipe.data.num_workers
    train_split = build_split(recipe.data, spec, train=True, augment=True)
    val_split = build_split(recipe.data, spec, train=False)
    accum = cfg.global_batch // cfg.micro_batch
    steps_per_epoch = train_split.batches_per_epoch(LoaderSpec(batch_size=cfg.micro_batch, seed=cfg.seed,
                                                               drop_last=True)) // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"the train split holds less than one batch of {cfg.global_batch}; lower finetune.global_batch")
    lr = finetune_lr(cfg)
    optimizer = build_finetune_optimizer(model, cfg, lr)
    total = cfg.epochs * steps_per_epoch
    stop_step = min(total, cfg.max_steps or total)
    schedule = build_schedule(optimizer, OptimConfig(min_lr=cfg.min_lr), total,
                              round(cfg.warmup_epochs * steps_per_epoch))
    mixup = build_mixup(cfg)
    criterion = build_criterion(cfg, mixup)
    erasing = (RandomErasing(cfg.random_erasing, mode="pixel", max_count=1, num_splits=0, device=str(device))
               if cfg.random_erasing > 0 else None)
    history: List[Dict[str, float]] = []
    losses: List[float] = []
    step = 0
    bar = tqdm(total=stop_step, desc="finetune", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        model.train()
        micro = 0
        for images, targets in iterate_split(train_split, cfg.micro_batch, seed=cfg.seed, epoch=epoch,
                                             num_workers=workers, drop_last=True, device=device):
            targets = targets.to(device, non_blocking=True)
            if erasing is not None:
                images = erasing(images)
            if mixup is not None:
                images, targets = mixup(images, targets)
            if micro == 0:
                schedule.step_update(step)
            with autocast(device, amp):
                loss = criterion(model(images), targets)
            (loss / accum).backward()
            micro += 1
            if micro < accum:
                continue
            micro = 0
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tune loss is {loss.item()} at step {step}")
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", grad_norm=f"{grad_norm.item():.3g}",
                            lr=f"{max(g['lr'] for g in optimizer.param_groups):.3g}")
            if step >= stop_step or step % steps_per_epoch == 0:
                break
        optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation never reaches a step
        done = step >= stop_step
        if done or (cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0):
            result = {"epoch": epoch + 1, "step": step,
                      **evaluate_classifier(model, val_split, device, amp, cfg.micro_batch, workers)}
            history.append(result)
            message = (f"finetune epoch {epoch + 1}/{cfg.epochs} (step {step}): top-1 {result['top1']:.2f}% "
                       f"top-5 {result['top5']:.2f}% val loss {result['val_loss']:.4f}")
            if progress:
                bar.write(message)
            else:
                log(message)
        if done:
            break
    bar.close()
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "lr": lr, "steps": step, "train_losses": losses,
            "history": history}


def run_finetune(checkpoint: str, recipe: FinetuneRecipe, progress: bool = True,
                 save_path: Optional[str] = None) -> Dict[str, Any]:
    """Fine-tune a checkpoint's encoder; optionally save the classifier (safetensors + timm kwargs)."""
    from ..checkpoint_io import encoder_state_dict, load_checkpoint
    from ..export import spec_from_config, timm_kwargs

    device = resolve_device(recipe.finetune.device, "finetune.device")
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint)
    spec = spec_from_config(loaded.config, loaded.meta.get("model", "") or recipe.model.name)
    model = build_classifier(encoder_state_dict(loaded.model_state, str(loaded.path)), spec, recipe.finetune)
    result = finetune_model(model, recipe, spec, device, progress)
    if save_path:
        import json

        from safetensors.torch import save_file

        Path(save_path).parent.mkdir(parents=True, exist_ok=True)  # checked writable before the training
        kwargs = {**timm_kwargs(spec), "num_classes": recipe.finetune.num_classes,
                  "global_pool": recipe.finetune.global_pool}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, save_path,
                  metadata={"format": "pt", "timm_model": kwargs["model_name"], "timm_kwargs": json.dumps(kwargs),
                            "source_checkpoint": str(loaded.path)})
        result["saved_model"] = save_path
    return {"kind": "finetune", "checkpoint": str(loaded.path), "step": loaded.meta.get("step"),
            "model": loaded.meta.get("model", ""), **result, "seconds": time.perf_counter() - started,
            "recipe": to_dict(recipe)}
