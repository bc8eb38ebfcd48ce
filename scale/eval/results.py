"""Where evaluation results go: JSON next to the checkpoint they evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def results_path(checkpoint: Path, kind: str) -> Path:
    """`checkpoints/step_00000100` -> `checkpoints/step_00000100.<kind>.json` (survives checkpoint rotation)."""
    return checkpoint.parent / f"{checkpoint.name}.{kind}.json"


def write_results(path: Path, results: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
