"""Gradient caching (GradCache): a contrastive batch larger than what fits through the encoder.

Gradient accumulation does not add negatives: each micro-batch's loss sees only its own
batch. Gradient caching does. One optimizer step over a local batch of B images in
chunks of C:

1. embed every chunk without grad (B x G x D embeddings, tiny next to activations);
2. score all embeddings (gathered across ranks: global negatives) with a detached leaf
   that requires grad; its backward gives d loss / d embedding, and the objective's own
   parameter gradients (temperature, head);
3. re-embed each chunk with grad under the SAME masks (and the same RNG state, for
   drop-path) and backpropagate `(embedding * cached_grad).sum()`.

The gradient equals that of the whole batch in one pass, while activation memory is that
of one chunk. Gradients are synchronised across ranks once per step: every backward but
the last runs under the engine's `grad_sync(False)` (DDP `no_sync`, FSDP2
`set_requires_gradient_sync(False)`, DeepSpeed: one coalesced reduction per step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, List, Optional, Tuple

import torch

from ..config import ConfigError, TrainConfig
from ..objectives import ObjectiveOutput
from .base import Engine


@dataclass(frozen=True)
class BatchPlan:
    per_rank_batch: int  # images each rank loads and scores per step
    world_size: int
    chunk: Optional[int]  # images per encoder pass under gradient caching; None: one pass

    @property
    def contrastive_batch(self) -> int:
        """Images whose embeddings are scored together (the negatives of one step)."""
        return self.per_rank_batch * self.world_size

    @property
    def num_chunks(self) -> int:
        return 1 if self.chunk is None else -(-self.per_rank_batch // self.chunk)


def plan_batch(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Per-rank batch and chunking from train.batch_size / contrastive_batch / grad_cache_chunk."""
    if cfg.contrastive_batch is None:
        per_rank = cfg.batch_size
    else:
        if cfg.contrastive_batch % world_size:
            raise ConfigError(
                f"train.contrastive_batch={cfg.contrastive_batch} does not split evenly over {world_size} ranks "
                f"({cfg.contrastive_batch / world_size:g} images each); use a multiple of {world_size}, e.g. "
                f"{cfg.contrastive_batch // world_size * world_size} or "
                f"{(cfg.contrastive_batch // world_size + 1) * world_size}")
        per_rank = cfg.contrastive_batch // world_size
    chunk = cfg.grad_cache_chunk
    return BatchPlan(per_rank, world_size, chunk if chunk is not None and chunk < per_rank else None)


def _invoke(engine: Engine, method: str, *args: Any) -> Any:
    invoke = getattr(engine, "invoke", None)  # multi-process engines route through their wrapper
    return invoke(method, *args) if invoke is not None else getattr(engine.unwrapped(), method)(*args)


def _grad_sync(engine: Engine, enabled: bool) -> ContextManager:
    grad_sync = getattr(engine, "grad_sync", None)
    return grad_sync(enabled) if grad_sync is not None else contextlib.nullcontext()


def _step_scope(engine: Engine) -> ContextManager:
    scope = getattr(engine, "accumulation_scope", None)  # DeepSpeed: one coalesced reduction
    return scope() if scope is not None else contextlib.nullcontext()


class _RngState:
    """The global RNG state before a chunk's first pass, to replay it for the second."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class GradCache:
    """Runs steps 1-3 for one optimizer step; the caller then calls `engine.step`."""

    def __init__(self, engine: Engine, chunk: int):
        if chunk < 1:
            raise ValueError(f"grad-cache chunk must be >= 1, got {chunk}")
        self.engine, self.chunk = engine, chunk

    def __call__(self, images: torch.Tensor, group_ids: torch.Tensor,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> ObjectiveOutput:
        """images: (B, C, H, W), on any device (moved chunk by chunk); group_ids: (B, G, n) masks,
        drawn once for the whole local batch. Returns the loss (detached) and metrics."""
        engine, device = self.engine, self.engine.device
        if images.shape[0] != group_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but masks for {group_ids.shape[0]}")
        chunks: List[Tuple[torch.Tensor, torch.Tensor]] = list(zip(images.split(self.chunk),
                                                                   group_ids.split(self.chunk)))
        with _step_scope(engine):
            return self._run(chunks, autocast)

    def _run(self, chunks: List[Tuple[torch.Tensor, torch.Tensor]],
             autocast: Callable[[], ContextManager]) -> ObjectiveOutput:
        engine, device = self.engine, self.engine.device
        # 1. Embeddings of the whole local batch, chunk by chunk, without activations.
        rng_states, embeddings = [], []
        with torch.no_grad():
            for x, ids in chunks:
                rng_states.append(_RngState(device))
                with autocast():
                    embeddings.append(_invoke(engine, "embed", x.to(device, non_blocking=True), ids))
        rng_after = _RngState(device)
        cached = torch.cat(embeddings).detach().requires_grad_(True)
        del embeddings

        # 2. The loss over all of them (global negatives); the objective's parameters get
        # their gradients here, the embeddings theirs as a cached leaf gradient.
        with _grad_sync(engine, False):
            out: ObjectiveOutput = _invoke(engine, "score", cached, engine.gather())
            engine.backward(out.loss)
        cached_grads = cached.grad.split(self.chunk)

        # 3. Re-embed each chunk with grad under the same masks and RNG, push the cached gradient.
        for k, ((x, ids), grad) in enumerate(zip(chunks, cached_grads)):
            rng_states[k].restore()
            with _grad_sync(engine, k == len(chunks) - 1):
                with autocast():
                    emb = _invoke(engine, "embed", x.to(device, non_blocking=True), ids)
                engine.backward((emb * grad.to(emb.dtype)).sum())
        rng_after.restore()
        return ObjectiveOutput(out.loss.detach(), out.metrics)
