"""The DeepSpeed format: DeepSpeed's own checkpoint under one tag, our trainer state as its client state.

    <checkpoint>/deepspeed/mp_rank_00_model_states.pt   the module (ZeRO 0-2) and the client
                                                        state {"scale_extra": trainer state}
    <checkpoint>/deepspeed/zero_pp_rank_*_mp_rank_00_model_states.pt   the same, per rank (ZeRO-3)
    <checkpoint>/deepspeed/*optim_states.pt             the ZeRO partitions (fp32 master weights)

DeepSpeed writes and reads the files (engine.save_checkpoint / load_checkpoint); every one
is read with torch.load(weights_only=True), allowing only the data classes DeepSpeed's own
checkpoints hold (deepspeed_safe_globals), so a crafted checkpoint cannot run code on
resume, export or eval: `load` swaps DeepSpeed's checkpoint engine for a plain-data one,
and `read_model` consolidates ZeRO partitions with DeepSpeed's zero_to_fp32 under
`forced_weights_only`. (Universal checkpoints, which DeepSpeed reads with pickle, are
refused where the DeepSpeed config is read: scale/engine/deepspeed_engine.py.)
"""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .confined import confined_path
from .errors import CheckpointFormatError
from .safe_load import FORCE_WEIGHTS_ONLY, load_torch_file, weights_only_forced  # noqa: F401 (re-exported)

FORMAT = "deepspeed"
TAG = "deepspeed"  # the tag (subdirectory) DeepSpeedEngine saves under
EXTRA_KEY = "scale_extra"  # the client-state key of the trainer state
LATEST_FILE = "latest"  # DeepSpeed's pointer to the newest tag, when one is written
MODULE_STATES_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2
ZERO3_MODULE_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"  # ZeRO-3, one per rank
MODEL_STATES = "*model_states.pt"  # either of the above
OPTIM_STATES = "*optim_states.pt"  # ZeRO partitions
LAYOUT = (f"a DeepSpeed tag directory holding {MODULE_STATES_FILE} / zero_pp_rank_*_model_states.pt "
          "(deepspeed engine)")  # what `holds` looks for, in words


# ----------------------------------------------------------------------------- safe loading

def deepspeed_safe_globals() -> List[Any]:
    """The classes, besides tensors and plain containers, that DeepSpeed's ZeRO 1/2/3 checkpoints
    pickle (found by loading real ones with weights_only=True): data holders without code run
    on unpickling. Everything else in a checkpoint file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of one DeepSpeed checkpoint file; a file holding anything but
    plain data is a CheckpointFileError (a UserError) naming it."""
    return load_torch_file(path, map_location=map_location, safe_globals=deepspeed_safe_globals())


def _plain_data_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (load_deepspeed_file):
    its own load unpickles with weights_only off, so resuming a crafted checkpoint would run code."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class PlainDataCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_deepspeed_file(path, map_location=map_location)

    return PlainDataCheckpointEngine()


@contextlib.contextmanager
def forced_weights_only(files: Sequence[Path]) -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True, allowing deepspeed_safe_globals() only:
    torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides callers that turn weights_only off, as
    DeepSpeed's zero_to_fp32 does. Process-wide while it lasts (a one-shot reader such as
    scale.export). A refusal is the CheckpointFileError of the file among `files` that fails
    to load on its own, so the error names it."""
    try:
        with weights_only_forced(), torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError:
        for path in files:
            load_deepspeed_file(path)  # raises, naming the file
        raise


# ----------------------------------------------------------------------------- engine save / load

def save(ds_engine: Any, directory: Path, extra: Dict[str, Any]) -> None:
    """Collective: DeepSpeed writes `ds_engine`'s checkpoint (every rank its partitions) with `extra`."""
    ds_engine.save_checkpoint(str(directory), tag=TAG, client_state={EXTRA_KEY: extra}, save_latest=False)


def load(ds_engine: Any, directory: Path) -> Dict[str, Any]:
    """Collective: load the checkpoint in `directory` into `ds_engine`; return the trainer state."""
    # DeepSpeed reads every checkpoint file through its checkpoint engine: a plain-data one
    # while loading (weights_only=True); saving keeps the configured engine.
    configured = ds_engine.checkpoint_engine
    ds_engine.checkpoint_engine = _plain_data_checkpoint_engine()
    try:
        path, client = ds_engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    finally:
        ds_engine.checkpoint_engine = configured
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {TAG!r} under {directory}")
    return client[EXTRA_KEY]


# ----------------------------------------------------------------------------- reading without the engine

def tag_dir(path: Path) -> Optional[Path]:
    """The DeepSpeed tag directory under `path` (`latest` names it when present, inside `path` only)."""
    latest = path / LATEST_FILE
    candidates = [confined_path(path, latest.read_text(errors="replace").strip(), latest)] if latest.is_file() \
        else sorted(p for p in path.iterdir() if p.is_dir())
    for tag in candidates:
        if tag.is_dir() and any(tag.glob(MODEL_STATES)):
            return tag
    return None


def holds(path: Path) -> bool:
    return tag_dir(path) is not None


def read_model(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(model state, trainer state or None) of the checkpoint in `path`, in this process: the fp32
    master weights where ZeRO partitions hold them (needs DeepSpeed), else the module states."""
    directory = tag_dir(path)
    module_file = directory / MODULE_STATES_FILE
    zero3_files = sorted(directory.glob(ZERO3_MODULE_STATES))
    states_file = module_file if module_file.is_file() else zero3_files[0]
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        get_fp32_state_dict_from_zero_checkpoint = None
    # weights_only=True throughout: DeepSpeed's data classes are the only objects allowed.
    safe_globals = deepspeed_safe_globals() if get_fp32_state_dict_from_zero_checkpoint is not None else None
    client = load_torch_file(states_file, safe_globals=safe_globals)
    extra = client.get(EXTRA_KEY)
    has_zero_partitions = any(directory.glob(OPTIM_STATES))
    if has_zero_partitions and get_fp32_state_dict_from_zero_checkpoint is not None:
        # The fp32 master weights (bf16 runs keep only bf16 copies in the module states).
        # zero_to_fp32 narrates to stdout and draws progress bars on stderr; it loads with
        # weights_only off, which forced_weights_only overrides.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                forced_weights_only(sorted(directory.glob("*.pt"))):
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=directory.name))
        # DeepSpeed records frozen parameters (OCL's patch embedding, fixed sin-cos positions) for
        # zero_to_fp32 only from stage 2 on; at stage 1 they are only in the module states, which
        # hold every parameter there (unpartitioned), frozen ones exact in their own dtype.
        if module_file.is_file():
            for name, tensor in client["module"].items():
                state.setdefault(name, tensor)
        return state, extra
    if module_file.is_file():
        return client["module"], extra
    raise CheckpointFormatError(f"checkpoint {str(path)!r}: a ZeRO-3 DeepSpeed checkpoint needs DeepSpeed "
                                "installed to gather its partitions (pip install deepspeed)")
