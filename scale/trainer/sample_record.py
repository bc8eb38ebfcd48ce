"""data.record_samples: which samples every step used, per rank, so that exactly-once can be
checked from outside the run.

Each rank appends one JSON line per step to <output_dir>/samples/rank_<R>.jsonl:
{"step": s, "epoch": e, "batch": k, "samples": [i, ...]}: step s (counted from 1, as in
metrics.jsonl) trained on global batch k of epoch e, and this rank on its rows of it, named by
their index in the data source. The union of the "samples" of every rank's lines of epoch e is
then what the run trained on in that epoch.

The record is the history of the model that goes on: on resume from the checkpoint of step s,
the main rank first drops every line of a step after s from every rank's file (those steps ran
after the checkpoint, and their model was lost), each file replaced atomically, before any rank
writes again. Files of ranks a smaller allocation no longer has keep their lines up to s: that
part of their history stays true.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, TextIO

import torch

from ..config import ConfigError
from ..data import PretrainData
from .step_log import forget_steps_after, open_for_appending

SAMPLES_DIR = "samples"
WHAT = "the sample record (data.record_samples)"


def record_path(output_dir: Path, rank: int) -> Path:
    return output_dir / SAMPLES_DIR / f"rank_{rank}.jsonl"


class SampleRecord:
    """One rank's record: `start` it at the step the run starts from, `write` each step, `close`."""

    def __init__(self, output_dir: Path, rank: int):
        self.folder = output_dir / SAMPLES_DIR
        self.path = record_path(output_dir, rank)
        self._file: Optional[TextIO] = None

    @classmethod
    def for_run(cls, data: PretrainData, data_name: str, output_dir: Path, rank: int) -> "SampleRecord":
        """The record of this rank; a ConfigError if `data` (of data.name `data_name`) cannot name its samples."""
        if not data.names_samples:
            raise ConfigError(f"data.record_samples: data.name={data_name} streams its samples without naming them; "
                              "it needs a source that names them (synthetic, image_folder, indexed webdataset "
                              "shards), or data.record_samples=false")
        return cls(output_dir, rank)

    def start(self, step: int, is_main: bool, barrier: Callable[[], None]) -> None:
        """Forget the steps after `step` (main rank, every rank's file), wait for every rank, then
        open this rank's file for appending."""
        if is_main:
            for path in sorted(self.folder.glob("rank_*.jsonl")):
                forget_steps_after(path, step, WHAT)
        barrier()
        self._file = open_for_appending(self.path, WHAT)

    def write(self, step: int, epoch: int, batch: int, samples: torch.Tensor) -> None:
        """Step `step` trained on this rank's rows `samples` of global batch `batch` of `epoch`."""
        assert self._file is not None, "SampleRecord.write before start"
        self._file.write(json.dumps({"step": step, "epoch": epoch, "batch": batch,
                                     "samples": samples.tolist()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
