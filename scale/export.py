"""Export a pre-training checkpoint's encoder as a timm VisionTransformer (safetensors).

    python -m scale.export --checkpoint runs/x/checkpoints/step_00001000 --out vit.safetensors

The encoder's parameter names are timm's, so the export is the `encoder.*` entries of the
PretrainModule state dict with the prefix stripped: nothing is added or renamed. The
safetensors metadata holds the `timm.create_model` arguments that rebuild the architecture
(`timm_model_from_export` does it). Checkpoints of every engine are read, the format
detected by the files present:

- single process / DDP: `state.pt` = {"model": state_dict, "optimizer": ..., "extra": ...};
- FSDP2: a torch.distributed.checkpoint directory (`dcp/.metadata`); only the `model.*`
  entries are read, without a process group;
- DeepSpeed: `<tag>/mp_rank_00_model_states.pt` (ZeRO 0-2) or
  `<tag>/zero_pp_rank_*_model_states.pt` (ZeRO-3); fp32 weights are consolidated with
  DeepSpeed's zero_to_fp32 when DeepSpeed is installed (needed for ZeRO-3).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint_io import load_torch_file
from .errors import UserError, one_line, run_command
from .models.vit import ViTSpec, model_spec

ENCODER_PREFIX = "encoder."
TORCH_STATE_FILE = "state.pt"  # SingleProcessEngine / DDPEngine
DCP_SUBDIR = "dcp"  # FSDPEngine
DCP_EXTRA_FILE = "extra.pt"  # FSDPEngine: rank 0's trainer state, config included
DEEPSPEED_EXTRA_KEY = "scale_extra"  # DeepSpeedEngine: client state key of the trainer state
# Wrapper prefixes that must never reach a timm state dict (DDP's module., torch.compile's _orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# timm architecture whose defaults match an embedding width, for presets without a timm twin.
TIMM_NAME_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                      1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


class CheckpointFormatError(UserError, ValueError):
    """A path that is not a checkpoint this code can read."""


@dataclass
class LoadedCheckpoint:
    path: Path
    format: str  # torch | dcp | deepspeed
    model_state: Dict[str, torch.Tensor]  # the PretrainModule state dict, on CPU
    config: Optional[Dict[str, Any]] = None  # the run config saved with it (to_dict form), if any
    meta: Dict[str, Any] = field(default_factory=dict)  # meta.json


# ----------------------------------------------------------------------------- locating

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given; a run dir or its checkpoints/ dir -> its newest complete checkpoint."""
    from .trainer.checkpoint import META, CheckpointManager

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


def _deepspeed_tag_dir(path: Path) -> Optional[Path]:
    """The DeepSpeed tag directory under `path` (`latest` names it when present)."""
    latest = path / "latest"
    candidates = [path / latest.read_text().strip()] if latest.is_file() else sorted(p for p in path.iterdir()
                                                                                        if p.is_dir())
    for tag in candidates:
        if tag.is_dir() and any(tag.glob("*model_states.pt")):
            return tag
    return None


def _dcp_dir(path: Path) -> Optional[Path]:
    for candidate in (path / DCP_SUBDIR, path):
        if (candidate / ".metadata").is_file():
            return candidate
    return None


def detect_format(path: Path, strict: bool = True) -> Optional[str]:
    """'torch', 'dcp' or 'deepspeed' from the files in `path`; an error (or None) otherwise."""
    if path.is_dir():
        if (path / TORCH_STATE_FILE).is_file():
            return "torch"
        if _dcp_dir(path) is not None:
            return "dcp"
        if _deepspeed_tag_dir(path) is not None:
            return "deepspeed"
    if not strict:
        return None
    listing = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else "not a directory"
    raise CheckpointFormatError(
        f"checkpoint {str(path)!r}: unknown format; expected {TORCH_STATE_FILE} (single/ddp engine), "
        f"{DCP_SUBDIR}/.metadata (fsdp engine, torch.distributed.checkpoint) or a DeepSpeed tag directory holding "
        f"mp_rank_00_model_states.pt / zero_pp_rank_*_model_states.pt (deepspeed engine); found: {listing}")


# ----------------------------------------------------------------------------- reading

def _strip_wrappers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _read_torch(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    state = load_torch_file(path / TORCH_STATE_FILE)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: {TORCH_STATE_FILE} has no 'model' entry")
    return state["model"], (state.get("extra") or {}).get("config")


def _read_dcp(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Only the `model.*` tensors of a DCP checkpoint, read in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = _dcp_dir(path)
    reader = dcp.FileSystemReader(str(directory))
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
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    config = None
    extra_file = path / DCP_EXTRA_FILE
    if extra_file.is_file():
        config = load_torch_file(extra_file).get("config")
    return model, config


def _read_deepspeed(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    tag_dir = _deepspeed_tag_dir(path)
    module_file = tag_dir / "mp_rank_00_model_states.pt"
    zero3_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    states_file = module_file if module_file.is_file() else zero3_files[0]
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from .engine.deepspeed_engine import deepspeed_safe_globals, forced_weights_only
    except ImportError:
        get_fp32_state_dict_from_zero_checkpoint = None
    # weights_only=True throughout: DeepSpeed's data classes are the only objects allowed.
    safe_globals = deepspeed_safe_globals() if get_fp32_state_dict_from_zero_checkpoint is not None else None
    client = load_torch_file(states_file, safe_globals=safe_globals)
    config = (client.get(DEEPSPEED_EXTRA_KEY) or {}).get("config")
    has_zero_partitions = any(tag_dir.glob("*optim_states.pt"))
    if has_zero_partitions and get_fp32_state_dict_from_zero_checkpoint is not None:
        # The fp32 master weights (bf16 runs keep only bf16 copies in the module states).
        # zero_to_fp32 narrates to stdout and draws progress bars on stderr; it loads with
        # weights_only=False, which forced_weights_only overrides.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                forced_weights_only(sorted(tag_dir.glob("*.pt"))):
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)
        return dict(state), config
    if module_file.is_file():
        return client["module"], config
    raise CheckpointFormatError(f"checkpoint {str(path)!r}: a ZeRO-3 DeepSpeed checkpoint needs DeepSpeed "
                                "installed to gather its partitions (pip install deepspeed)")


READERS = {"torch": _read_torch, "dcp": _read_dcp, "deepspeed": _read_deepspeed}


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read the model state (and the run config) of a checkpoint written by any engine."""
    from .trainer.checkpoint import META

    path = resolve_checkpoint(path)
    fmt = detect_format(path)
    try:
        model_state, config = READERS[fmt](path)
    except UserError:
        raise
    except Exception as err:  # damaged files surface as many types (RuntimeError, EOFError, KeyError, ...)
        raise CheckpointFormatError(f"checkpoint {str(path)!r} ({fmt} format) cannot be read: "
                                    f"{type(err).__name__}: {one_line(err)[:200]}") from err
    model_state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                   for k, v in _strip_wrappers(model_state).items()}
    if config is None:  # older or foreign checkpoints: the run's config.yaml two levels up
        run_config = path.parent.parent / "config.yaml"
        if run_config.is_file():
            import yaml

            from .config import read_yaml_file

            config = read_yaml_file(run_config, "run config")
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return LoadedCheckpoint(path=path, format=fmt, model_state=model_state, config=config, meta=meta)


def encoder_state_dict(model_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The `encoder.*` entries with the prefix stripped: a timm VisionTransformer state dict."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise CheckpointFormatError(f"{source}: no '{ENCODER_PREFIX}*' entries in the model state "
                                    f"(first keys: {sorted(model_state)[:5]})")
    return encoder


# ----------------------------------------------------------------------------- architecture

def spec_from_config(config: Optional[Dict[str, Any]], fallback_model: str = "") -> ViTSpec:
    """The encoder's shapes from a saved run config's `model` section (preset + size overrides)."""
    model = (config or {}).get("model") or {}
    name = model.get("name") or fallback_model
    if not name:
        raise CheckpointFormatError("the checkpoint carries no run config naming its model; pass --config")
    return model_spec(name, model.get("img_size"), model.get("in_chans"))


def timm_kwargs(spec: ViTSpec) -> Dict[str, Any]:
    """`timm.create_model` arguments for the architecture of `spec` (no classifier)."""
    return {
        "model_name": spec.timm_name or TIMM_NAME_BY_WIDTH.get(spec.embed_dim, "vit_base_patch16_224"),
        "num_classes": 0, "global_pool": "token", "img_size": spec.img_size, "patch_size": spec.patch_size,
        "in_chans": spec.in_chans, "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
    }


def create_timm_model(kwargs: Dict[str, Any], **overrides: Any) -> torch.nn.Module:
    import timm

    args = {**kwargs, **overrides}
    name = args.pop("model_name")
    return timm.create_model(name, pretrained=False, **args)


# ----------------------------------------------------------------------------- export

def export_encoder(checkpoint: str | Path, out: str | Path, fallback_model: str = "") -> Dict[str, Any]:
    """Write the encoder of `checkpoint` to `out` (safetensors); return the metadata written."""
    from safetensors.torch import save_file

    loaded = load_checkpoint(checkpoint)
    state = encoder_state_dict(loaded.model_state, str(loaded.path))
    spec = spec_from_config(loaded.config, fallback_model or loaded.meta.get("model", ""))
    kwargs = timm_kwargs(spec)
    metadata = {
        "format": "pt",
        "timm_model": kwargs["model_name"],
        "timm_kwargs": json.dumps(kwargs),
        "scale_model": ((loaded.config or {}).get("model") or {}).get("name", "") or loaded.meta.get("model", ""),
        "source_checkpoint": str(loaded.path),
        "source_format": loaded.format,
        "step": str(loaded.meta.get("step", "")),
    }
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create its folder ({err.strerror or err})") from None
    # safetensors wants contiguous, unshared tensors; fp32 keeps exports engine-independent.
    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state.items()}
    # Written beside the target and renamed: an existing export is replaced only by a complete one.
    partial = out.with_name(out.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return metadata


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, timm kwargs) of an export."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "timm_kwargs" not in metadata:
        raise CheckpointFormatError(f"{path}: no timm_kwargs in the safetensors metadata (not a scale export)")
    return load_file(str(path)), json.loads(metadata["timm_kwargs"])


def timm_model_from_export(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """Rebuild the timm model of an export and load its weights (strict)."""
    state, kwargs = read_export(path)
    model = create_timm_model(kwargs, **overrides)
    missing, unexpected = model.load_state_dict(state, strict=not overrides.get("num_classes"))
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise CheckpointFormatError(f"{path}: weights do not fit {kwargs['model_name']}: missing {missing}, "
                           f"unexpected {unexpected}")
    return model


def _export_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; give the file to write, e.g. {out / 'model.safetensors'}")
    metadata = export_encoder(args.checkpoint, args.out, args.model)
    kwargs = json.loads(metadata["timm_kwargs"])
    name = kwargs.pop("model_name")
    print(f"exported {metadata['scale_model']} encoder ({metadata['source_format']} checkpoint "
          f"{metadata['source_checkpoint']}) to {args.out}; load with timm.create_model({name!r}, "
          + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (step_XXXXXXXX), or a run dir (newest)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--model", default="", help="model preset, only for checkpoints without a saved config")
    args = parser.parse_args(argv)
    return run_command("scale.export", lambda: _export_command(args))


if __name__ == "__main__":
    sys.exit(main())
