"""Export a pre-training checkpoint's encoder as a timm VisionTransformer (safetensors).

    python -m scale.export --checkpoint runs/x/checkpoints/step_00001000 --out vit.safetensors

The encoder's parameter names are timm's, so the export is the `encoder.*` entries of the
PretrainModule state dict with the prefix stripped: nothing is added or renamed. The
safetensors metadata holds the `timm.create_model` arguments that rebuild the architecture
(`timm_model_from_export` does it). Checkpoints of every engine are read by
scale.checkpoint_io (`load_checkpoint`, the format detected by the files present); its
readers are re-exported here, so existing imports from scale.export keep working.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint_io import (CheckpointFormatError, LoadedCheckpoint, detect_format,  # noqa: F401  (re-exported)
                            encoder_state_dict, load_checkpoint, resolve_checkpoint)
from .errors import UserError, run_command
from .models.vit import ViTSpec, model_spec

# timm architecture whose defaults match an embedding width, for presets without a timm twin.
TIMM_NAME_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                      1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


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


def _integer_from(low: int) -> Callable[[Any], bool]:
    return lambda value: type(value) is int and value >= low  # bool is an int subclass: not allowed


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _vit_architecture(value: Any) -> bool:
    from timm.models import is_model_in_modules

    return isinstance(value, str) and is_model_in_modules(value, ["vision_transformer"])


# The `timm.create_model` arguments an export may carry: timm_kwargs' architecture keys (a fine-tuned
# classifier's num_classes and global_pool included), each with what its value may be. An export is an
# untrusted file, and create_model also takes arguments that read or fetch other files (checkpoint_path,
# pretrained, pretrained_cfg_overlay, an "hf-hub:" model name): nothing but these keys ever reaches it.
EXPORT_KWARGS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model_name": (_vit_architecture, "a timm VisionTransformer architecture such as vit_base_patch16_224"),
    "num_classes": (_integer_from(0), "an integer >= 0"),
    "global_pool": (lambda value: value in ("token", "avg"), "token or avg"),
    **{key: (_integer_from(1), "an integer >= 1")
       for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")},
    "mlp_ratio": (_positive_number, "a finite number > 0"),
}


def check_export_kwargs(path: str | Path, kwargs: Any) -> Dict[str, Any]:
    """`kwargs`, the decoded timm_kwargs of export `path`, if it names a model and holds only
    EXPORT_KWARGS keys with allowed values; a CheckpointFormatError naming the key otherwise."""
    if not isinstance(kwargs, dict) or "model_name" not in kwargs:
        raise CheckpointFormatError(f"{path}: timm_kwargs must be a JSON object with a model_name")
    for key, value in kwargs.items():
        if key not in EXPORT_KWARGS:
            raise CheckpointFormatError(f"{path}: timm_kwargs key {key[:60]!r} is not allowed; allowed: "
                                        + ", ".join(EXPORT_KWARGS))
        allowed, what = EXPORT_KWARGS[key]
        if not allowed(value):
            raise CheckpointFormatError(f"{path}: timm_kwargs {key} must be {what}, got {str(value)[:60]!r}")
    return kwargs


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
    """(state dict, timm kwargs) of an export; the kwargs checked against EXPORT_KWARGS."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "timm_kwargs" not in metadata:
        raise CheckpointFormatError(f"{path}: no timm_kwargs in the safetensors metadata (not a scale export)")
    try:
        kwargs = json.loads(metadata["timm_kwargs"])
    except ValueError as err:
        raise CheckpointFormatError(f"{path}: timm_kwargs in the safetensors metadata is not JSON ({err})") from None
    return load_file(str(path)), check_export_kwargs(path, kwargs)


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
