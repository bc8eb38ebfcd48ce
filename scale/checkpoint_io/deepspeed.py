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

Another world size: DeepSpeed loads ZeRO 1/2/3 partitions only on the number of ranks that
wrote them (and points to universal checkpoints, converted offline and read with pickle). So
when the partitions were written on another number of ranks, `load` reads every rank's files
(plain data, as above), gathers each parameter's fp32 master weight and AdamW moments whole with
zero_to_fp32's layout functions (`gather_zero_state`), and sets them into the engine built on
this world size, which partitions them its own way (`_load_resharded`). Elementwise AdamW on
the same numbers: the next step is the one the old world size would have taken, up to the
order of the gradient reduction. The cost: every new rank reads every old rank's files (the whole
checkpoint, W' times) and holds it and the gathered fp32 state (about 24 bytes per parameter in
all) while it loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .confined import confined_path
from .errors import CheckpointError, CheckpointFormatError
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
    tag = directory / TAG
    partitions = optim_files(tag) if tag.is_dir() else []  # none: no ZeRO partitions (stage 0)
    if partitions and len(partitions) != ds_engine.dp_world_size:
        return _load_resharded(ds_engine, tag, partitions)
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


# ----------------------------------------------------------------------------- another world size

ZERO_RANK = re.compile(r"zero_pp_rank_(\d+)_")  # the data-parallel rank in a ZeRO file's name


def _by_rank(files: Iterator[Path]) -> List[Path]:
    """The ZeRO files among `files`, in data-parallel rank order."""
    ranked = [(int(match.group(1)), f) for f in files if (match := ZERO_RANK.search(f.name))]
    return [f for _, f in sorted(ranked)]


def optim_files(tag: Path) -> List[Path]:
    """Every rank's ZeRO partition file in the tag directory `tag`, in data-parallel rank order."""
    return _by_rank(tag.glob(OPTIM_STATES))


@dataclasses.dataclass
class ZeroState:
    """A ZeRO checkpoint gathered whole, keyed by parameter name (as the module names them)."""
    module: Dict[str, torch.Tensor]  # buffers, frozen parameters and the trainable ones' fp32 master weights
    optimizer: Dict[str, Dict[str, torch.Tensor]]  # each trainable parameter's per-element state (exp_avg, ...)
    scalars: Dict[str, Any]  # the per-group state that is not per element (AdamW's step): one for every group
    param_groups: List[Dict[str, Any]]  # the optimizer's hyper-parameters per group, without its parameters
    zero_stage: int


def _zero_model_state(states: Dict[str, Any]) -> Any:
    """zero_to_fp32's view of one model-states file, built from the dict already loaded (its own
    parse_model_states loads the file with pickle)."""
    from deepspeed.checkpoint.constants import (BUFFER_NAMES, DS_VERSION, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES,
                                                PARAM_SHAPES)
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    buffer_names = states[BUFFER_NAMES]
    return zero_model_state(
        buffers={k: v.float() if v.is_floating_point() else v for k, v in states["module"].items() if k in buffer_names},
        param_shapes=states[PARAM_SHAPES], shared_params=[[k, v] for k, v in states["shared_params"].items()],
        ds_version=states.get(DS_VERSION), frozen_param_shapes=states.get(FROZEN_PARAM_SHAPES),
        frozen_param_fragments=states.get(FROZEN_PARAM_FRAGMENTS))


def _partitions(optim: Dict[str, Any]) -> Tuple[int, List[torch.Tensor], List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(stage, fp32 partitions, the optimizer state of each, the optimizer's param groups) of one rank's
    ZeRO file. Stage 1/2 save the partitions without the last rank's alignment padding and the optimizer
    state with it: the state is cut to its partition, so both share zero_to_fp32's layout."""
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT,
                                                SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)

    zero = optim[OPTIMIZER_STATE_DICT]
    stage = int(zero[ZERO_STAGE])
    flats = list(zero[SINGLE_PARTITION_OF_FP32_GROUPS] if stage <= 2 else zero[FP32_FLAT_GROUPS])
    base = zero[BASE_OPTIMIZER_STATE] if stage <= 2 else zero[OPTIMIZER_STATE_DICT]
    if not isinstance(base, dict):  # zero_optimization.elastic_checkpoint: lean states, no param groups
        raise CheckpointError("a ZeRO checkpoint written with zero_optimization.elastic_checkpoint=true cannot be "
                              "resumed on another world size; resume it on the world size that wrote it")
    states = [{key: value[:flat.numel()] if torch.is_tensor(value) and value.dim() > 0 else value
               for key, value in base["state"][index].items()} for index, flat in enumerate(flats)]
    return stage, flats, states, base["param_groups"]


def gather_zero_state(model_states: Sequence[Dict[str, Any]], optim_states: Sequence[Dict[str, Any]]) -> ZeroState:
    """The whole state of a ZeRO 1/2/3 checkpoint from its files' loaded contents: `model_states` (one
    file for stage 1/2, one per rank for stage 3) and `optim_states` (one per rank, in rank order).
    zero_to_fp32's layout functions gather the fp32 master weights from the flat partitions; the
    optimizer state is laid out like them, so the same functions gather each of its keys."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_ALIGNMENT_PADDINGS
    from deepspeed.utils.zero_to_fp32 import (_get_fp32_state_dict_from_zero2_checkpoint,
                                              _get_fp32_state_dict_from_zero3_checkpoint, to_torch_tensor)

    zero_models = [_zero_model_state(states) for states in model_states]
    ranks = [_partitions(optim) for optim in optim_states]
    stage, world_size, param_groups = ranks[0][0], len(ranks), ranks[0][3]
    paddings = optim_states[0][OPTIMIZER_STATE_DICT].get(PARAM_ALIGNMENT_PADDINGS)

    def whole(flat_groups: List[List[torch.Tensor]], frozen: bool) -> Dict[str, torch.Tensor]:
        # zero_to_fp32 narrates on stdout and draws progress bars on stderr.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if stage <= 2:
                return dict(_get_fp32_state_dict_from_zero2_checkpoint(world_size, flat_groups, zero_models,
                                                                       not frozen, paddings))
            return to_torch_tensor(_get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, zero_models,
                                                                              not frozen))

    module = whole([flats for _, flats, _, _ in ranks], frozen=True)
    if stage <= 2:
        # Stage 1 records frozen parameters for zero_to_fp32 only in the module states (read_model).
        for name, tensor in model_states[0]["module"].items():
            module.setdefault(name, tensor)
    trainable = [name for shapes in zero_models[0].param_shapes for name in shapes]
    first = ranks[0][2][0]
    element_keys = [key for key, value in first.items() if torch.is_tensor(value) and value.dim() > 0]
    scalars = {key: value for key, value in first.items() if key not in element_keys}
    for _, _, states, _ in ranks:
        for state in states:
            if any(not _same_scalar(state[key], value) for key, value in scalars.items()):
                raise CheckpointError(f"the ZeRO optimizer state holds different {sorted(scalars)} in its groups; "
                                      "it can only be resumed on the world size that wrote it")
    per_key = {key: whole([[state[key] for state in states] for _, _, states, _ in ranks], frozen=False)
               for key in element_keys}
    optimizer = {name: {key: per_key[key][name] for key in element_keys} for name in trainable}
    return ZeroState(module=module, optimizer=optimizer, scalars=scalars,
                     param_groups=[{k: v for k, v in group.items() if k != "params"} for group in param_groups],
                     zero_stage=stage)


def _same_scalar(a: Any, b: Any) -> bool:
    return bool(torch.equal(a, b)) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


def _load_resharded(ds_engine: Any, tag: Path, partitions: List[Path]) -> Dict[str, Any]:
    """Collective: load the ZeRO checkpoint in the tag directory `tag`, written on another number of
    ranks (its optimizer `partitions`, by rank), into `ds_engine`; return the trainer state. Every rank
    reads every file (plain data)."""
    stage = int(ds_engine.zero_optimization_stage())
    for offload in (ds_engine.zero_offload_optimizer(), ds_engine.zero_offload_param()):
        if offload is not None and str(offload.device).endswith("nvme"):
            raise CheckpointError(f"checkpoint {str(tag.parent)!r}: ZeRO state offloaded to NVMe cannot be resumed "
                                  "on another world size; ZeRO 1/2/3 in memory or offloaded to the CPU can")
    model_files = [tag / MODULE_STATES_FILE] if stage < 3 else _by_rank(tag.glob(ZERO3_MODULE_STATES))
    model_states = [load_deepspeed_file(f) for f in model_files]
    try:
        saved = gather_zero_state(model_states, [load_deepspeed_file(f) for f in partitions])
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {str(tag.parent)!r}: {err}") from None
    if saved.zero_stage != stage:
        raise CheckpointError(f"checkpoint {str(tag.parent)!r} holds ZeRO stage {saved.zero_stage} partitions and "
                              f"this run uses stage {stage}; set engine.zero_stage={saved.zero_stage}")
    _set_zero_state(ds_engine, saved)
    client = model_states[0]
    ds_engine.global_steps = client["global_steps"]
    ds_engine.global_samples = client["global_samples"]
    ds_engine.skipped_steps = client["skipped_steps"]
    return client[EXTRA_KEY]


def _set_zero_state(ds_engine: Any, saved: ZeroState) -> None:
    """Collective under ZeRO-3: `saved` into the engine, each rank keeping its own partitions."""
    import deepspeed
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    zero3 = saved.zero_stage == 3
    optimizer = ds_engine.optimizer
    base = optimizer.optimizer  # the client AdamW, stepping the flat fp32 partitions
    if len(base.param_groups) != len(saved.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved.param_groups)} parameter groups and this "
                              f"run's {len(base.param_groups)}")
    for group, hyper in zip(base.param_groups, saved.param_groups):
        group.update(hyper)
    # AdamW creates its state at the first step; DeepSpeed links each parameter to its fragment of the
    # state then (ZeRO 1/2) or looks it up by partition (ZeRO-3). Create it now, so it can be set.
    element_keys = list(next(iter(saved.optimizer.values())))
    flats = optimizer.fp32_partitioned_groups_flat if zero3 else optimizer.single_partition_of_fp32_groups
    for flat in flats:
        base.state[flat] = {**{key: value.clone() if torch.is_tensor(value) else value
                               for key, value in saved.scalars.items()},
                            **{key: torch.zeros_like(flat) for key in element_keys}}
    if not zero3:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    with torch.no_grad():
        for name, param in ds_engine.module.named_parameters():
            if name not in saved.module:
                raise CheckpointError(f"the ZeRO checkpoint holds no parameter {name!r}")
            full = saved.module[name].to(param.device)
            if zero3:
                # safe_set_full_* cannot set a parameter smaller than the rank count (a 1-element
                # temperature); each rank sets its own partition, cut as ZeRO-3 cuts it.
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.copy_(full.view_as(param))
                if param.requires_grad:
                    safe_set_local_fp32_param(param, _zero3_partition(full, param))
                    for key, value in saved.optimizer[name].items():
                        safe_set_local_optimizer_state(param, _zero3_partition(value.to(param.device), param), key)
            else:
                param.copy_(full.view_as(param))
                if param.requires_grad:
                    safe_set_full_fp32_param(param, full)
                    for key, value in saved.optimizer[name].items():
                        safe_set_full_optimizer_state(param, value.to(param.device), key)
        for name, buffer in ds_engine.module.named_buffers():
            if name in saved.module:
                buffer.copy_(saved.module[name])


def _zero3_partition(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of the whole `value` of `param`: flat, padded to a multiple of the
    ranks, cut in equal parts."""
    size = param.ds_tensor.numel()
    flat = value.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, size * torch.distributed.get_world_size() - flat.numel()))
    return padded.narrow(0, size * torch.distributed.get_rank(), size)
