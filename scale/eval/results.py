"""Where evaluation results go: JSON next to the checkpoint they evaluate."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

from ..errors import UserError


def results_path(checkpoint: Path, kind: str) -> Path:
    """`checkpoints/step_00000100` -> `checkpoints/step_00000100.<kind>.json` (survives checkpoint rotation)."""
    return checkpoint.parent / f"{checkpoint.name}.{kind}.json"


def check_output_file(path: Path, option: str, example: str) -> None:
    """UserError unless `path` can be written as a file: checked before an evaluation runs, since
    it is written only after the minutes or hours of work that a failed write would throw away.
    `example` is a file name to suggest when `path` is an existing folder."""
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; give the file to write, e.g. {path / example}")
    for folder in path.parents:  # the nearest existing ancestor: it must be a writable folder
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise UserError(f"{option} {path}: {folder} is not a directory")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{option} {path}: {folder} is not writable")
        return


def write_results(path: Path, results: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
