"""The FSDP2 format: a torch.distributed.checkpoint (DCP) directory and rank 0's trainer state.

    <checkpoint>/dcp/      {"model": ..., "optimizer": ...}, sharded: each rank writes its own
                           shards, and the checkpoint loads on any number of ranks
    <checkpoint>/extra.pt  the trainer state (rank 0), a plain torch file

The engine turns its sharded module and optimizer into state dicts and back
(torch.distributed.checkpoint.state_dict); this module writes and reads them. `read_model`
reads the `model.*` tensors alone, in one process without a process group (export, eval).

Reading trusts nothing in the directory: `.metadata` is rebuilt without pickle semantics
(dcp_metadata.py), every data file it names must lie inside the directory (confined.py)
and be long enough for its entries, and whatever still fails is one CheckpointFileError
naming the file, on every rank, with none of DCP's per-rank tracebacks.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed.checkpoint as dist_cp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import UserError
from .confined import confined_path
from .dcp_metadata import MetadataRefused, read_dcp_metadata
from .errors import CheckpointFileError, CheckpointFormatError
from .safe_load import describe_load_error, load_torch_file, weights_only_forced

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


class PlainDataReader(dist_cp.FileSystemReader):
    """A FileSystemReader that reads the metadata without pickle semantics (dcp_metadata.py), follows
    only the data files it names inside its directory, and names the file when one cannot be read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / DCP_METADATA
        try:
            metadata = read_dcp_metadata(path.read_bytes())
        except OSError as err:
            raise CheckpointFileError(f"checkpoint file {path}: unreadable ({err.strerror or err})") from None
        except (MetadataRefused, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
                RuntimeError) as err:
            raise CheckpointFileError(f"checkpoint file {path}: refused or damaged: it is not plain DCP metadata "
                                      f"({type(err).__name__}: {str(err)[:120]})") from None
        self._check_records(metadata, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_records(self, metadata: Any, metadata_file: Path) -> None:
        """Before anything is read: the records have DCP's types, every data file an entry names is
        inside this directory, and long enough for the entries that read it (a truncated file is named
        here, not by a zip reader)."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex

        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        items = metadata.state_dict_metadata
        if not isinstance(items, dict) or not all(
                isinstance(key, str) and isinstance(item, (TensorStorageMetadata, BytesStorageMetadata))
                for key, item in items.items()):
            raise CheckpointFileError(f"checkpoint file {metadata_file}: refused or damaged: its state_dict_metadata "
                                      "is not a mapping of names to DCP storage records")
        storage = metadata.storage_data
        if not isinstance(storage, dict) or not all(isinstance(key, MetadataIndex) and isinstance(info, _StorageInfo)
                                                    for key, info in storage.items()):
            raise CheckpointFileError(f"checkpoint file {metadata_file}: refused or damaged: its storage_data is "
                                      "not a mapping of DCP storage entries")
        needed: Dict[Path, int] = {}
        for info in storage.values():
            if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
                raise CheckpointFileError(f"checkpoint file {metadata_file}: refused or damaged: an entry of "
                                          f"{str(info.relative_path)[:200]!r} has offset {info.offset!r:.40}, "
                                          f"length {info.length!r:.40}")
            data_file = confined_path(Path(self.path), info.relative_path, metadata_file)
            needed[data_file] = max(needed.get(data_file, 0), info.offset + info.length)
        for data_file, size in sorted(needed.items()):
            if not data_file.is_file():
                raise CheckpointFileError(f"checkpoint file {data_file} does not exist ({metadata_file.name} "
                                          "names it)")
            if data_file.stat().st_size < size:
                raise CheckpointFileError(f"checkpoint file {data_file}: truncated ({data_file.stat().st_size} "
                                          f"bytes, {metadata_file.name} records data up to byte {size})")

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except UserError:
            raise
        except Exception as err:  # a damaged data file: the zip reader's error names no file
            names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            raise CheckpointFileError(f"checkpoint file {Path(self.path) / names[0] if len(names) == 1 else names} "
                                      f"in {self.path}: {describe_load_error(err)}") from None


@contextlib.contextmanager
def _one_error(directory: Path) -> Iterator[None]:
    """DCP gathers what failed on each rank into a CheckpointException (a BaseException whose message
    is every rank's traceback): re-raise the first rank's UserError as it is, or one CheckpointFileError."""
    try:
        yield
    except CheckpointException as err:
        failures = [failure for _rank, (failure, _trace) in sorted(err.failures.items())]
        raise next((failure for failure in failures if isinstance(failure, UserError)), None) or CheckpointFileError(
            f"checkpoint {directory} cannot be read: {describe_load_error(failures[0]) if failures else err}") \
            from None


def load(directory: Path, model_state: Dict[str, Any],
         optimizer_state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Collective: (model state, optimizer state, trainer state), the first two read into the given
    (sharded) state dicts."""
    state = {"model": model_state, "optimizer": optimizer_state}
    reader = PlainDataReader(str(directory / DCP_DIR))
    # Checked on every rank before the collective: a refused or damaged .metadata is one error here,
    # not a failure DCP logs as a traceback and retries as rank-local metadata.
    reader.read_metadata()
    with _one_error(directory), weights_only_forced():  # DCP's planner rebuilds non-tensor items with torch.load
        dist_cp.load(state, storage_reader=reader)
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
            with _one_error(path):
                dist_cp.load({"model": model}, storage_reader=reader, no_dist=True)
    extra_file = path / EXTRA_FILE
    return model, load_torch_file(extra_file) if extra_file.is_file() else None
