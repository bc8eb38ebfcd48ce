"""Logs of one JSON line per step (metrics.jsonl, the sample record) and what a resume does to them.

A resume from the checkpoint of step s continues the model of step s: the lines of later steps
describe a model that was lost, and the resumed run writes those steps again. So the log keeps
the lines of steps <= s, replaced atomically, and each step appears once in it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, TextIO

from ..atomic_files import parse_json, read_regular_file, write_text_atomically
from ..errors import UserError


def lines_up_to(path: Path, step: int, what: str) -> List[str]:
    """The lines of the step log `path` (`what` names its kind for the error) of steps <= `step`. A
    last line without its newline is a write cut short by a kill (a step after any checkpoint) and is
    dropped; any other line without an integer "step" is a UserError naming the file."""
    try:
        content = read_regular_file(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror or type(err).__name__}); it must be a file "
                        "of JSON lines, or absent") from None
    lines = content.split(b"\n")  # JSON lines end in "\n" alone: no other separator ends one
    lines.pop()  # what follows the last "\n": nothing, or a line cut short
    kept = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            line_step = parse_json(line)["step"]
            if type(line_step) is not int:
                raise TypeError
        except (ValueError, KeyError, TypeError):  # DamagedJson and UnicodeDecodeError are ValueErrors
            raise UserError(f"{path} line {number} is not a line of {what} (a JSON object with its integer "
                            "\"step\"); move the file away to start it afresh") from None
        if line_step <= step:
            kept.append(line + "\n")
    return kept


def forget_steps_after(path: Path, step: int, what: str) -> None:
    """Drop the lines of steps after `step` from the step log `path` (if it exists), atomically."""
    if path.exists():
        write_text_atomically(path, "".join(lines_up_to(path, step, what)))


def open_for_appending(path: Path, what: str) -> TextIO:
    """`path` opened to append lines to (its folder made), line-buffered so that a kill loses no whole
    line; a path that cannot be one (a folder, a file where the folder should be) is a UserError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as err:
        raise UserError(f"{path}: cannot append to {what} ({err.strerror or type(err).__name__}); it must be a "
                        "writable file in a folder, or absent") from None
