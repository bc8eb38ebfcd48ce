"""Engines: how the PretrainModule is distributed, stepped and checkpointed."""
from . import auto, ddp, deepspeed_engine, fsdp, single  # noqa: F401  (registration; deepspeed is imported lazily)
from .accumulation import GradientAccumulation
from .auto import build_engine
from .base import ENGINES, Engine, EngineRun
from .batch_plan import ACCUMULATE, GRAD_CACHE, BatchPlan, plan_batch
from .distributed import DistributedEngine, DistributedEnvError, read_dist_env
from .grad_cache import GradCache
from .single import SingleProcessEngine
from .timing import StepTimer

__all__ = ["ACCUMULATE", "ENGINES", "GRAD_CACHE", "BatchPlan", "DistributedEngine", "DistributedEnvError", "Engine",
           "EngineRun", "GradCache", "GradientAccumulation", "SingleProcessEngine", "StepTimer", "build_engine", "plan_batch",
           "read_dist_env"]
