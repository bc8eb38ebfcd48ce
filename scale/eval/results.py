"""Where evaluation results go: JSON next to the checkpoint they evaluate."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ..atomic_files import read_json, write_json_atomically
from ..errors import UserError

# A results file is a few kB (its run config included); anything far larger is not one of ours.
MAX_RESULTS_BYTES = 1 << 22


def results_path(checkpoint: Path, kind: str) -> Path:
    """`checkpoints/step_00000100` -> `checkpoints/step_00000100.<kind>.json` (survives checkpoint rotation)."""
    return checkpoint.parent / f"{checkpoint.name}.{kind}.json"


def check_output_file(path: Path, option: str, example: str) -> None:
    """UserError unless `path` can be written as a file: checked before an evaluation runs, since
    it is written only after the minutes or hours of work that a failed write would throw away.
    `example` is a file name to suggest when `path` is an existing folder."""
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; give the file to write, e.g. {path / example}")
    check_writable_ancestor(path, option)


def check_writable_ancestor(path: Path, option: str) -> None:
    """UserError unless the nearest existing ancestor of `path` is a writable folder (the folders
    between them can then be created)."""
    for folder in path.parents:
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise UserError(f"{option} {path}: {folder} is not a directory")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{option} {path}: {folder} is not writable")
        return


def read_results(checkpoint: Path, kind: str) -> Optional[Dict[str, Any]]:
    """The results `scale.eval <kind>` wrote beside `checkpoint` (results_path), None if it has none.
    A file there that is not such a result (not JSON, no numeric top1) is a UserError naming it."""
    path = results_path(checkpoint, kind)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise ValueError(f"larger than {MAX_RESULTS_BYTES} bytes")
        results = read_json(path)
    except (OSError, ValueError) as err:  # read_json's DamagedJson is a ValueError
        raise UserError(f"{path}: not a scale.eval {kind} results file ({err}); remove it or rerun "
                        f"scale.eval {kind}") from None
    top1 = results.get("top1") if isinstance(results, dict) else None
    if type(top1) not in (int, float) or not math.isfinite(top1):
        raise UserError(f"{path}: not a scale.eval {kind} results file (no numeric top1); remove it or rerun "
                        f"scale.eval {kind}")
    return results


def write_results(path: Path, results: Dict[str, Any]) -> None:
    write_json_atomically(path, results, indent=2)
