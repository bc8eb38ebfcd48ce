"""Atomic, rotating checkpoints.

A checkpoint is a directory `step_00000100/`. It is written as `step_00000100.tmp/`
and renamed into place only when complete, so a run killed at any moment (SIGKILL
included) leaves every earlier checkpoint intact, and a half-written one is ignored and
cleaned up. Directories (not single files) let sharded engines (FSDP's
torch.distributed.checkpoint, DeepSpeed) write many files under the same rules.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

_COMPLETE = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def complete(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir()
                 if p.is_dir() and _COMPLETE.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: int(_COMPLETE.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None], meta: dict, is_writer: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Path:
        """Write checkpoint `step`: `write(tmp_dir)` fills it (on every rank, for sharded
        engines), then the writer rank adds meta.json and renames it into place."""
        final = self.path_for(step)
        if (final / META).is_file():  # the same step is already saved: its state is this state
            return final
        tmp = self.directory / f"{final.name}.tmp"
        if is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        write(tmp)
        barrier()
        if is_writer:
            with open(tmp / META, "w") as f:
                json.dump({"step": step, **meta}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def resolve(self, resume: str) -> Optional[Path]:
        """`auto` -> newest complete checkpoint (None if there is none); a path -> that path."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / META).is_file():
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory "
                                    f"(no {META} inside)")
        return path


def read_meta(path: Path) -> dict:
    with open(path / META) as f:
        return json.load(f)
