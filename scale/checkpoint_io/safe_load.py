"""Reading one checkpoint file without running code.

Every torch file a checkpoint holds is read with `torch.load(weights_only=True)`: here
(`load_torch_file`), or inside DeepSpeed's own readers, which are made to do the same
(deepspeed.py). Only tensors and plain containers (dicts, lists, numbers, strings) are
rebuilt, so a crafted file cannot run code under `--resume`, `scale.export` or
`scale.eval`. A file that is truncated, corrupt or holds anything else is a
`CheckpointFileError` naming the file.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from ..errors import one_line
from .errors import CheckpointFileError


# torch's switch that makes every torch.load weights_only, whatever its caller passes.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_forced() -> Iterator[None]:
    """Every torch.load inside runs with weights_only, also where library code (DeepSpeed's zero_to_fp32,
    DCP's planner) turns it off. Process-wide while it lasts: for one-shot readers and loads."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def describe_load_error(err: BaseException) -> str:
    """Why a checkpoint file could not be loaded, in words for the user: never torch's advice to
    load with weights_only off, which is exactly what must not happen."""
    text = str(err)
    if "weights_only" in text:  # torch's refusal, or any message carrying its advice
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line
                       or "Unsupported operand" in line), "")
        return ("refused: it holds Python objects other than tensors and plain containers, and unpickling them "
                f"could run code{' (' + detail + ')' if detail else ''}")
    if isinstance(err, (EOFError, RuntimeError)) and ("zip" in text or "EOF" in text or "central directory" in text
                                                     or isinstance(err, EOFError)):
        return "truncated or not a torch file"
    return f"unreadable ({type(err).__name__}: {one_line(err)[:200]})"


def load_torch_file(path: Path | str, map_location: Any = "cpu", safe_globals: Optional[Iterable[Any]] = None) -> Any:
    """torch.load(path, weights_only=True), with one clear error naming `path` when it fails."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {path} does not exist")
    try:
        if safe_globals:
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files (RuntimeError, EOFError, UnpicklingError)
        raise CheckpointFileError(f"checkpoint file {path}: {describe_load_error(err)}") from err
