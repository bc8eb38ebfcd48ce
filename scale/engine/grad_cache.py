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

from typing import Callable, ContextManager, List

import torch

from ..masking import Masks
from ..objectives import ObjectiveBatch, ObjectiveOutput
from .base import Engine


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

    def __call__(self, images: torch.Tensor, masks: Masks, autocast: Callable[[], ContextManager]) -> ObjectiveOutput:
        """images: (B, C, H, W), on any device (moved chunk by chunk), or scale.data's DeviceImages (normalised
        chunk by chunk); masks drawn once for the
        whole local batch. Returns the loss (detached) and metrics."""
        if images.shape[0] != masks.group_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but masks for {masks.group_ids.shape[0]}")
        with self.engine.accumulation_scope():
            return self._run(images, masks, autocast)

    def _run(self, images: torch.Tensor, masks: Masks, autocast: Callable[[], ContextManager]) -> ObjectiveOutput:
        engine, device = self.engine, self.engine.device
        bounds = [(start, min(start + self.chunk, images.shape[0])) for start in range(0, images.shape[0], self.chunk)]
        # 1. Embeddings of the whole local batch, chunk by chunk, without activations.
        rng_states, embeddings = [], []
        with torch.no_grad():
            for start, end in bounds:
                rng_states.append(_RngState(device))
                with autocast():
                    x = images[start:end].to(device, non_blocking=True)
                    embeddings.append(engine.encode(x, masks.rows(start, end)).cls)
        rng_after = _RngState(device)
        cached = torch.cat(embeddings).detach().requires_grad_(True)
        del embeddings

        # 2. The loss over all of them (global negatives); the objective's parameters get
        # their gradients here, the embeddings theirs as a cached leaf gradient.
        with engine.grad_sync(False):
            with autocast():
                out: ObjectiveOutput = engine.score(ObjectiveBatch(cls=cached, masks=masks))
            engine.backward(out.loss)
        cached_grads: List[torch.Tensor] = [cached.grad[start:end] for start, end in bounds]

        # 3. Re-embed each chunk with grad under the same masks and RNG, push the cached gradient.
        for k, ((start, end), grad) in enumerate(zip(bounds, cached_grads)):
            rng_states[k].restore()
            with engine.grad_sync(k == len(bounds) - 1):
                with autocast():
                    emb = engine.encode(images[start:end].to(device, non_blocking=True), masks.rows(start, end)).cls
                engine.backward((emb * grad.to(emb.dtype)).sum())
        rng_after.restore()
        return ObjectiveOutput(out.loss.detach(), out.metrics)
