"""The training loop and what it needs: optimizer/schedule, checkpoints, progress, FLOPs; a run's plan
before it starts, and training a run in segments."""
from .plan import RunLength, RunPlan, StepPlan, plan_run, step_plan
from .segments import Segment, train_until
from .trainer import Trainer, TrainSummary, build_engine

__all__ = ["RunLength", "RunPlan", "Segment", "StepPlan", "TrainSummary", "Trainer", "build_engine",
           "plan_run", "step_plan", "train_until"]
