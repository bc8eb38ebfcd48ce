"""Checkpoint formats, in one place: each format's file names and keys, its writer and its reader.

- torch_file.py: single / DDP engines, one plain torch file (`state.pt`);
- dcp.py: FSDP2, a torch.distributed.checkpoint directory (`dcp/`) and the trainer state (`extra.pt`);
- deepspeed.py: DeepSpeed's own checkpoint (tag `deepspeed/`), the trainer state as client state;
- safe_load.py: every checkpoint file is read with torch.load(weights_only=True) (`load_torch_file`);
- model_state.py: any engine's checkpoint read without the engine (format detection,
  `load_checkpoint`), for scale.export and scale.eval;
- directory.py: the checkpoint directory every format writes into (`CheckpointManager`: atomic,
  sealed with checksums in meta.json, rotated, verified before a resume) and `read_meta`;
- errors.py: CheckpointError (an unusable checkpoint directory), CheckpointFileError (an unreadable
  file), CheckpointFormatError (not a checkpoint).

Engines call their format's `save` / `load` and keep only what is theirs (which rank writes,
turning a sharded module into state dicts and back). The layout on disk is the contract
with existing checkpoints: names and keys here change only with a reader for the old ones.
"""
from . import dcp, deepspeed, torch_file
from .directory import META, CheckpointManager, read_meta
from .errors import CheckpointError, CheckpointFileError, CheckpointFormatError
from .model_state import LoadedCheckpoint, detect_format, encoder_state_dict, load_checkpoint, resolve_checkpoint
from .safe_load import load_torch_file

__all__ = ["META", "CheckpointError", "CheckpointFileError", "CheckpointFormatError", "CheckpointManager",
           "LoadedCheckpoint", "dcp", "deepspeed", "detect_format", "encoder_state_dict", "load_checkpoint",
           "load_torch_file", "read_meta", "resolve_checkpoint", "torch_file"]
