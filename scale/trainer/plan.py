"""What a run will do, known before it starts: its batch plan, its FLOPs per step and its length in steps.

Nothing here builds an encoder, an engine or an optimizer: the objective is built on the meta device
(its declarations and layer shapes, no weights) and the data source only counts its samples (a
WebDataset reads its manifest). A script that needs the steps of an epoch or the FLOPs of a step (a
benchmark, a schedule fitted to a budget) asks for the plan instead of building a `Trainer`. The
trainer measures its run with the same `run_length`, and logs FLOP/s with the same `method_step_flops`
on the masks it actually drew.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import ConfigError, RunConfig, TrainConfig
from ..data import LoaderSpec, PretrainData, build_dataset
from ..engine import BatchPlan, plan_batch
from ..masking import build_mask_generator
from ..masking.base import visible_count
from ..models import ViTSpec, model_spec
from ..objectives import build_objective
from .flops import method_step_flops


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: its images and how they pass, the masks' shape, its FLOPs (every rank's)."""

    spec: ViTSpec
    batch: BatchPlan
    num_groups: int  # visible groups per image of the masks
    visible_per_group: int
    flops: int  # encoder (forward + backward), the objective's layers, the mask generator's own forward
    mask_flops: int  # of which the mask generator's (EHM's signal forward)

    @property
    def flops_per_image(self) -> float:
        return self.flops / self.batch.global_batch


@dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int  # optimizer steps of one pass over the data (rank 0's)
    total_steps: int  # train.epochs of them: what the lr schedule and EHM's depth span
    stop_step: int  # where the run stops: train.max_steps when it is set (and smaller), else total_steps


@dataclass(frozen=True)
class RunPlan:
    step: StepPlan
    length: RunLength


def step_plan(cfg: RunConfig, world_size: int = 1) -> StepPlan:
    """The step of `cfg` on `world_size` ranks. The masks' shape is the one every built-in generator
    keeps, `visible_count(N, mask.ratio, groups)` patches per image; the trainer's logged FLOP/s
    counts the masks it actually drew."""
    spec = model_spec(cfg.model.name, cfg.model.img_size, cfg.model.in_chans)
    with torch.device("meta"):
        objective = build_objective(cfg.objective, spec)
    masking = build_mask_generator(cfg.mask, spec.grid_size)
    batch = plan_batch(cfg.train, world_size, objective.couples_batch)
    groups = masking.num_groups
    visible = visible_count(spec.num_patches, cfg.mask.ratio, groups) // groups
    images = batch.global_batch
    return StepPlan(spec, batch, groups, visible,
                    method_step_flops(spec, objective, masking, images, groups, visible, cfg.model.train_patch_embed),
                    masking.forward_flops(spec, images))


def run_length(cfg: TrainConfig, data: PretrainData, loader: LoaderSpec) -> RunLength:
    """Steps per epoch, in all and until the stop; data without one batch per rank is a ConfigError."""
    per_epoch = data.batches_per_epoch(loader)
    if per_epoch < 1:
        raise ConfigError(f"train.global_batch {loader.batch_size * loader.world_size}: the data (data.root) has "
                          f"{data.num_samples} samples, not one batch of {loader.batch_size} per rank on "
                          f"{loader.world_size} rank(s); lower train.global_batch or give the run more samples")
    total = cfg.epochs * per_epoch
    return RunLength(per_epoch, total, min(total, cfg.max_steps or total))


def plan_run(cfg: RunConfig, world_size: int = 1) -> RunPlan:
    """The step and the length of `cfg`'s run on `world_size` ranks (reads the data's sample count)."""
    step = step_plan(cfg, world_size)
    # How samples are decoded does not change how many there are: count them on the CPU path.
    data = build_dataset(dataclasses.replace(cfg.data, decode="cpu"), step.spec.img_size, step.spec.in_chans,
                         train=True)
    loader = LoaderSpec(batch_size=step.batch.per_rank_batch, seed=cfg.train.seed, world_size=world_size)
    return RunPlan(step, run_length(cfg.train, data, loader))
