"""Logs of one JSON line per step (metrics.jsonl, the sample record) and what a resume does to them.

A resume from the checkpoint of step s continues the model of step s: the lines of later steps
describe a model that was lost, and the resumed run writes those steps again. So the log keeps
the lines of steps <= s, replaced atomically, and each step appears once in it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from ..atomic_files import write_text_atomically
from ..errors import UserError


def lines_up_to(path: Path, step: int, what: str) -> List[str]:
    """The lines of the step log `path` (`what` names its kind for the error) of steps <= `step`. A
    last line without its newline is a write cut short by a kill (a step after any checkpoint) and is
    dropped; any other line without an integer "step" is a UserError naming the file."""
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break
        try:
            line_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {number} is not a line of {what} (a JSON object with its \"step\"); "
                            "move the file away to start it afresh") from None
        if line_step <= step:
            kept.append(line)
    return kept


def forget_steps_after(path: Path, step: int, what: str) -> None:
    """Drop the lines of steps after `step` from the step log `path` (if it exists), atomically."""
    if path.exists():
        write_text_atomically(path, "".join(lines_up_to(path, step, what)))
