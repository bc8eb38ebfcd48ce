"""Divergence: a non-finite loss or gradient norm is found, reported in one line and handled.

Checking a value on the host syncs the device, so steps keep their loss and grad norm on the
device; the trainer checks every step since the last check at log steps and before every
checkpoint, so no non-finite state is ever checkpointed. The check is collective (a flag per
step, all-reduced), so every rank decides the same even if only one rank's values went bad.

`train.on_nonfinite`:
- stop: one line (the step, which value, the last good checkpoint) and exit DIVERGED_EXIT (5);
- rollback: reload the last good checkpoint and skip the global batches from the first
  non-finite step through the step that found it. A skipped step advances the step without an
  update, so the step still names the data position (masks, drop path, lr and the data order
  stay those of their step). What is skipped is logged and kept in `<output_dir>/rollbacks.json`,
  which a later resume reads again, so resuming from an earlier checkpoint skips it too (a fresh
  run refuses a leftover one: its steps belong to another run's model). After
  `train.max_rollbacks` rollbacks the next divergence stops as `stop` does.

Steps here are numbered as the log numbers them: step N is the N-th update, on the batch at data
position N - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..atomic_files import read_json, write_json_atomically
from ..data.device_input import DeviceImages
from ..errors import Diverged, UserError
from ..engine import Engine

ROLLBACKS_FILE = "rollbacks.json"
NONFINITE_ENV = "SCALE_TEST_NONFINITE_AT"  # test only: "RANK:STEP[,RANK:STEP...]" makes that step's loss NaN
CHECKED = ("loss", "grad_norm")


@dataclass(frozen=True)
class NonFinite:
    step: int  # the first step whose loss or grad norm is not finite
    value: str  # "loss" or "grad_norm"
    number: float  # what it was (nan, inf, -inf)
    found_at: int  # the step whose check found it

    def describe(self) -> str:
        return f"{self.value} is {self.number} at step {self.step}" + (
            f" (found at step {self.found_at})" if self.found_at != self.step else "")


def poisoned_for_test(batch: DeviceImages) -> DeviceImages:
    """SCALE_TEST_NONFINITE_AT: the batch with every pixel NaN, so the loss, the gradients and then the
    weights go non-finite as they do when a run diverges."""
    return DeviceImages(batch.pixels, lambda pixels: batch.convert(pixels) * float("nan"))


def read_rollbacks(path: Path) -> List[Dict[str, Any]]:
    """The rollbacks recorded in `path` (none when it does not exist); a damaged file is one line."""
    if not path.exists():
        return []
    try:
        records = read_json(path)["rollbacks"]
        for record in records:
            first, last = record["skipped"]
            if not (type(first) is int and type(last) is int and 1 <= first <= last):  # bool is an int subclass
                raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a rollback record scale wrote ({{\"rollbacks\": [{{\"skipped\": [first, last], "
                        "...}]}); restore it, or remove it to train on every batch again") from None
    return records


class DivergenceGuard:
    """The loss and grad norm of the steps since the last check, the check, and what it decides."""

    def __init__(self, engine: Engine, policy: str, max_rollbacks: int, output_dir: Path):
        self.engine, self.policy, self.max_rollbacks = engine, policy, max_rollbacks
        self.path = Path(output_dir) / ROLLBACKS_FILE
        self.pending: List[Tuple[int, torch.Tensor, Optional[torch.Tensor]]] = []
        self.rollbacks: List[Dict[str, Any]] = []

    def load(self, resumed: bool) -> List[Dict[str, Any]]:
        """On resume, read rollbacks.json: its skipped steps are skipped again. A fresh run (nothing resumed:
        the output dir holds no checkpoint) refuses a leftover one, whose skips would silently apply to it."""
        if not resumed:
            if self.path.exists():
                raise UserError(f"{self.path} records the rollbacks of an earlier run, but this run starts afresh "
                                "(no checkpoint resumed) and would skip their steps; remove the file (or move it "
                                "away) to train on every batch, or resume the run it belongs to")
            return []
        self.rollbacks = read_rollbacks(self.path)
        return self.rollbacks

    def skips(self, step: int) -> bool:
        """Whether a rollback skipped `step` (the records hold ranges: a few, at most train.max_rollbacks)."""
        return any(first <= step <= last for first, last in (record["skipped"] for record in self.rollbacks))

    def record(self, step: int, metrics: Dict[str, torch.Tensor]) -> None:
        """Keep step `step`'s loss and grad norm (device tensors: no sync) for the next check."""
        self.pending.append((step, metrics["loss"], metrics.get("grad_norm")))

    def check(self, found_at: int) -> Optional[NonFinite]:
        """The first non-finite value since the last check, as every rank sees it (collective: every rank
        calls it at the same steps). One host sync."""
        if not self.pending:
            return None
        steps = [step for step, _, _ in self.pending]
        values = torch.stack([torch.stack([loss.float().reshape(()),
                                           (norm if norm is not None else torch.zeros_like(loss)).float().reshape(())])
                              for _, loss, norm in self.pending])
        self.pending = []
        bad = (~torch.isfinite(values)).float()
        if self.engine.world_size > 1:  # a rank whose values alone went bad decides for all
            bad = self.engine.all_reduce_mean(bad)
        flags, numbers = bad.cpu().tolist(), values.cpu().tolist()
        for step, row, number in zip(steps, flags, numbers):
            for column, name in enumerate(CHECKED):
                if row[column] > 0:
                    value = number[column] if not math.isfinite(number[column]) else math.nan
                    return NonFinite(step, name, value, found_at)
        return None

    def decide(self, bad: NonFinite, last_checkpoint: Optional[Path]) -> Dict[str, Any]:
        """The rollback to make for `bad` (recorded in rollbacks.json), or Diverged with its one line."""
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
        main = self.engine.is_main  # every rank raises it; the main rank's says it
        if self.policy == "stop":
            raise Diverged(f"diverged: {bad.describe()}; {where}; train.on_nonfinite=rollback would reload it "
                           "and skip the diverged batches", main)
        if last_checkpoint is None:
            raise Diverged(f"diverged: {bad.describe()}; no checkpoint to roll back to (train.ckpt_every sets "
                           "when the first is written)", main)
        if len(self.rollbacks) >= self.max_rollbacks:
            raise Diverged(f"diverged: {bad.describe()} after {len(self.rollbacks)} rollback(s), "
                           f"train.max_rollbacks={self.max_rollbacks}; {where}; see {self.path}", main)
        record = {"found_at": bad.found_at, "value": bad.value, "number": str(bad.number),
                  "checkpoint": str(last_checkpoint),
                  "skipped": [bad.step, bad.found_at]}
        self.rollbacks.append(record)
        if self.engine.is_main:
            write_json_atomically(self.path, {"rollbacks": self.rollbacks})
        return record

    def describe(self, record: Dict[str, Any]) -> str:
        first, last = record["skipped"]
        skipped = f"step {first}" if first == last else f"steps {first}-{last}"
        return (f"rollback {len(self.rollbacks)} of at most {self.max_rollbacks}: reloading {record['checkpoint']} "
                f"and skipping {skipped} (their batches are not trained on); recorded in {self.path}")
