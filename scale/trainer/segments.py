"""Train one run in segments: each continues from the run's last checkpoint up to a step and stops.

Resuming is exact (scale/trainer/trainer.py: every step is a function of (seed, step, rank)), so a
run trained in segments ends where the uninterrupted run does, step for step. Between segments a
caller can evaluate the encoder, measure its speed and plan the next segment, or stop and continue
in another process: the run's state is its checkpoint in `train.output_dir`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from ..config import RunConfig
from .monitors import Monitor
from .trainer import Trainer, TrainSummary


@dataclass
class Segment:
    trainer: Trainer  # its encoder holds the run's weights at summary.final_step; close its engine when done
    summary: TrainSummary
    seconds: float  # Trainer.fit's wall time (resume, steps, final checkpoint); not the set-up before it


def train_until(cfg: RunConfig, step: int, monitors: Sequence[Monitor] = ()) -> Segment:
    """Continue `cfg`'s run (in its train.output_dir) from its last checkpoint up to `step` (at least 1).

    The schedule stays the whole run's (train.epochs); a segment that finds the step already reached
    runs no step (summary.steps_done 0)."""
    train = dataclasses.replace(cfg.train, resume="auto", max_steps=step)
    trainer = Trainer(dataclasses.replace(cfg, train=train), monitors=monitors)
    started = time.perf_counter()
    summary = trainer.fit()
    return Segment(trainer, summary, time.perf_counter() - started)
