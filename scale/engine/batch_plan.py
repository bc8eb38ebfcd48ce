"""The batch plan of one optimizer step: images per rank, and how they pass through the model.

`train.global_batch` is what the optimiser sees, for every method (null: `train.micro_batch`
per rank, DEFAULT_MICRO_BATCH when that is null too). When `train.micro_batch` is smaller than
the per-rank share of the global batch, the step runs in
micro-batches, exactly: a loss that couples the batch (OCL's contrast) by gradient caching
(scale/engine/grad_cache.py), a per-image loss (MAE, ASL) by gradient accumulation
(scale/engine/accumulation.py). The trainer makes the plan once and hands it to the engine.
`train.micro_batch: auto` is sized to the device's memory by scale/engine/memory_plan.py, which needs
the model and the device: whoever has them passes its choice in (`auto_micro_batch`); without one, auto
means one pass (what it means on a CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import AUTO_MICRO_BATCH, DEFAULT_MICRO_BATCH, ConfigError, TrainConfig

GRAD_CACHE = "grad_cache"
ACCUMULATE = "accumulate"


@dataclass(frozen=True)
class BatchPlan:
    per_rank_batch: int  # images each rank loads and scores per step
    world_size: int
    chunk: Optional[int]  # images per forward/backward pass; None: one pass
    couples_batch: bool = True  # the objective's loss couples the batch: gradient caching, else accumulation

    @property
    def global_batch(self) -> int:
        """Images of one optimizer step over all ranks (the negatives of a contrastive step)."""
        return self.per_rank_batch * self.world_size

    @property
    def num_chunks(self) -> int:
        return 1 if self.chunk is None else -(-self.per_rank_batch // self.chunk)

    @property
    def mode(self) -> Optional[str]:
        """None (one pass), GRAD_CACHE or ACCUMULATE."""
        if self.chunk is None:
            return None
        return GRAD_CACHE if self.couples_batch else ACCUMULATE


def plan_batch(cfg: TrainConfig, world_size: int, couples_batch: bool = True,
               auto_micro_batch: Optional[int] = None) -> BatchPlan:
    """Per-rank batch and micro-batching from train.global_batch / micro_batch (`auto`: `auto_micro_batch`,
    None for one pass; the config check makes auto come with a global_batch)."""
    if cfg.global_batch is None:
        per_rank = DEFAULT_MICRO_BATCH if cfg.micro_batch is None else cfg.micro_batch
    else:
        if cfg.global_batch % world_size:
            raise ConfigError(
                f"train.global_batch={cfg.global_batch} does not split evenly over {world_size} ranks "
                f"({cfg.global_batch / world_size:g} images each); use a multiple of {world_size}, e.g. "
                f"{cfg.global_batch // world_size * world_size or world_size} or "
                f"{(cfg.global_batch // world_size + 1) * world_size}")
        per_rank = cfg.global_batch // world_size
    chunk = auto_micro_batch if cfg.micro_batch == AUTO_MICRO_BATCH else cfg.micro_batch
    return BatchPlan(per_rank, world_size, chunk if chunk is not None and chunk < per_rank else None, couples_batch)
