"""Linear probing (MAE's protocol, OCL Table 11 values): a frozen encoder, its CLS output
through BatchNorm1d(affine=False, eps=1e-6) and a linear head (trunc-normal std 0.01),
trained with LARS and a per-iteration warm-up + cosine schedule.

LARS is timm's: with `always_adapt` on matrices and off (with no weight decay) on 1-D
parameters it is MAE's LARS, which applies neither weight decay nor the trust ratio to
biases and norms. (With weight decay > 0 timm divides by |g| + wd|w| where MAE divides
by |g + wd w|; the probe recipes use wd 0, where they agree.)

Two ways to feed the head: MAE's (every epoch re-encodes augmented images; the encoder
forward runs in `micro_batch` pieces, and the head steps once per `global_batch` images,
so its BatchNorm sees the whole batch) or `cache_features` (encode the un-augmented
train split once; much faster, no augmentation). Validation features are always
computed once: the encoder is frozen.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from tqdm import tqdm

from ..config import ConfigError, OptimConfig, to_dict
from ..trainer.optim import build_schedule
from .config import LinearProbeConfig, LinearProbeRecipe
from ..device import autocast_dtype, resolve_device
from .features import (Features, autocast, build_split, encode_cls, encoder_from_checkpoint, eval_mode,
                       extract_features, iterate_split)

BatchSource = Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (features, labels)


class ProbeHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


def lars_param_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """MAE's LARS rule: matrices get weight decay and the trust ratio; 1-D parameters get neither."""
    matrices = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = []
    if matrices:
        groups.append({"params": matrices, "weight_decay": weight_decay, "always_adapt": True})
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0, "always_adapt": False})
    return groups


def build_lars(module: nn.Module, lr: float, cfg: LinearProbeConfig) -> Lars:
    return Lars(lars_param_groups(module, cfg.weight_decay), lr=lr, momentum=cfg.momentum,
                trust_coeff=cfg.trust_coeff)


def probe_lr(cfg: LinearProbeConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * cfg.global_batch / 256


@torch.no_grad()
def evaluate_head(head: nn.Module, val: Features, device: torch.device, chunk: int = 4096) -> Dict[str, float]:
    x, y = val
    correct1 = correct5 = 0
    loss_sum = 0.0
    with eval_mode(head):
        for start in range(0, x.shape[0], chunk):
            logits = head(x[start:start + chunk].to(device)).float()
            target = y[start:start + chunk].to(device)
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == target).sum().item()
            correct5 += (top == target[:, None]).any(1).sum().item()
    n = x.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "val_loss": loss_sum / n}


def cached_batches(train: Features, batch_size: int, seed: int) -> Tuple[BatchSource, int]:
    """(epoch -> shuffled batches of cached features, batches per epoch); the last partial batch is dropped."""
    x, y = train
    steps = x.shape[0] // batch_size

    def batches(epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield x[idx], y[idx]
    return batches, steps


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The head's ops are tiny: on a busy CPU, OpenMP's thread sync costs far more than they do (100x
    measured on 2 shared cores), so one thread runs them."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_probe_head(batches: BatchSource, steps_per_epoch: int, dim: int, val: Features, cfg: LinearProbeConfig,
                     device: torch.device, progress: bool = True, desc: str = "linprobe",
                     log: Callable[[str], None] = print, single_thread: bool = False) -> Dict[str, Any]:
    """Train BN + linear on (features, labels) batches; return final and per-evaluation accuracies.

    single_thread: run on one CPU thread (for cached features, where the head is all there is to compute).
    """
    with single_thread_on_cpu(device) if single_thread else contextlib.nullcontext():
        return _train_probe_head(batches, steps_per_epoch, dim, val, cfg, device, progress, desc, log)


def _train_probe_head(batches: BatchSource, steps_per_epoch: int, dim: int, val: Features, cfg: LinearProbeConfig,
                      device: torch.device, progress: bool, desc: str,
                      log: Callable[[str], None]) -> Dict[str, Any]:
    if steps_per_epoch < 1:
        raise ConfigError(f"{desc}: the train split has less than one batch of {cfg.global_batch}; "
                         "lower probe.global_batch")
    torch.manual_seed(cfg.seed)
    head = ProbeHead(dim, cfg.num_classes).to(device)
    lr = probe_lr(cfg)
    optimizer = build_lars(head, lr, cfg)
    total = cfg.epochs * steps_per_epoch
    schedule = build_schedule(optimizer, OptimConfig(min_lr=cfg.min_lr), total,
                              round(cfg.warmup_epochs * steps_per_epoch))
    history: List[Dict[str, float]] = []
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        head.train()
        loss_sum, seen = 0.0, 0
        for features, labels in batches(epoch):
            if labels.max() >= cfg.num_classes or labels.min() < 0:
                raise ConfigError(f"{desc}: label {int(labels.max())} outside probe.num_classes={cfg.num_classes}")
            schedule.step_update(step)
            loss = F.cross_entropy(head(features.to(device).float()), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * labels.shape[0]
            seen += labels.shape[0]
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        last = epoch == cfg.epochs - 1
        if last or (cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0):
            result = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), **evaluate_head(head, val, device)}
            history.append(result)
            message = (f"{desc} epoch {epoch + 1}/{cfg.epochs}: train loss {result['train_loss']:.4f} | "
                       f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")
            if progress:
                bar.write(message)
            else:
                log(message)
    bar.close()
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "lr": lr, "steps": step, "history": history,
            "head": head}


def probe_encoder(encoder: nn.Module, recipe: LinearProbeRecipe, device: torch.device,
                  progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Linear-probe a frozen encoder on recipe.data (root: train, val_root: evaluation)."""
    cfg = recipe.probe
    spec = encoder.spec
    amp = autocast_dtype(cfg.precision, device)
    workers = recipe.data.num_workers
    common = dict(device=device, batch_size=cfg.micro_batch, amp_dtype=amp, num_workers=workers,
                  seed=cfg.seed, progress=progress)
    val = extract_features(encoder, build_split(recipe.data, spec, train=False), desc="val features", **common)
    if cfg.cache_features:
        train = extract_features(encoder, build_split(recipe.data, spec, train=True), desc="train features",
                                 **common)
        batches, steps_per_epoch = cached_batches(train, cfg.global_batch, cfg.seed)
    else:
        augmented = build_split(recipe.data, spec, train=True, augment=True)
        batches, steps_per_epoch = augmented_batches(encoder, augmented, cfg, device, amp, workers)
    return train_probe_head(batches, steps_per_epoch, encoder.embed_dim, val, cfg, device, progress, log=log,
                            single_thread=cfg.cache_features)


def augmented_batches(encoder: nn.Module, split: Any, cfg: LinearProbeConfig, device: torch.device,
                      amp: Optional[torch.dtype], num_workers: int) -> Tuple[BatchSource, int]:
    """MAE's feeding: each epoch re-encodes freshly augmented images, `micro_batch` at a time."""
    from ..data import LoaderSpec

    chunks_per_step = cfg.global_batch // cfg.micro_batch
    chunk_spec = LoaderSpec(batch_size=cfg.micro_batch, seed=cfg.seed, num_workers=num_workers, drop_last=True)
    steps = split.batches_per_epoch(chunk_spec) // chunks_per_step

    @torch.no_grad()
    def batches(epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        feats, labels, done = [], [], 0
        with eval_mode(encoder):
            for images, targets in iterate_split(split, cfg.micro_batch, seed=cfg.seed, epoch=epoch,
                                                 num_workers=num_workers, drop_last=True, device=device):
                with autocast(device, amp):
                    feats.append(encode_cls(encoder, images).float())
                labels.append(targets.long())
                if len(feats) == chunks_per_step:
                    yield torch.cat(feats), torch.cat(labels)
                    feats, labels, done = [], [], done + 1
                    if done == steps:
                        return
    return batches, steps


def run_linear_probe(checkpoint: str, recipe: LinearProbeRecipe, progress: bool = True) -> Dict[str, Any]:
    """Probe a checkpoint; the results dict (without the head) is JSON-ready."""
    device = resolve_device(recipe.probe.device, "probe.device")
    started = time.perf_counter()
    encoder, loaded = encoder_from_checkpoint(checkpoint, recipe.model, device, recipe.model.attn_backend)
    result = probe_encoder(encoder, recipe, device, progress)
    result.pop("head")
    return {"kind": "linprobe", "checkpoint": str(loaded.path), "step": loaded.meta.get("step"),
            "model": loaded.meta.get("model", recipe.model.name), **result,
            "seconds": time.perf_counter() - started, "recipe": to_dict(recipe)}
