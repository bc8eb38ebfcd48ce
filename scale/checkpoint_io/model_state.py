"""The model state and run config of a checkpoint written by any engine, read without the engine.

What `scale.export` and `scale.eval` read. The format is detected from the files present,
in the order of FORMATS (torch_file.py: single/DDP, dcp.py: FSDP2, deepspeed.py:
DeepSpeed); each format module reads its own files (`read_model`). The model state comes
back on CPU with wrapper prefixes (DDP's module., torch.compile's _orig_mod.) stripped, so
its `encoder.*` entries are a timm VisionTransformer state dict (`encoder_state_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import UserError
from . import dcp, deepspeed, torch_file
from .confined import refuse_links_leading_out
from .directory import CONFIG_KEY, META, CheckpointManager, read_meta
from .errors import CheckpointFormatError
from .safe_load import describe_load_error

FORMATS = (torch_file, dcp, deepspeed)  # detection order
ENCODER_PREFIX = "encoder."
# Wrapper prefixes that must never reach a timm state dict (DDP's module., torch.compile's _orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedCheckpoint:
    path: Path
    format: str  # torch | dcp | deepspeed (the FORMAT of its module)
    model_state: Dict[str, torch.Tensor]  # the PretrainModule state dict, on CPU
    config: Optional[Dict[str, Any]] = None  # the run config saved with it (to_dict form), if any
    meta: Dict[str, Any] = field(default_factory=dict)  # meta.json


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given; a run dir or its checkpoints/ dir -> its newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint {str(path)!r} does not exist")
    if (path / META).is_file() or detect_format(path, strict=False):
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointManager(directory).latest()
        if latest is not None:
            return latest
    raise CheckpointFormatError(f"{str(path)!r} is neither a checkpoint directory nor a run directory with "
                                "complete checkpoints (checkpoints/step_XXXXXXXX/meta.json)")


def detect_format(path: Path, strict: bool = True) -> Optional[str]:
    """'torch', 'dcp' or 'deepspeed' from the files in `path`; an error (or None) otherwise."""
    if path.is_dir():
        for fmt in FORMATS:
            if fmt.holds(path):
                return fmt.FORMAT
    if not strict:
        return None
    listing = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else "not a directory"
    expected = ", ".join(fmt.LAYOUT for fmt in FORMATS[:-1]) + f" or {FORMATS[-1].LAYOUT}"
    raise CheckpointFormatError(f"checkpoint {str(path)!r}: unknown format; expected {expected}; found: {listing}")


def _strip_wrappers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read the model state (and the run config) of a checkpoint written by any engine."""
    path = resolve_checkpoint(path)
    refuse_links_leading_out(path)  # before detect_format, which may open a file the checkpoint holds
    fmt = detect_format(path)
    meta = read_meta(path) if (path / META).is_file() else {}  # its schema checked before any weights are read
    try:
        model_state, extra = {m.FORMAT: m for m in FORMATS}[fmt].read_model(path)
        config = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    except UserError:
        raise
    except Exception as err:  # damaged files surface as many types (RuntimeError, EOFError, KeyError, ...)
        raise CheckpointFormatError(f"checkpoint {str(path)!r} ({fmt} format) cannot be read: "
                                    f"{describe_load_error(err)}") from err
    if config is not None and not isinstance(config, dict):
        raise CheckpointFormatError(f"checkpoint {str(path)!r} ({fmt} format): its saved run config is a "
                                    f"{type(config).__name__}, not a mapping; damaged or edited")
    model_state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                   for k, v in _strip_wrappers(model_state).items()}
    if config is None:  # older or foreign checkpoints: the run's config.yaml two levels up
        run_config = path.parent.parent / "config.yaml"
        if run_config.is_file():
            from ..config import read_yaml_file

            config = read_yaml_file(run_config, "run config")
    return LoadedCheckpoint(path=path, format=fmt, model_state=model_state, config=config, meta=meta)


def encoder_state_dict(model_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The `encoder.*` entries with the prefix stripped: a timm VisionTransformer state dict."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise CheckpointFormatError(f"{source}: no '{ENCODER_PREFIX}*' entries in the model state "
                                    f"(first keys: {sorted(model_state)[:5]})")
    return encoder
