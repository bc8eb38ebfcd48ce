"""Engines: how the PretrainModule is distributed, stepped and checkpointed."""
from . import ddp, deepspeed_engine, fsdp, single  # noqa: F401  (registration; deepspeed is imported lazily)
from .base import ENGINES, Engine
from .distributed import DistributedEngine, DistributedEnvError, read_dist_env
from .grad_cache import BatchPlan, GradCache, plan_batch
from .single import SingleProcessEngine

__all__ = ["ENGINES", "BatchPlan", "DistributedEngine", "DistributedEnvError", "Engine", "GradCache",
           "SingleProcessEngine", "plan_batch", "read_dist_env"]
