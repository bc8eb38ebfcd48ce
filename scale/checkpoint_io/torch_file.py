"""The torch-file format of the single and DDP engines: one plain torch file per checkpoint.

    <checkpoint>/state.pt = {"model": state_dict, "optimizer": state_dict, "extra": trainer state}

One process writes it (DDP: rank 0; the replicas are identical), so a DDP checkpoint
resumes under `single` and back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .errors import CheckpointFormatError
from .safe_load import load_torch_file

FORMAT = "torch"
STATE_FILE = "state.pt"
LAYOUT = f"{STATE_FILE} (single/ddp engine)"  # what `holds` looks for, in words


def save(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, extra: Dict[str, Any]) -> None:
    """Write `module`'s and `optimizer`'s state and the trainer state `extra` to `directory`."""
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}
    torch.save(state, directory / STATE_FILE)


def load(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, map_location: Any) -> Dict[str, Any]:
    """Load the checkpoint in `directory` into `module` and `optimizer`; return the trainer state."""
    state = load_torch_file(directory / STATE_FILE, map_location=map_location)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["extra"]


def holds(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def read_model(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(model state, trainer state) of the checkpoint in `path`, on CPU."""
    state = load_torch_file(path / STATE_FILE)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: {STATE_FILE} has no 'model' entry")
    return state["model"], state.get("extra")
