"""engine.name=auto, and the one way a run builds its engine.

`auto` lets the launcher decide (accelerate's FSDP / DeepSpeed launch configs pick those engines,
else ddp with more than one process, single with one), so an auto run may become any engine and
carries each distributed engine's keys. Every engine is built from its own section
(scale.config.EngineConfig with its keys) and the few run settings it reads (`EngineRun`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import EngineConfig, RunConfig
from .base import ENGINES, Engine, EngineRun
from .ddp import DDPConfig
from .deepspeed_engine import DeepSpeedConfig
from .distributed import launcher_engine_name
from .fsdp import FSDPConfig


@dataclass
class AutoEngineConfig(DeepSpeedConfig, FSDPConfig, DDPConfig):
    """engine.name=auto: the keys of every engine the launcher may pick."""


@ENGINES.register("auto", config=AutoEngineConfig)
def build_auto(device: torch.device, cfg: EngineConfig, run: EngineRun, **_: Any) -> Engine:
    return ENGINES.build(launcher_engine_name(), device=device, cfg=cfg, run=run)


def build_engine(cfg: RunConfig, device: torch.device) -> Engine:
    """The run's engine, handed its own section and the few run settings it reads."""
    return ENGINES.build(cfg.engine.name, device=device, cfg=cfg.engine, run=EngineRun.of(cfg))
