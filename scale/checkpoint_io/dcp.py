"""The FSDP2 format: a torch.distributed.checkpoint (DCP) directory and rank 0's trainer state.

    <checkpoint>/dcp/      {"model": ..., "optimizer": ...}, sharded: each rank writes its own
                           shards, and the checkpoint loads on any number of ranks
    <checkpoint>/extra.pt  the trainer state (rank 0), a plain torch file

The engine turns its sharded module and optimizer into state dicts and back
(torch.distributed.checkpoint.state_dict); this module writes and reads them. `read_model`
reads the `model.*` tensors alone, in one process without a process group (export, eval).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dist_cp

from .errors import CheckpointFileError, CheckpointFormatError
from .safe_load import load_torch_file, weights_only_forced

FORMAT = "dcp"
DCP_DIR = "dcp"
EXTRA_FILE = "extra.pt"
DCP_METADATA = ".metadata"  # DCP's own index of a checkpoint directory
LAYOUT = f"{DCP_DIR}/{DCP_METADATA} (fsdp engine, torch.distributed.checkpoint)"  # what `holds` looks for


def save(directory: Path, model_state: Dict[str, Any], optimizer_state: Dict[str, Any], extra: Dict[str, Any],
         write_extra: bool) -> None:
    """Collective: every rank writes its shards; the rank with `write_extra` (rank 0) writes `extra`."""
    dist_cp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / DCP_DIR))
    if write_extra:
        torch.save(extra, directory / EXTRA_FILE)


# What a DCP `.metadata` pickle may name: DCP's own metadata classes, shapes, dtypes, layouts, paths.
# torch's reader unpickles it with plain `pickle.load`; ours refuses anything else (it could run code).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")} | {("torch", str(dtype).split(".")[1]) for dtype in (
         torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
         torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")
        return super().find_class(module, name)


class PlainDataReader(dist_cp.FileSystemReader):
    """A FileSystemReader whose metadata is unpickled with an allow-list (DCP's classes only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
            raise CheckpointFileError(f"checkpoint file {path}: refused or damaged: it is not plain DCP metadata "
                                      f"({type(err).__name__}: {str(err)[:120]})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load(directory: Path, model_state: Dict[str, Any],
         optimizer_state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Collective: (model state, optimizer state, trainer state), the first two read into the given
    (sharded) state dicts."""
    state = {"model": model_state, "optimizer": optimizer_state}
    with weights_only_forced():  # DCP's planner rebuilds non-tensor items with torch.load, weights_only off
        dist_cp.load(state, storage_reader=PlainDataReader(str(directory / DCP_DIR)))
    return state["model"], state["optimizer"], load_torch_file(directory / EXTRA_FILE)


def dcp_dir(path: Path) -> Optional[Path]:
    """The DCP directory of a checkpoint (`path/dcp`), or `path` itself when it is one."""
    for candidate in (path / DCP_DIR, path):
        if (candidate / DCP_METADATA).is_file():
            return candidate
    return None


def holds(path: Path) -> bool:
    return dcp_dir(path) is not None


def read_model(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(model state, trainer state or None): only the `model.*` tensors, read in this process (no process group)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = dcp_dir(path)
    reader = PlainDataReader(str(directory))
    metadata = reader.read_metadata()
    model: Dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            model[key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not model:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: the DCP directory {directory} holds no 'model.*' "
                                    "tensors")
    # DCP flattens nested dicts with '.', so {"model": {k: t}} asks for "model.<k>" exactly.
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": reading alone is the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        with weights_only_forced():
            dist_cp.load({"model": model}, storage_reader=reader, no_dist=True)
    extra_file = path / EXTRA_FILE
    return model, load_torch_file(extra_file) if extra_file.is_file() else None
