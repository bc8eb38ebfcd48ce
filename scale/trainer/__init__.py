"""The training loop and what it needs: optimizer/schedule, checkpoints, progress, FLOPs."""
from .checkpoint import CheckpointManager
from .trainer import Trainer, TrainSummary, build_engine

__all__ = ["CheckpointManager", "TrainSummary", "Trainer", "build_engine"]
