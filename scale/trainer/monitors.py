"""Monitors: evaluations the trainer runs every few epochs (the kNN monitor, scale/eval/knn.py).

A monitor is handed what it needs (an encoder with the current weights, the device, the
autocast dtype) and returns a record; the trainer writes the record to metrics.jsonl,
TensorBoard and the console. No monitor reaches into the trainer, and the trainer imports
no evaluation code: whoever builds the trainer (scale.train, the demo, a test) builds the
monitors (`scale.eval.knn.build_monitors`).
"""
from __future__ import annotations

import abc
from typing import Dict, Optional

import torch
import torch.nn as nn


class Monitor(abc.ABC):
    every_epochs: int = 0  # 0: never

    def due(self, step: int, steps_per_epoch: int) -> bool:
        return self.every_epochs > 0 and step > 0 and step % (self.every_epochs * steps_per_epoch) == 0

    @abc.abstractmethod
    def evaluate(self, encoder: nn.Module, device: torch.device,
                 amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
        """Evaluate `encoder` (main rank only); the record's values are logged as eval/<key>."""

    @abc.abstractmethod
    def describe(self, record: Dict[str, float]) -> str:
        """One console line for `record`."""
